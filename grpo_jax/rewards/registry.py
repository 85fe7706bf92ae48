"""Reward functions, chosen by name in the config (`config.rl.reward`).

Every reward function has the signature fn(completions: list[str], answers: list[str]) -> np.ndarray
(float32, one reward per completion). NaN means "could not score" (a verifier timed out or raised): `score`
turns those into 0 and counts them, so one pathological completion cannot stop training. Register an
ablation by adding an entry to `REWARDS`; the benchmark verifiers (gsm8k, math, cmath) live in verifiers.py.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from grpo_jax.data.numbers_task import hidden_score
from grpo_jax.rewards.answers import extract_final_answer
from grpo_jax.rewards.verifiers import VERIFIERS

RewardFn = Callable[[list[str], list[str]], np.ndarray]


def _same_number(a: str | None, b: str) -> bool:
  if a is None:
    return False
  try:
    return float(a) == float(b.replace(',', ''))
  except ValueError:
    return a.strip() == b.strip()


def gsm8k_exact(completions: list[str], answers: list[str]) -> np.ndarray:
  """1.0 if the completion's '#### N' equals the gold answer numerically, else 0.0."""
  if len(completions) != len(answers):
    raise ValueError(f'{len(completions)} completions but {len(answers)} answers')
  pairs = zip(completions, answers, strict=True)
  return np.array([_same_number(extract_final_answer(c), a) for c, a in pairs], np.float32)


_FIRST_INTEGER = re.compile(r'-?\d+')


def first_integer(completions: list[str], answers: list[str]) -> np.ndarray:
  """1.0 if the first integer in the completion equals the gold answer (the TRL benchmark's reward)."""
  if len(completions) != len(answers):
    raise ValueError(f'{len(completions)} completions but {len(answers)} answers')
  found = [_FIRST_INTEGER.search(c) for c in completions]
  return np.array([m is not None and m.group(0) == a for m, a in zip(found, answers, strict=True)], np.float32)


_MARK = re.compile(r'#{4,}')  # the '####' answer mark, as extract_final_answer reads it (four or more '#')


def gsm8k_partial(completions: list[str], answers: list[str]) -> np.ndarray:
  """A shaping reward for smoke tests, not a research reward: gsm8k_exact plus partial credit for near-random text.

  1.0 where gsm8k_exact is 1. Otherwise, in [0, 0.75]:
    0.5 * (fraction of the gold answer's characters, commas and spaces dropped, that occur anywhere in the completion)
    + 0.25 * (the completion has a '####' mark).
  An untrained model's random text (the `:tiny` preset's) never earns gsm8k_exact's 1, so every group would score all
  zeros and GRPO would only ever take KL-only steps. A few tokens of random text hold one of the answer's digits often
  enough, and not always, that groups differ in reward and advantages are non-zero. Partial credit stays below 1 so an
  exact answer still outscores any amount of digit spraying; it is gameable (emit all ten digits and a mark: 0.75),
  which is why it only drives smoke runs.
  """
  exact = gsm8k_exact(completions, answers)  # also checks the lengths match
  partial = np.zeros(len(completions), np.float32)
  for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
    gold = re.sub(r'[\s,]', '', answer)
    overlap = sum(ch in completion for ch in gold) / len(gold) if gold else 0.0
    partial[i] = 0.5 * overlap + 0.25 * bool(_MARK.search(completion))
  return np.where(exact == 1.0, 1.0, partial).astype(np.float32)


# 'numbers_hidden' is the non-verifiable task's hidden rater: registered for evaluation and for labelling reward-model
# pairs; using it as rl.reward makes that task verifiable again, defeating its purpose.
REWARDS: dict[str, RewardFn] = {'gsm8k_exact': gsm8k_exact, 'first_integer': first_integer,
                                'gsm8k_partial': gsm8k_partial, 'numbers_hidden': hidden_score, **VERIFIERS}


def score(reward_fn: RewardFn, completions: list[str], answers: list[str]) -> tuple[np.ndarray, int]:
  """(rewards [n] float32 with failures scored 0, number of failures)."""
  rewards = np.asarray(reward_fn(completions, answers), np.float32)
  failed = np.isnan(rewards)
  return np.where(failed, 0.0, rewards).astype(np.float32), int(failed.sum())


def get_reward_fn(name: str) -> RewardFn:
  if name not in REWARDS:
    raise ValueError(f'unknown reward {name!r}; known: {sorted(REWARDS)}')
  return REWARDS[name]
