"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, 2020).

With r = pi_ref / pi_theta = exp(ref_logprobs - logprobs):
  k1 = -log r                  unbiased, high variance, can be negative
  k2 = (log r)^2 / 2           biased, low variance
  k3 = r - log r - 1           unbiased, low variance, always >= 0 (DeepSeekMath eq. 4; the default)
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  return logprobs - ref_logprobs


def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  return 0.5 * jnp.square(ref_logprobs - logprobs)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  log_ratio = ref_logprobs - logprobs
  return jnp.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {'k1': kl_k1, 'k2': kl_k2, 'k3': kl_k3}


def get_kl_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if name not in KL_ESTIMATORS:
    raise ValueError(f'unknown KL estimator {name!r}; known: {sorted(KL_ESTIMATORS)}')
  return KL_ESTIMATORS[name]
