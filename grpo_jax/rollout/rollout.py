"""Experience for one GRPO step, in three parts: sample G outputs per prompt, score them, turn the scores
into advantages. `collect_rollout` runs them in that order (with the reference forward in between) and returns
the batch the loss reads; `process_supervision` replaces its per-output advantages by per-token ones from step
rewards.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from grpo_jax.core.advantages import process_advantages
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import decode
from grpo_jax.rewards.registry import RewardFn, score
from grpo_jax.rewards.steps import StepVerifier
from grpo_jax.rollout.sampling import Completions
from grpo_jax.rollout.steps import step_boundaries, step_texts
from grpo_jax.rollout.trim import bucket_width, pad_columns, trim_columns

REWARD_SOURCES = ('verifier', 'reward_model', 'mix')


class Rollout(NamedTuple):
  """One batch of experience, leading axis N = num_prompts * G with each group contiguous."""
  prompt_tokens: np.ndarray  # [N, p]
  prompt_mask: np.ndarray  # [N, p]
  completion_tokens: np.ndarray  # [N, c]
  completion_mask: np.ndarray  # [N, c]
  old_logprobs: np.ndarray  # [N, c] log pi_old (the sampler's)
  ref_logprobs: np.ndarray  # [N, c] log pi_ref; when no reference runs, this is old_logprobs
  advantages: np.ndarray  # [N] (outcome supervision) or [N, c] (process supervision)


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


def combine_rewards(rule: np.ndarray, learned: np.ndarray | None, *, source: str, mix: float) -> np.ndarray:
  """GRPO's reward [N] by config.rl.reward_source: the rule reward, the reward model's score, or
  (1 - mix) * rule + mix * sigmoid(score) (the sigmoid puts the unbounded score on the rule reward's [0, 1])."""
  if source == 'verifier':
    return rule
  if learned is None:
    raise ValueError(f'reward_source={source!r} needs the reward model\'s scores')
  if source == 'reward_model':
    return learned.astype(np.float32)
  if source == 'mix':
    return ((1.0 - mix) * rule + mix / (1.0 + np.exp(-learned))).astype(np.float32)
  raise ValueError(f'unknown reward source {source!r}; known: {REWARD_SOURCES}')


def agreement(learned: np.ndarray, correct: np.ndarray, group_size: int) -> tuple[float, int]:
  """How often the reward model ranks as the verifier does, on this rollout: over pairs of one group that the
  verifier orders (correct [N] higher for one), the fraction where the reward model's score [N] is higher for
  the same one; (nan, 0) when no group has such a pair. Reward hacking shows as this falling while reward rises."""
  learned, correct = learned.reshape(-1, group_size), correct.reshape(-1, group_size)
  ordered = correct[:, :, None] > correct[:, None, :]  # [P, G, G]: i preferred to j
  n = int(ordered.sum())
  if not n:
    return float('nan'), 0
  return float((ordered & (learned[:, :, None] > learned[:, None, :])).sum() / n), n


def collect_rollout(sampler: Callable, ref_logprobs_fn: Callable | None, params, ref_params,
                    prompts: TokenizedSplit, rng: jax.Array, *, group_size: int, tokenizer, reward_fn: RewardFn,
                    advantage_fn: Callable, verifier: RewardFn | None = None, learned_reward: Callable | None = None,
                    reward_source: str = 'verifier', reward_mix: float = 0.5, eos_ids: tuple[int, ...] = (),
                    overlong_penalty_len: int = 0, mask_truncated: bool = False, return_rewards: bool = False,
                    length_buckets: Sequence[int] = ()):
  """Sample G outputs per prompt from pi_old = the current params, score them, compute advantages.

  ref_logprobs_fn(ref_params, prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [N, c], or
  None (no KL term: the rollout's ref_logprobs are pi_old's). advantage_fn: rewards [P, G] -> [P, G].
  learned_reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [N]: the reward model's
  scores, combined with the rule reward as `reward_source` says (combine_rewards).
  Overlong outputs (DAPO): overlong_penalty_len = L_cache > 0 adds overlong_penalty to each reward before the
  advantages; mask_truncated zeroes the completion mask of outputs that used the whole budget without an EOS of
  `eos_ids` (truncated_outputs), so they carry no loss weight while their rewards still enter the group baseline.
  With `eos_ids` the stats also hold truncated_frac.
  length_buckets: the widths (trim.completion_buckets) the completion arrays are cut to, the smallest that holds
  the batch's longest completion (stats' completion_width), before the reference forward; () = the sampler's width.
  Returns the Rollout and its statistics (reward, accuracy, group spread, lengths, sampling speed; with a reward
  model its mean score and its agreement with the verifier); with return_rewards also the rewards [P, G] the
  advantages were computed from.
  """
  if mask_truncated and not eos_ids:
    raise ValueError('mask_truncated needs eos_ids: an output is truncated when it holds none of them')
  out, sample_time = sample_groups(sampler, params, prompts, rng, group_size=group_size)
  prompt_tokens = np.repeat(prompts.prompt_tokens, group_size, axis=0)  # [N, p], groups contiguous
  prompt_mask = np.repeat(prompts.prompt_mask, group_size, axis=0)
  # Host copies first: once a running computation reads a buffer, copying it to the host waits for that run.
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  width = bucket_width(mask, length_buckets)
  device_tokens, device_mask, old_logprobs = trim_columns((out.tokens, out.mask, out.logprobs), width)
  # Dispatched before the rewards and fed the sampler's device arrays: the reference forward runs while the
  # host decodes and verifies, and the completions make no round trip through host memory to reach it.
  ref_logprobs = old_logprobs
  if ref_logprobs_fn is not None:
    ref_logprobs = ref_logprobs_fn(ref_params, prompt_tokens, prompt_mask, device_tokens, device_mask)
  answers = [a for a in prompts.answers for _ in range(group_size)]
  scores = score_groups(decode(tokenizer, tokens, mask), answers, reward_fn, verifier)
  learned = None if learned_reward is None else learned_reward(prompt_tokens, prompt_mask,
                                                               *trim_columns((tokens, mask), width))
  rewards = combine_rewards(scores.rewards, learned, source=reward_source, mix=reward_mix)
  penalty = None
  if overlong_penalty_len:
    penalty = overlong_penalty(mask.sum(axis=-1), max_len=tokens.shape[1], cache_len=overlong_penalty_len)
    rewards = (rewards + penalty).astype(np.float32)
  group_rewards = rewards.reshape(-1, group_size)
  advantages = advantage_fn(group_rewards).reshape(-1)  # on device: queued after the reference
  truncated = None if not eos_ids else truncated_outputs(tokens, mask, eos_ids)
  # The sampled mask stays for the stats and the reference forward above; the loss reads the masked one.
  loss_mask = np.where(truncated[:, None], 0, mask).astype(mask.dtype) if mask_truncated else mask
  rollout = Rollout(prompt_tokens, prompt_mask, *trim_columns((tokens, loss_mask), width), old_logprobs, ref_logprobs,
                    advantages)
  stats = {
      'reward': float(rewards.mean()),
      'accuracy': float((scores.correct >= 1).mean()),
      'reward_failures': scores.failures,  # verifier timeouts / errors, scored 0
      **group_signal(group_rewards, scores.correct.reshape(-1, group_size)),
      'completion_len': float(mask.sum(axis=-1).mean()),
      'completion_width': width,  # the columns the trainer computes (a length bucket)
      'sample_time': sample_time,
      'sampled_tokens_per_s': float(mask.sum() / max(sample_time, 1e-9)),
  }
  if learned is not None:
    stats['rm_score'] = float(learned.mean())
    stats['rm_agreement'], stats['rm_agreement_pairs'] = agreement(learned, scores.correct, group_size)
    stats['rule_reward'] = float(scores.rewards.mean())
  if truncated is not None:
    stats['truncated_frac'] = float(truncated.mean())
  if penalty is not None:
    stats['overlong_penalty'] = float(penalty.mean())
  if return_rewards:
    return rollout, stats, group_rewards
  return rollout, stats


def truncated_outputs(tokens: np.ndarray, mask: np.ndarray, eos_ids) -> np.ndarray:
  """Outputs cut off by the budget: no real token is an EOS (the sampler stops a row at its EOS and keeps it in
  the mask, so an ended row holds exactly one). tokens, mask [N, c] -> [N] bool."""
  return ~(np.isin(tokens, np.asarray(eos_ids)) & (mask > 0)).any(axis=-1)


def overlong_penalty(lengths: np.ndarray, *, max_len: int, cache_len: int) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_len - cache_len tokens, then falling
  linearly to -1 at max_len (and -1 beyond). lengths [N] (output tokens, EOS included) -> [N] float32."""
  if not 0 < cache_len <= max_len:
    raise ValueError(f'cache_len must be in (0, max_len={max_len}], got {cache_len}')
  over = np.asarray(lengths, np.float32) - (max_len - cache_len)
  return np.clip(-over / cache_len, -1.0, 0.0).astype(np.float32)


def choose_groups(signal: list[np.ndarray], num_groups: int) -> tuple[list[tuple[int, int]], int]:
  """Dynamic sampling's pick (DAPO): from draws d = 0, 1, ... with signal[d] [P] bool (the group's rewards are not
  all equal), the first num_groups signal-carrying groups in draw order; if there are fewer, the rest filled with
  zero-signal groups, also in draw order. Returns ([(draw, group)] of length num_groups, how many were filled)."""
  carrying = [(d, g) for d, s in enumerate(signal) for g in np.flatnonzero(s)]
  rest = [(d, g) for d, s in enumerate(signal) for g in np.flatnonzero(~s)]
  picks = carrying[:num_groups]
  filled = num_groups - len(picks)
  if filled > len(rest):
    raise ValueError(f'{len(carrying) + len(rest)} groups drawn, fewer than num_groups={num_groups}')
  return [(int(d), int(g)) for d, g in picks + rest[:filled]], filled


def take_groups(rollouts: list[Rollout], picks: list[tuple[int, int]], group_size: int) -> Rollout:
  """The Rollout made of groups picks [(draw, group)] of `rollouts`, in that order (each group's G rows contiguous,
  as every Rollout is), at the widest of their completion widths (narrower draws padded: trim.pad_columns)."""
  width = max(r.completion_mask.shape[1] for r in rollouts)
  rollouts = [Rollout(*r[:2], *pad_columns(r[2:], width)) for r in rollouts]
  rows = [(d, g * group_size + j) for d, g in picks for j in range(group_size)]
  return Rollout(*(np.stack([np.asarray(rollouts[d][k])[r] for d, r in rows]) for k in range(len(Rollout._fields))))


def dynamic_sampling(draw: Callable[[int], tuple[Rollout, dict, np.ndarray]], *, num_groups: int, group_size: int,
                     max_draws: int, advantage_fn: Callable) -> tuple[Rollout, dict[str, float]]:
  """DAPO's dynamic sampling with static shapes: draw(0) is the step's own rollout; while fewer than num_groups
  groups carry signal (rewards not all equal), draw(1), draw(2), ... up to draw(max_draws) (each the same shapes:
  nothing recompiles); then choose_groups picks the batch. draw(d) -> (Rollout, stats, rewards [P, G]), as
  collect_rollout(..., return_rewards=True). The advantages are recomputed by advantage_fn over the picked rewards
  [num_groups, G] (the same values for a per-group estimator; a batch-level one sees the final batch).

  Returns the batch and stats: dynamic_draws (extra draws made), dynamic_filled_frac (picked groups without
  signal: no gradient), sampled_tokens (completion tokens of every draw), sample_time (of every draw).
  """
  rollouts, rewards, times, tokens = [], [], [], 0
  for d in range(max_draws + 1):
    rollout, stats, group_rewards = draw(d)
    rollouts.append(rollout)
    rewards.append(np.asarray(group_rewards))
    times.append(stats['sample_time'])
    # From the stats, not the rollout: the loss mask may hide truncated outputs, which the sampler still decoded.
    tokens += stats['completion_len'] * rollout.completion_mask.shape[0]
    if sum(int(group_has_signal(r).sum()) for r in rewards) >= num_groups:
      break
  picks, filled = choose_groups([group_has_signal(r) for r in rewards], num_groups)
  batch = take_groups(rollouts, picks, group_size)
  picked_rewards = np.stack([rewards[d][g] for d, g in picks])  # [num_groups, G]
  batch = batch._replace(advantages=np.asarray(advantage_fn(picked_rewards)).reshape(-1))
  return batch, {'dynamic_draws': len(rollouts) - 1, 'dynamic_filled_frac': filled / num_groups,
                 'sampled_tokens': float(tokens), 'sample_time': float(sum(times))}


def group_has_signal(rewards: np.ndarray) -> np.ndarray:
  """[P, G] -> [P] bool: the group's G rewards are not all equal (a nonzero advantage somewhere)."""
  return rewards.max(axis=-1) > rewards.min(axis=-1)


