"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, 2020).

With r = pi_ref / pi_theta = exp(ref_logprobs - logprobs):
  k1 = -log r                  unbiased, high variance, can be negative
  k2 = (log r)^2 / 2           biased, low variance
  k3 = r - log r - 1           unbiased, low variance, always >= 0 (DeepSeekMath eq. 4; the default)
  k3_k2grad                    straight-through: k3's value, k2's gradient

"Unbiased" above is about the value. A loss differentiates the estimator through log pi_theta of the sampled
tokens only (the sampling distribution is not differentiated), so the gradient it follows in expectation over
tokens drawn from pi_theta is E_x[d k / d log pi(x) * grad log pi(x)], and with pi = pi_theta, q = pi_ref:
  k1: d k1 / d log pi = 1, and E_pi[grad log pi] = 0: the expected gradient is zero. The penalty does nothing
      on average; it only adds noise.
  k2: d k2 / d log pi = log(pi / q): E_pi[log(pi / q) grad log pi] = grad KL(pi || q). The unbiased gradient.
  k3: d k3 / d log pi = 1 - q / pi: E_pi[(1 - q / pi) grad log pi] = -E_q[grad log pi] = grad KL(q || pi), the
      gradient of the reverse KL: biased for KL(pi || q) (the two agree only to first order near pi = q).
  k3_k2grad: k3's value (unbiased, >= 0: what is logged and, in the reward, what is penalized) with k2's
      gradient (unbiased). tests/test_kl_exact.py checks all four on a tiny vocabulary.

exact_kl is the full-vocabulary value these estimate, for measuring; sequence_exact_kl gives it per token from two
models' forwards, chunked, for training ('exact' in the loss: core/losses.LossConfig).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from grpo_jax.core.logprobs import positions_from_mask


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  return logprobs - ref_logprobs


def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  return 0.5 * jnp.square(ref_logprobs - logprobs)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  log_ratio = ref_logprobs - logprobs
  return jnp.exp(log_ratio) - log_ratio - 1.0


def kl_k3_k2grad(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """k3's value with k2's gradient (straight-through): k2 + stop_gradient(k3 - k2). [...] -> [...]."""
  k2 = kl_k2(logprobs, ref_logprobs)
  return k2 + jax.lax.stop_gradient(kl_k3(logprobs, ref_logprobs) - k2)


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'k1': kl_k1, 'k2': kl_k2, 'k3': kl_k3, 'k3_k2grad': kl_k3_k2grad}


# The loss's KL choices: the per-token estimators, or the exact full-vocabulary KL (which needs both models' logits).
KL_CHOICES = (*KL_ESTIMATORS, 'exact')


def get_kl_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if name not in KL_ESTIMATORS:
    raise ValueError(f'unknown KL estimator {name!r}; known: {sorted(KL_ESTIMATORS)}')
  return KL_ESTIMATORS[name]


def exact_kl(logits: jax.Array, ref_logits: jax.Array, mask: jax.Array) -> jax.Array:
  """KL(softmax(logits) || softmax(ref_logits)) summed over the vocabulary, averaged over real tokens.

  Args:
    logits: [N, T, V] the policy's logits (any float dtype; computed in float32).
    ref_logits: [N, T, V] the reference's logits at the same positions.
    mask: [N, T] 1 for real tokens, 0 for padding.
  Returns:
    scalar float32: mean over masked-in positions of sum_v p log(p / q); 0 when no position is real.
  """
  per_token = token_exact_kl(logits, ref_logits)  # [N, T]
  mask = mask.astype(bool)
  # where, not a product: padding's logits need not be finite, and nan * 0 is nan.
  total = jnp.sum(jnp.where(mask, per_token, 0.0))
  return total / jnp.maximum(mask.sum(), 1).astype(jnp.float32)


def token_exact_kl(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """sum_v p log(p / q) at each position, p = softmax(logits), q = softmax(ref_logits): [..., V] -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  # 0 log(0 / q) = 0: without the where, a -inf policy logit facing a -inf reference one gives 0 * nan.
  return jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)


def sequence_exact_kl(model, ref_model, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      completion_tokens: jax.Array, completion_mask: jax.Array, *, chunk_size: int = 0,
                      remat: str = 'none') -> jax.Array:
  """The exact KL(pi_model || pi_ref_model) over the vocabulary at each completion position: [b, c] float32,
  differentiable in `model` (the reference is constant). The conditionals are sequence_logprobs' (core/logprobs).

  Both models as in sequence_logprobs (model(tokens, positions, mask) -> logits; hidden_states /
  logits_from_hidden). chunk_size > 0: both LM heads run over that many positions at a time, each chunk recomputed
  in the backward pass, so at most two [b, chunk_size, V] float32 logits exist at once; 0: all positions at once.
  """
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
  positions = positions_from_mask(mask)
  p = prompt_tokens.shape[1]
  if not chunk_size:  # slot j's logits predict the token at slot j + 1
    logits = model(tokens, positions, mask, remat=remat)[:, p - 1:-1]
    return token_exact_kl(logits, jax.lax.stop_gradient(ref_model(tokens, positions, mask)[:, p - 1:-1]))
  hidden = model.hidden_states(tokens, positions, mask, remat=remat)[:, p - 1:-1]  # [b, c, d]
  ref_hidden = jax.lax.stop_gradient(ref_model.hidden_states(tokens, positions, mask)[:, p - 1:-1])
  b, c, d = hidden.shape
  n = -(-c // chunk_size)
  chunks = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk_size - c), (0, 0))).reshape(  # noqa: E731
      b, n, chunk_size, -1).swapaxes(0, 1)  # [n, b, chunk_size, d]

  @jax.checkpoint  # else the scan's backward keeps every chunk's logits
  def one_chunk(xs):
    return token_exact_kl(model.logits_from_hidden(xs[0]), ref_model.logits_from_hidden(xs[1]))

  per_token = jax.lax.map(one_chunk, (chunks(hidden), chunks(ref_hidden)))  # [n, b, chunk_size]
  return per_token.swapaxes(0, 1).reshape(b, n * chunk_size)[:, :c]


def adaptive_kl_beta(beta: jax.Array, kl: jax.Array, *, target: float, horizon: float, batch_size: int,
                     max_error: float = 0.2) -> jax.Array:
  """One step of the proportional KL controller of Ziegler et al. 2019 (arXiv:1909.08593, eq. 2):

    error = clip(kl / target - 1, -max_error, max_error);  beta <- beta * (1 + error * batch_size / horizon)

  beta grows while the measured KL is above `target` and shrinks while below, by at most max_error *
  batch_size / horizon per step; horizon (in samples) sets how fast. Scalars in, scalar out (jax or numpy).
  """
  error = jnp.clip(kl / target - 1.0, -max_error, max_error)
  return beta * (1.0 + error * batch_size / horizon)
