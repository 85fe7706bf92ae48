"""Rewards -> advantages. GRPO replaces PPO's value function with the group baseline.

Pick an outcome estimator by name (`config.rl.advantage`) from `ADVANTAGES`; add an ablation by adding an entry:
  'grpo'        (r - group mean) / group std (the paper)
  'group_mean'  r - group mean (no std scaling: Dr. GRPO)
  'batch_std'   (r - group mean) / std of all the batch's rewards (group baseline, batch-wide scale)
`process_advantages` is the paper's process-supervision variant (per-step rewards, per-token advantages).

Every std here is the population std (ddof=0, numpy's and jnp's default), not the sample std (ddof=1). With
ddof=0 a group's std-scaled advantages have mean square exactly 1 whatever G; ddof=1 would make them smaller by
sqrt((G - 1) / G): 0.71 at G = 2, 0.87 at G = 4, 0.97 at G = 16. For a fixed G that is one constant factor on the
policy-gradient term: it moves that term's weight against the KL penalty and the entropy bonus (Adam is nearly
blind to a constant scale of the whole gradient), and it is largest at the small G of ablations and G sweeps,
where comparing runs across G would otherwise mix in a G-dependent scale: at G = 2 a group with one correct
output gets advantages +-1 with ddof=0, +-0.71 with ddof=1.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, *, scale_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """Outcome-supervision advantage of DeepSeekMath eq. (3 ff.): (r_i - mean(r)) / std(r) within a group.

  Args:
    rewards: [num_prompts, G] one scalar reward per sampled output.
    scale_by_std: divide by the group's population std (ddof=0, see the module docstring; the paper); False
      gives the plain group-mean baseline (Dr. GRPO's fix for the difficulty bias of the std scaling).
    eps: added to the std so groups with identical rewards get zero advantage instead of NaN.
  Returns:
    [num_prompts, G] advantage of every token of output i (broadcast over time by the loss).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  centered = rewards - rewards.mean(axis=-1, keepdims=True)
  if scale_by_std:
    centered = centered / (rewards.std(axis=-1, keepdims=True) + eps)
  return centered


def batch_std_advantages(rewards: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """Group-mean baseline scaled by the batch's std: (r_i - mean of r_i's group) / (std of all rewards + eps).

  The group std of 'grpo' gives a group whose outputs barely differ (all but one wrong) as large advantages as
  an evenly split one (Dr. GRPO's difficulty bias); one scale for the whole batch keeps the groups' relative
  weights while still normalizing the reward's units.

  Args:
    rewards: [num_prompts, G] one scalar reward per sampled output.
    eps: added to the std, so a batch of identical rewards gets zero advantage instead of NaN.
  Returns:
    [num_prompts, G]. The std is the population std (ddof=0) over all num_prompts * G rewards, about the batch
    mean; with many rows the ddof hardly matters here, unlike the group std.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  return (rewards - rewards.mean(axis=-1, keepdims=True)) / (rewards.std() + eps)


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
    'batch_std': batch_std_advantages,
}


def get_advantage_fn(name: str) -> Callable[..., jax.Array]:
  if name not in ADVANTAGES:
    raise ValueError(f'unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}')
  return ADVANTAGES[name]