def group_signal(rewards: np.ndarray, correct: np.ndarray) -> dict[str, float]:
  """How much learning signal a batch's groups carry. rewards, correct [P, G] (correct: the verifier's score, >= 1
  solved). reward_std_in_group: the mean within-group (population) std; frac_groups_no_signal: groups whose G
  rewards are all equal (zero advantage for every token); pass_at_g: groups where any of the G outputs is correct."""
  spread = rewards.std(axis=-1)
  return {'reward_std_in_group': float(spread.mean()), 'frac_groups_no_signal': float((spread == 0).mean()),
          'pass_at_g': float((correct >= 1).any(axis=-1).mean())}


def step_rewards(tokens: np.ndarray, mask: np.ndarray, prompts: TokenizedSplit, tokenizer, *, group_size: int,
                 step_verifier: StepVerifier, delimiter_ids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each output's steps and the step verifier's reward of each: (rewards, step_ends, step_mask), [N, S].

  tokens, mask [N, c]: completions of `prompts` (G = group_size each, contiguous). A step ends at each token holding
  the delimiter (rollout/steps.py); the verifier reads the decoded text of each step."""
  ends, step_mask = step_boundaries(tokens, mask, delimiter_ids)  # [N, S]
  prompt_texts = decode(tokenizer, prompts.prompt_tokens, prompts.prompt_mask)
  rewards = np.zeros(ends.shape, np.float32)
  for n in range(tokens.shape[0]):
    texts = step_texts(tokenizer, tokens[n], ends[n], step_mask[n])
    rewards[n, :len(texts)] = step_verifier(prompt_texts[n // group_size], texts, prompts.answers[n // group_size])
  return rewards, ends, step_mask


def process_supervision(rollout: Rollout, prompts: TokenizedSplit, tokenizer, *, group_size: int,
                        step_verifier: StepVerifier, delimiter_ids: np.ndarray, step_scores: Callable | None = None
                        ) -> tuple[Rollout, dict[str, float]]:
  """The rollout with per-token process-supervision advantages [N, c] (DeepSeekMath 4.1.3) in place of the
  outcome ones: each output is split into steps at tokens holding the delimiter (none: one step), the step
  verifier scores each step (or, given step_scores(prompt_tokens, prompt_mask, completion_tokens, completion_mask,
  step_ends) -> [N, S], a process reward model does), and core.advantages.process_advantages normalizes the step
  rewards over the group's steps and sums, for each token, those of the steps ending at or after it. Also step
  statistics (step_reward is always the verifier's, for the logs)."""
  tokens, mask = np.asarray(rollout.completion_tokens), np.asarray(rollout.completion_mask)
  rewards, ends, step_mask = step_rewards(tokens, mask, prompts, tokenizer, group_size=group_size,
                                          step_verifier=step_verifier, delimiter_ids=delimiter_ids)
  verified = rewards
  if step_scores is not None:  # a process reward model's, in place of the verifier's
    rewards = np.where(step_mask > 0, step_scores(rollout.prompt_tokens, rollout.prompt_mask, tokens, mask, ends),
                       0.0).astype(np.float32)
  shape = (-1, group_size, ends.shape[1])
  advantages = process_advantages(rewards.reshape(shape), ends.reshape(shape), step_mask.reshape(shape),
                                  num_tokens=tokens.shape[1]).reshape(tokens.shape[0], -1)
  real = step_mask.astype(bool)
  stats = {'steps_per_output': float(real.sum(1).mean()), 'step_reward': float(verified[real].mean()),
           'delimiters': int(np.isin(tokens, delimiter_ids)[mask.astype(bool)].sum())}
  if step_scores is not None:
    stats['prm_step_score'] = float(rewards[real].mean())
    stats['prm_step_agreement'] = float(((rewards > 0.5) == (verified > 0.5))[real].mean())
  return rollout._replace(advantages=np.asarray(advantages)), stats
