"""The GRPO objective (DeepSeekMath eq. 3) as a pure function of per-token arrays."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.core.kl import get_kl_fn


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, clip_eps: float = 0.2, beta: float = 0.04, kl_estimator: str = 'k3'
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative clipped surrogate with a KL penalty, averaged per output then over outputs.

  Per token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL, ratio = exp(logprobs - old).
  The objective is (1/N) sum_i (1/|o_i|) sum_t [that], N = num_prompts * G; the loss is its negative.

  Args:
    logprobs: [N, T] log pi_theta of the sampled tokens (differentiated).
    old_logprobs: [N, T] log pi_old (the sampling policy; constant).
    ref_logprobs: [N, T] log pi_ref (the frozen reference; constant).
    advantages: [N] one per output (outcome supervision) or [N, T] per token (process supervision).
    mask: [N, T] 1 on completion tokens, 0 on padding.
    clip_eps: epsilon of the ratio clip.
    beta: weight of the KL penalty; 0 skips it.
    kl_estimator: 'k1', 'k2' or 'k3' (see kl.py).
  Returns:
    (scalar loss, metrics dict of scalars).
  """
  valid = mask.astype(bool)
  mask = mask.astype(jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  # Zero the padded slots before any exp: there a garbage logprob could overflow, and inf * 0 is NaN.
  logprobs = jnp.where(valid, logprobs, 0.0)
  old_logprobs = jnp.where(valid, jax.lax.stop_gradient(old_logprobs), 0.0)
  ref_logprobs = jnp.where(valid, jax.lax.stop_gradient(ref_logprobs), 0.0)
  advantages = jax.lax.stop_gradient(advantages)

  ratio = jnp.exp(logprobs - old_logprobs)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  per_token = jnp.minimum(unclipped, clipped)
  kl = get_kl_fn(kl_estimator)(logprobs, ref_logprobs)
  if beta:
    per_token = per_token - beta * kl

  lengths = jnp.maximum(mask.sum(axis=-1), 1.0)  # |o_i|; an empty output contributes 0
  per_output = (per_token * mask).sum(axis=-1) / lengths
  loss = -per_output.mean()

  num_tokens = jnp.maximum(mask.sum(), 1.0)
  token_mean = lambda x: (x * mask).sum() / num_tokens  # noqa: E731
  metrics = {
      'loss': loss,
      'kl': token_mean(kl),
      'ratio': token_mean(ratio),
      # Tokens whose gradient the clip zeroed: the clipped term won the min.
      'clip_frac': token_mean((clipped < unclipped).astype(jnp.float32)),
  }
  return loss, metrics
