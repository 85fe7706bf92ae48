"""Token credit by prefix resampling: freeze each sampled output after a few of its tokens, sample K continuations
from each such prefix, and take their mean reward as the prefix's value; each segment between consecutive cuts is
credited with the change in value across it (core.advantages.prefix_value_advantages).

A cut is a fraction f of an output's own length L (EOS included): the prefix keeps floor(f * L) tokens, so with f < 1
it never holds the EOS and a continuation always has at least one token of budget. Continuation prompts are
prompt ++ prefix, left-padded to the fixed width p + c, so every cut of every output goes through one sampler call
(one compile: the same shape every step). The sampler decodes up to c new tokens; a continuation keeps only the
first c - cut of them, so prefix + continuation fits the completion budget c the outputs had.

`prefix_credit` replaces a rollout's outcome advantages by these per-token ones [N, c], as
rollout.process_supervision does with step rewards.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from grpo_jax.core.advantages import prefix_value_advantages
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import decode
from grpo_jax.rewards.registry import RewardFn, score
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.trim import pad_columns


def cut_positions(mask: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
  """Prefix lengths [N, J] = floor(f_j * L_i) for outputs of lengths L_i = mask.sum (mask [N, c]); fractions in
  (0, 1), increasing, so each row is non-decreasing and below L_i (0 for an empty output)."""
  lengths = np.asarray(mask).sum(axis=-1)
  return np.floor(lengths[:, None] * np.asarray(fractions, np.float64)[None, :]).astype(np.int32)


def continuation_prompts(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completion_tokens: np.ndarray,
                         cuts: np.ndarray, *, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """prompt ++ completion[:cut], left-padded to p + c, for every output and cut: ([N * J, p + c] tokens, mask).

  prompt_tokens, prompt_mask [N, p] (left-padded); completion_tokens [N, c]; cuts [N, J]. Row n * J + j is output
  n cut after cuts[n, j] tokens. Left-padding keeps each row's positions (counted from its first real token) those
  the output's tokens had when it was sampled.
  """
  n, j = cuts.shape
  c = completion_tokens.shape[1]
  tokens = np.concatenate([prompt_tokens, completion_tokens], axis=1)  # [N, p + c]
  keep = np.concatenate([np.broadcast_to(prompt_mask.astype(bool)[:, None], (n, j, prompt_mask.shape[1])),
                         np.arange(c) < cuts[..., None]], axis=-1)  # [N, J, p + c]
  # A stable sort on "kept" moves each row's kept tokens to its end in their order: left-padding.
  order = np.argsort(keep, axis=-1, kind='stable')
  keep = np.take_along_axis(keep, order, axis=-1)
  out = np.take_along_axis(np.broadcast_to(tokens[:, None], keep.shape), order, axis=-1)
  out = np.where(keep, out, pad_id).astype(np.int32)
  return out.reshape(n * j, -1), keep.astype(np.int32).reshape(n * j, -1)


def join_continuations(completion_tokens: np.ndarray, cuts: np.ndarray, tokens: np.ndarray, mask: np.ndarray, *,
                       pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Each prefix followed by its continuations, cut to the completion budget c: ([N * J * K, c] tokens, mask).

  completion_tokens [N, c]; cuts [N, J]; tokens, mask [N * J * K, c']: the sampler's continuations, K per prefix,
  prefixes in continuation_prompts' order. Row (n * J + j) * K + k holds completion n's first cuts[n, j] tokens then
  continuation k's first c - cuts[n, j].
  """
  n, c = completion_tokens.shape
  k = tokens.shape[0] // cuts.size
  cut = np.repeat(cuts.reshape(-1), k)[:, None]  # [N * J * K, 1]
  source = np.repeat(completion_tokens, cuts.shape[1] * k, axis=0)  # [N * J * K, c]
  t = np.arange(c)[None, :]
  after = np.clip(t - cut, 0, tokens.shape[1] - 1)  # index into the continuation
  in_range = (t - cut) < tokens.shape[1]
  joined = np.where(t < cut, source, np.take_along_axis(tokens, after, axis=1))
  joined_mask = np.where(t < cut, 1, np.take_along_axis(mask, after, axis=1) * in_range)
  return np.where(joined_mask > 0, joined, pad_id).astype(np.int32), joined_mask.astype(np.int32)


