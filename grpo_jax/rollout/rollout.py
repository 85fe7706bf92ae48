"""Experience for one GRPO step, in three parts: sample G outputs per prompt, score them, turn the scores
into advantages. `collect_rollout` runs them in that order (with the reference forward in between) and returns
the batch the loss reads.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import decode
from grpo_jax.rewards.registry import RewardFn, score
from grpo_jax.rollout.sampling import Completions


class Rollout(NamedTuple):
  """One batch of experience, leading axis N = num_prompts * G with each group contiguous."""
  prompt_tokens: np.ndarray  # [N, p]
  prompt_mask: np.ndarray  # [N, p]
  completion_tokens: np.ndarray  # [N, c]
  completion_mask: np.ndarray  # [N, c]
  old_logprobs: np.ndarray  # [N, c] log pi_old (the sampler's)
  ref_logprobs: np.ndarray  # [N, c] log pi_ref; when no reference runs, this is old_logprobs
  advantages: np.ndarray  # [N]


class Scores(NamedTuple):
  rewards: np.ndarray  # [N] float32, verifier failures scored 0
  correct: np.ndarray  # [N] the verifier's score (the logged accuracy)
  failures: int  # verifier timeouts / errors


def sample_groups(sampler: Callable, params, prompts: TokenizedSplit, rng: jax.Array, *, group_size: int
                  ) -> tuple[Completions, float]:
  """G completions per prompt from pi_old = `params`, groups contiguous, as device arrays; and the seconds it took.

  `sampler(params, prompt_tokens [P, p], prompt_mask, rng)` must sample G per prompt (make_sampler(...,
  group_size=G)).
  """
  start = time.perf_counter()
  out = jax.block_until_ready(sampler(params, prompts.prompt_tokens, prompts.prompt_mask, rng))
  if out.tokens.shape[0] != len(prompts) * group_size:
    raise ValueError(f'sampler returned {out.tokens.shape[0]} rows for {len(prompts)} prompts x G={group_size}; '
                     'build it with make_sampler(..., group_size=G)')
  return out, time.perf_counter() - start


def score_groups(texts: list[str], answers: list[str], reward_fn: RewardFn, verifier: RewardFn | None = None
                 ) -> Scores:
  """Rewards of completion texts [N] against their gold answers [N]; `verifier` gives the logged accuracy
  (default: the reward itself)."""
  rewards, failures = score(reward_fn, texts, answers)
  correct = rewards if verifier is None else score(verifier, texts, answers)[0]
  return Scores(rewards, correct, failures)


def collect_rollout(sampler: Callable, ref_logprobs_fn: Callable | None, params, ref_params,
                    prompts: TokenizedSplit, rng: jax.Array, *, group_size: int, tokenizer, reward_fn: RewardFn,
                    advantage_fn: Callable, verifier: RewardFn | None = None) -> tuple[Rollout, dict[str, float]]:
  """Sample G outputs per prompt from pi_old = the current params, score them, compute advantages.

  ref_logprobs_fn(ref_params, prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [N, c], or
  None (no KL term: the rollout's ref_logprobs are pi_old's). advantage_fn: rewards [P, G] -> [P, G].
  Returns the Rollout and its statistics (reward, accuracy, group spread, lengths, sampling speed).
  """
  out, sample_time = sample_groups(sampler, params, prompts, rng, group_size=group_size)
  prompt_tokens = np.repeat(prompts.prompt_tokens, group_size, axis=0)  # [N, p], groups contiguous
  prompt_mask = np.repeat(prompts.prompt_mask, group_size, axis=0)
  # Host copies first: once a running computation reads a buffer, copying it to the host waits for that run.
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  # Dispatched before the rewards and fed the sampler's device arrays: the reference forward runs while the
  # host decodes and verifies, and the completions make no round trip through host memory to reach it.
  ref_logprobs = out.logprobs
  if ref_logprobs_fn is not None:
    ref_logprobs = ref_logprobs_fn(ref_params, prompt_tokens, prompt_mask, out.tokens, out.mask)
  answers = [a for a in prompts.answers for _ in range(group_size)]
  scores = score_groups(decode(tokenizer, tokens, mask), answers, reward_fn, verifier)
  group_rewards = scores.rewards.reshape(-1, group_size)
  advantages = advantage_fn(group_rewards).reshape(-1)  # on device: queued after the reference
  rollout = Rollout(prompt_tokens, prompt_mask, tokens, mask, out.logprobs, ref_logprobs, advantages)
  stats = {
      'reward': float(scores.rewards.mean()),
      'accuracy': float((scores.correct >= 1).mean()),
      'reward_failures': scores.failures,  # verifier timeouts / errors, scored 0
      'reward_std_in_group': float(group_rewards.std(axis=-1).mean()),
      'frac_groups_no_signal': float((group_rewards.std(axis=-1) == 0).mean()),  # zero advantage everywhere
      'completion_len': float(mask.sum(axis=-1).mean()),
      'sample_time': sample_time,
      'sampled_tokens_per_s': float(mask.sum() / max(sample_time, 1e-9)),
  }
  return rollout, stats
