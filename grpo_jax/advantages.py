"""Rewards -> advantages. GRPO replaces PPO's value function with the group baseline.

Pick an estimator by name (`config.rl.advantage`) from `ADVANTAGES`; add an ablation by adding an entry.
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


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    'grpo': group_advantages,
    'group_mean': lambda rewards, **kw: group_advantages(rewards, scale_by_std=False, **kw),
}


def get_advantage_fn(name: str) -> Callable[..., jax.Array]:
  if name not in ADVANTAGES:
    raise ValueError(f'unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}')
  return ADVANTAGES[name]