def prefix_credit(rollout: Rollout, prompts: TokenizedSplit, sampler: Callable, params, rng: jax.Array, *,
                  group_size: int, continuations: int, cut_fractions: Sequence[float], tokenizer, reward_fn: RewardFn,
                  scale: str = 'group', max_len: int | None = None) -> tuple[Rollout, dict[str, float]]:
  """The rollout with per-token prefix-value advantages [N, c] in place of its outcome ones, and statistics.

  sampler(params, prompt_tokens [N * J, p + c], prompt_mask, rng) -> Completions [N * J * K, c]: K continuations
  per prompt, from the policy that sampled the rollout (pi_old = params). Each output's and each joined prefix +
  continuation's text is scored by reward_fn against its prompt's answer; a prefix's value is its K continuations'
  mean reward. scale: core.advantages.prefix_value_advantages's.
  Stats: prefix_continuation_tokens (continuation tokens kept, within the budget; the rollout's own are
  completion_len x N), prefix_value_change (mean |V_{s+1} - V_s| over segments, unscaled), prefix_value_first (mean
  value at the first cut), prefix_truncated (fraction of continuations cut by the budget), prefix_sample_time; and
  the continuation sampling's shape (prefix_prompts, prefix_prompt_len, prefix_decode_len) for its FLOPs.
  max_len: the output budget (max_new_tokens) a prefix + continuation must fit; default the rollout's width (which
  is narrower when the batch was cut to a length bucket: rollout/trim.py).
  """
  tokens, mask = np.asarray(rollout.completion_tokens), np.asarray(rollout.completion_mask)
  n, c = tokens.shape
  pad_id = tokenizer.pad_token_id
  cuts = cut_positions(mask, cut_fractions)  # [N, J]
  num_cuts = cuts.shape[1]
  prompt_tokens, prompt_mask = continuation_prompts(np.asarray(rollout.prompt_tokens),
                                                    np.asarray(rollout.prompt_mask), tokens, cuts, pad_id=pad_id)
  start = time.perf_counter()
  out = jax.block_until_ready(sampler(params, prompt_tokens, prompt_mask, rng))
  sample_time = time.perf_counter() - start
  cont_tokens, cont_mask = np.asarray(out.tokens), np.asarray(out.mask)
  if cont_tokens.shape[0] != n * num_cuts * continuations:
    raise ValueError(f'the continuation sampler returned {cont_tokens.shape[0]} rows for {n * num_cuts} prefixes x '
                     f'K={continuations}; build it with make_sampler(..., group_size=K)')
  budget_tokens = tokens if max_len is None else pad_columns([tokens], max_len)[0]
  joined, joined_mask = join_continuations(budget_tokens, cuts, cont_tokens, cont_mask, pad_id=pad_id)
  answers = [prompts.answers[i // group_size] for i in range(n)]
  texts = decode(tokenizer, tokens, mask) + decode(tokenizer, joined, joined_mask)
  scores, _ = score(reward_fn, texts, answers + [a for a in answers for _ in range(num_cuts * continuations)])
  rewards, values = scores[:n], scores[n:].reshape(n, num_cuts, continuations).mean(axis=-1)  # [N], [N, J]
  shape = (-1, group_size)
  advantages = prefix_value_advantages(rewards.reshape(shape), values.reshape(*shape, num_cuts),
                                       cuts.reshape(*shape, num_cuts), mask.reshape(*shape, c), scale=scale)
  chain = np.concatenate([np.repeat(rewards.reshape(shape).mean(-1), group_size)[:, None], values, rewards[:, None]],
                         axis=1)  # [N, J + 2]
  kept = joined_mask.sum(axis=1) - np.repeat(cuts.reshape(-1), continuations)  # continuation tokens within budget
  budget = budget_tokens.shape[1] - np.repeat(cuts.reshape(-1), continuations)
  stats = {'prefix_continuation_tokens': int(kept.sum()),
           'prefix_value_change': float(np.abs(np.diff(chain, axis=1)).mean()),
           'prefix_value_first': float(values[:, 0].mean()) if num_cuts else float('nan'),
           'prefix_truncated': float((cont_mask.sum(axis=1) > budget).mean()),
           'prefix_sample_time': sample_time,
           'prefix_decode_len': int(cont_mask.sum(axis=1).max()),  # decode steps the sampler ran (the logged FLOPs)
           'prefix_prompts': int(prompt_tokens.shape[0]), 'prefix_prompt_len': int(prompt_tokens.shape[1])}
  return rollout._replace(advantages=np.asarray(advantages).reshape(n, c)), stats
