"""The PPO baseline's value-side math: per-token rewards (outcome + KL-in-reward), the clipped value loss, masked
advantage whitening and the critic's explained variance. All [N, T] arrays with a 0/1 mask; padding is ignored.
GAE itself is core/gae.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.core.gae import gae


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def token_rewards(outcome: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, *,
                  beta: float | jax.Array) -> jax.Array:
  """RLHF PPO's per-token reward: r_t = -beta * (log pi_old(o_t) - log pi_ref(o_t)) at every valid token, plus the
  output's outcome reward at its last valid token.

  Args:
    outcome: [N] one reward per output.
    old_logprobs, ref_logprobs: [N, T] log-probabilities of the sampled tokens under pi_old and the reference.
    mask: [N, T] 1 on an output's tokens, 0 on padding (right-padded).
    beta: the KL coefficient (0: the outcome reward alone).
  Returns:
    [N, T] float32, 0 on padding. An empty output (no valid token) gets no reward.
  """
  mask = jnp.asarray(mask, jnp.float32)
  t = jnp.arange(mask.shape[1])
  length = mask.sum(axis=1).astype(jnp.int32)  # [N]
  last = (t[None, :] == (length - 1)[:, None]).astype(jnp.float32) * mask  # [N, T] one-hot at the last valid token
  kl = jnp.where(mask > 0, jnp.asarray(old_logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32), 0.0)
  return (jnp.asarray(outcome, jnp.float32)[:, None] * last - beta * kl) * mask


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
               clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped value loss, a masked mean over tokens of

    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)

  so the critic gains nothing from moving a value more than eps from the one the advantages were computed with.

  Args:
    values: [N, T] the critic's current values (differentiated).
    old_values: [N, T] its values at rollout time (constant).
    returns: [N, T] GAE's returns, the regression targets (constant).
    mask: [N, T] 1 on valid tokens.
    clip_eps: eps; 0 leaves the clipped value equal to V_old.
  Returns:
    (loss, {'value_loss', 'value_clip_frac': the tokens whose clipped error is the larger (their gradient is 0)}).
  """
  mask = jnp.asarray(mask, jnp.float32)
  old_values = jax.lax.stop_gradient(jnp.where(mask > 0, old_values, 0.0))
  returns = jax.lax.stop_gradient(jnp.where(mask > 0, returns, 0.0))
  values = jnp.where(mask > 0, values, 0.0)
  clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
  loss = 0.5 * _masked_mean(jnp.maximum(unclipped_err, clipped_err), mask)
  clip_frac = _masked_mean((clipped_err > unclipped_err).astype(jnp.float32), mask)
  return loss, {'value_loss': loss, 'value_clip_frac': clip_frac}


def whiten(x: jax.Array, mask: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / (std + eps) with mean and (population) std over the valid tokens of the whole batch; 0 on
  padding. x, mask: [N, T]."""
  mask = jnp.asarray(mask, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  mean = _masked_mean(x, mask)
  std = jnp.sqrt(_masked_mean((x - mean) ** 2, mask))
  return (x - mean) / (std + eps) * mask


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var(R - V) / Var(R) over the valid tokens (1: the critic predicts the returns; 0: no better than their
  mean; negative: worse). nan when the returns do not vary. values, returns, mask: [N, T]."""
  mask = jnp.asarray(mask, jnp.float32)
  values, returns = jnp.asarray(values, jnp.float32), jnp.asarray(returns, jnp.float32)

  def var(x):
    return _masked_mean((x - _masked_mean(x, mask)) ** 2, mask)

  total = var(returns)
  return jnp.where(total > 0, 1.0 - var(returns - values) / jnp.where(total > 0, total, 1.0), jnp.nan)


def ppo_advantages(outcome: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, values: jax.Array,
                   mask: jax.Array, *, beta: float | jax.Array, gamma: float, lam: float,
                   whiten_advantages: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A PPO rollout's per-token advantages: token_rewards, then GAE(gamma, lambda) on the critic's values, then
  (whiten_advantages) masked whitening. outcome [N]; the rest [N, T].

  Returns (advantages, returns, raw advantages before whitening), each [N, T], 0 on padding.
  """
  rewards = token_rewards(outcome, old_logprobs, ref_logprobs, mask, beta=beta)
  raw, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
  return (whiten(raw, mask) if whiten_advantages else raw), returns, raw
