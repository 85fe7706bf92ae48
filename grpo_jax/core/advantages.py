"""Rewards -> advantages. GRPO replaces PPO's value function with the group baseline.

Pick an outcome estimator by name (`config.rl.advantage`) from `ADVANTAGES`; add an ablation by adding an entry:
  'grpo'        (r - group mean) / group std (the paper)
  'group_mean'  r - group mean (no std scaling: Dr. GRPO)
  'batch_std'   (r - group mean) / std of all the batch's rewards (group baseline, batch-wide scale)
`process_advantages` is the paper's process-supervision variant (per-step rewards, per-token advantages);
`prefix_value_advantages` credits segments of each output with the change in a Monte Carlo value of its prefixes.

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


PREFIX_SCALES = ('group', 'batch', 'none')
# config.rl.advantage -> the prefix_value_advantages scale that reduces to it without cuts
PREFIX_SCALE_OF = {'grpo': 'group', 'batch_std': 'batch', 'group_mean': 'none'}


def prefix_value_advantages(rewards: jax.Array, values: jax.Array, cuts: jax.Array, mask: jax.Array, *,
                            scale: str = 'group', eps: float = 1e-6) -> jax.Array:
  """Per-token credit from prefix values: each segment between consecutive cut points gets the change in value.

  Output i of a group is cut after cuts[i, 0] <= ... <= cuts[i, J-1] tokens; V_j is the value of its prefix at cut j
  (an estimate of the expected reward of finishing it: the mean reward of continuations sampled from it). With
  V_0 = the group's mean reward (the empty prefix) and V_{J+1} = r_i (the whole output), token t gets
  V_{s+1} - V_s for the segment s = #{j : cuts[i, j] <= t} holding it, i.e. tokens [cut_s, cut_{s+1}). The
  segments' changes add up to r_i - mean(r): the group-mean outcome advantage, redistributed over the output.

  Args:
    rewards: [num_prompts, G] each output's reward r_i.
    values: [num_prompts, G, J] the value estimate of each output's prefix at each cut.
    cuts: [num_prompts, G, J] int, prefix lengths in completion tokens, non-decreasing along J.
    mask: [num_prompts, G, T] 1 on completion tokens.
    scale: what the changes are divided by (+ eps): 'group' the population std of the group's value estimates (its G
      rewards and G x J prefix values), 'batch' the same over the whole batch, 'none' nothing. Without cuts (J = 0)
      these are the outcome estimators 'grpo', 'batch_std' and 'group_mean' broadcast over tokens. The values are
      in the std so a group whose G rewards tie still gets finite credit where its prefixes' values differ.
  Returns:
    [num_prompts, G, T] per-token advantages, 0 on padding.
  """
  if scale not in PREFIX_SCALES:
    raise ValueError(f'unknown prefix-value scale {scale!r}; known: {PREFIX_SCALES}')
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  num_tokens = mask.shape[-1]
  baseline = jnp.broadcast_to(rewards.mean(axis=-1, keepdims=True)[..., None], (*rewards.shape, 1))
  chain = jnp.concatenate([baseline, values, rewards[..., None]], axis=-1)  # [P, G, J + 2]: V_0 .. V_{J+1}
  changes = jnp.diff(chain, axis=-1)  # [P, G, J + 1], segment s gets V_{s+1} - V_s
  if scale != 'none':
    estimates = jnp.concatenate([values, rewards[..., None]], axis=-1).reshape(rewards.shape[0], -1)
    std = estimates.std(axis=-1) if scale == 'group' else jnp.broadcast_to(estimates.std(), rewards.shape[:1])
    changes = changes / (std[:, None, None] + eps)
  segment = (jnp.asarray(cuts)[..., None] <= jnp.arange(num_tokens)).sum(axis=-2)  # [P, G, T]
  return jnp.take_along_axis(changes, segment, axis=-1) * jnp.asarray(mask, jnp.float32)


ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    'grpo': group_advantages,
    'group_mean': lambda rewards, **kw: group_advantages(rewards, scale_by_std=False, **kw),
    'batch_std': batch_std_advantages,
}


def get_advantage_fn(name: str) -> Callable[..., jax.Array]:
  if name not in ADVANTAGES:
    raise ValueError(f'unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}')
  return ADVANTAGES[name]
