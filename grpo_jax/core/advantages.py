"""Rewards -> advantages. GRPO replaces PPO's value function with the group baseline.

Pick an outcome estimator by name (`config.rl.advantage`) from `ADVANTAGES`; add an ablation by adding an entry.
`process_advantages` is the paper's process-supervision variant (per-step rewards, per-token advantages);
the trainer does not call it yet, since no step-level reward exists for the embedded task.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, *, scale_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """Outcome-supervision advantage of DeepSeekMath eq. (3 ff.): (r_i - mean(r)) / std(r) within a group.

  Args:
    rewards: [num_prompts, G] one scalar reward per sampled output.
    scale_by_std: divide by the group std (the paper); False gives the plain group-mean baseline
      (Dr. GRPO's fix for the difficulty bias of the std scaling).
    eps: added to the std so groups with identical rewards get zero advantage instead of NaN.
  Returns:
    [num_prompts, G] advantage of every token of output i (broadcast over time by the loss).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  centered = rewards - rewards.mean(axis=-1, keepdims=True)
  if scale_by_std:
    centered = centered / (rewards.std(axis=-1, keepdims=True) + eps)
  return centered


def process_advantages(step_rewards: jax.Array, step_ends: jax.Array, step_mask: jax.Array, *, num_tokens: int,
                       eps: float = 1e-6) -> jax.Array:
  """Process-supervision advantage (DeepSeekMath 4.1.3): step rewards normalized over the whole group, and
  each token's advantage is the sum of the normalized rewards of the steps that end at or after it.

  Args:
    step_rewards: [num_prompts, G, S] reward of each reasoning step (S = the most steps of any output).
    step_ends: [num_prompts, G, S] int, index (in completion tokens) of each step's last token.
    step_mask: [num_prompts, G, S] 1 for real steps, 0 for padding.
    num_tokens: T, the completion length of the returned advantages.
  Returns:
    [num_prompts, G, T] per-token advantages (reshape to [num_prompts * G, T] for `grpo_loss`).
  """
  mask = jnp.asarray(step_mask, jnp.float32)
  rewards = jnp.asarray(step_rewards, jnp.float32)
  count = jnp.maximum(mask.sum(axis=(1, 2), keepdims=True), 1.0)  # all steps of all G outputs of a prompt
  mean = (rewards * mask).sum(axis=(1, 2), keepdims=True) / count
  std = jnp.sqrt((jnp.square(rewards - mean) * mask).sum(axis=(1, 2), keepdims=True) / count)
  normalized = (rewards - mean) / (std + eps) * mask
  at_or_after = jnp.asarray(step_ends)[..., None] >= jnp.arange(num_tokens)  # [P, G, S, T]
  return jnp.einsum('pgs,pgst->pgt', normalized, at_or_after.astype(jnp.float32))


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    'grpo': group_advantages,
    'group_mean': lambda rewards, **kw: group_advantages(rewards, scale_by_std=False, **kw),
}


def get_advantage_fn(name: str) -> Callable[..., jax.Array]:
  if name not in ADVANTAGES:
    raise ValueError(f'unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}')
  return ADVANTAGES[name]
