"""One GRPO iteration: rollout -> reward -> advantage -> mu epochs x minibatches of clipped updates.

The Python here only orchestrates; the math is in advantages.py, losses.py, kl.py and logprobs.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.core.logprobs import sequence_logprobs
from grpo_jax.core.losses import grpo_loss
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.pipeline.evaluate import decode
from grpo_jax.rewards.registry import RewardFn, score


class Rollout(NamedTuple):
  """One batch of experience, leading axis N = num_prompts * G with each group contiguous."""
  prompt_tokens: np.ndarray  # [N, p]
  prompt_mask: np.ndarray  # [N, p]
  completion_tokens: np.ndarray  # [N, c]
  completion_mask: np.ndarray  # [N, c]
  old_logprobs: np.ndarray  # [N, c] log pi_old (the sampler's)
  ref_logprobs: np.ndarray  # [N, c] log pi_ref; when beta == 0 no reference runs and this is old_logprobs
  advantages: np.ndarray  # [N]


def grpo_objective(model, rollout: Rollout, *, clip_eps: float, beta: float, kl_estimator: str,
                   logprob_chunk: int = 0, remat: str = 'none'):
  """Loss of the current policy on a (mini)batch of rollouts; also reports its token entropy.

  logprob_chunk and remat only trade compute for memory (logprobs.sequence_logprobs chunk_size, remat)."""
  logprobs, entropy = sequence_logprobs(model, rollout.prompt_tokens, rollout.prompt_mask,
                                        rollout.completion_tokens, rollout.completion_mask, return_entropy=True,
                                        chunk_size=logprob_chunk, remat=remat)
  loss, metrics = grpo_loss(logprobs, rollout.old_logprobs, rollout.ref_logprobs, rollout.advantages,
                            rollout.completion_mask, clip_eps=clip_eps, beta=beta, kl_estimator=kl_estimator)
  mask = rollout.completion_mask.astype(jnp.float32)
  metrics['entropy'] = (entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, metrics


def collect_rollout(sampler: Callable, ref_logprobs_fn: Callable | None, params, ref_params,
                    prompts: TokenizedSplit, rng: jax.Array, *, group_size: int, tokenizer, reward_fn: RewardFn,
                    advantage_fn: Callable, verifier: RewardFn | None = None) -> tuple[Rollout, dict[str, float]]:
  """Sample G outputs per prompt from pi_old = the current params, score them, compute advantages.

  `sampler(params, prompt_tokens [P, p], prompt_mask, rng)` must return G completions per prompt
  (`make_sampler(..., group_size=G)`), groups contiguous. `verifier` gives the logged accuracy (default:
  the reward itself).
  """
  start = time.perf_counter()
  out = jax.block_until_ready(sampler(params, prompts.prompt_tokens, prompts.prompt_mask, rng))
  sample_time = time.perf_counter() - start
  if out.tokens.shape[0] != len(prompts) * group_size:
    raise ValueError(f'sampler returned {out.tokens.shape[0]} rows for {len(prompts)} prompts x G={group_size}; '
                     'build it with make_sampler(..., group_size=G)')
  prompt_tokens = np.repeat(prompts.prompt_tokens, group_size, axis=0)  # [N, p], groups contiguous
  prompt_mask = np.repeat(prompts.prompt_mask, group_size, axis=0)
  # Host copies first: once a running computation reads a buffer, copying it to the host waits for that run.
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  # Dispatched before the rewards and fed the sampler's device arrays: the reference forward runs while the
  # host decodes and verifies, and the completions make no round trip through host memory to reach it.
  ref_logprobs = out.logprobs  # beta == 0: the logged 'kl' then measures the drift from pi_old
  if ref_logprobs_fn is not None:
    ref_logprobs = ref_logprobs_fn(ref_params, prompt_tokens, prompt_mask, out.tokens, out.mask)
  answers = [a for a in prompts.answers for _ in range(group_size)]
  texts = decode(tokenizer, tokens, mask)
  rewards, reward_failures = score(reward_fn, texts, answers)  # [N]
  correct = rewards if verifier is None else score(verifier, texts, answers)[0]
  advantages = advantage_fn(rewards.reshape(-1, group_size)).reshape(-1)  # on device: queued after the reference
  rollout = Rollout(prompt_tokens, prompt_mask, tokens, mask, out.logprobs, ref_logprobs, advantages)
  group_rewards = rewards.reshape(-1, group_size)
  stats = {
      'reward': float(rewards.mean()),
      'accuracy': float((correct >= 1).mean()),
      'reward_failures': reward_failures,  # verifier timeouts / errors, scored 0
      'reward_std_in_group': float(group_rewards.std(axis=-1).mean()),
      'frac_groups_no_signal': float((group_rewards.std(axis=-1) == 0).mean()),  # zero advantage everywhere
      'completion_len': float(mask.sum(axis=-1).mean()),
      'sample_time': sample_time,
      'sampled_tokens_per_s': float(mask.sum() / max(sample_time, 1e-9)),
  }
  return rollout, stats


def update(train_step: Callable, state, rollout: Rollout, rng: jax.Array, *, num_epochs: int,
           num_minibatches: int):
  """mu epochs over the rollout, each a fresh shuffle split into minibatches; pi_old stays fixed."""
  n = rollout.advantages.shape[0]
  all_metrics = []
  for epoch in range(num_epochs):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n))
    for idx in np.split(order, num_minibatches):
      state, metrics = train_step(state, Rollout(*(np.asarray(x)[idx] for x in rollout)))
      all_metrics.append(metrics)
  mean = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *all_metrics)
  return state, mean
