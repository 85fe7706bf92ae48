"""Generalized advantage estimation (Schulman et al. 2016) for the PPO baseline: a reverse scan over time."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Per-token advantages and returns by GAE(gamma, lambda).

  For each output, over its valid tokens t = 0 .. L-1 (L = mask[i].sum()):

    delta_t = r_t + gamma * V_{t+1} - V_t,                 V_L = 0 (the episode ends after the last token)
    A_t     = delta_t + gamma * lam * A_{t+1},             A_L = 0
    R_t     = A_t + V_t                                    (the critic's regression target)

  Padded positions (mask 0) have A = R = 0, and their rewards and values never reach a valid position.

  Args:
    rewards: [N, T] per-token reward (e.g. the outcome reward on the last valid token, minus a per-token KL
      penalty).
    values: [N, T] the critic's value of each token's state.
    mask: [N, T] 1 for an output's tokens, 0 for padding; right-padded (an output's valid tokens come first).
    gamma: discount.
    lam: GAE's lambda (1 = Monte-Carlo return minus the value, 0 = one-step TD error).
  Returns:
    (advantages, returns), both [N, T] float32.
  """
  mask = jnp.asarray(mask, jnp.float32)
  rewards = jnp.asarray(rewards, jnp.float32) * mask
  values = jnp.asarray(values, jnp.float32) * mask

  def step(carry, xs):
    next_value, next_advantage = carry  # both 0 past an output's last valid token
    reward, value, m = xs
    delta = reward + gamma * next_value - value
    # Inputs are zeroed past an output's end, so padding carries (0, 0) back and the last valid token sees V_L = 0,
    # A_L = 0. The `* m` also zeroes a gap inside a mask (not right-padded), which then ends an episode.
    advantage = (delta + gamma * lam * next_advantage) * m
    return (value, advantage), advantage

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  # Scan over time (axis 0 after the transpose), from the last token back.
  _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  advantages = advantages.T
  return advantages, (advantages + values) * mask
