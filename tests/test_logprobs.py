"""Tests for grpo_jax.logprobs.token_logprobs and token_entropy against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import logprobs

# Jitted: one compile per shape instead of one per primitive (op-by-op dispatch is slow to warm up on CPU).
token_logprobs = jax.jit(logprobs.token_logprobs)
token_entropy = jax.jit(logprobs.token_entropy)


def _np_log_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_token_logprobs(logits, tokens):
  logp = _np_log_softmax(logits)
  return np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def _np_entropy(logits):
  logp = _np_log_softmax(logits)
  return -(np.exp(logp) * logp).sum(axis=-1)


@pytest.mark.parametrize('shape', [(1, 1, 2), (2, 5, 11), (3, 4, 37)])
def test_token_logprobs_matches_numpy(shape):
  rng = np.random.default_rng(shape[-1])
  logits = (3.0 * rng.normal(size=shape)).astype(np.float32)
  tokens = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
  got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  assert got.shape == shape[:-1]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _np_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)
  assert np.all(got <= 0)


def test_token_logprobs_probabilities_sum_to_one():
  # Scoring every token of the vocabulary at one position gives a full distribution.
  rng = np.random.default_rng(0)
  v = 13
  logits = rng.normal(size=(1, 1, v)).astype(np.float32)
  all_tokens = np.arange(v, dtype=np.int32).reshape(1, v)
  got = np.asarray(token_logprobs(jnp.asarray(np.repeat(logits, v, axis=1)), jnp.asarray(all_tokens)))
  np.testing.assert_allclose(np.exp(got).sum(), 1.0, rtol=1e-5)


def test_token_logprobs_shift_invariant_and_stable_for_large_logits():
  logits = np.array([[[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]]], np.float32)
  tokens = np.array([[0, 2]], np.int32)
  got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, [[0.0, -np.log(3.0)]], rtol=1e-6, atol=1e-6)
  shifted = np.asarray(token_logprobs(jnp.asarray(logits + 123.0), jnp.asarray(tokens)))
  np.testing.assert_allclose(shifted, got, atol=1e-4)


def test_token_logprobs_bfloat16_input_computes_in_float32():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = token_logprobs(bf16, jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  # Exact w.r.t. the bf16-rounded logits.
  np.testing.assert_allclose(np.asarray(got), _np_token_logprobs(np.asarray(bf16.astype(jnp.float32)), tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(1, 1, 2), (2, 5, 11), (3, 4, 37)])
def test_token_entropy_matches_numpy(shape):
  rng = np.random.default_rng(100 + shape[-1])
  logits = (2.0 * rng.normal(size=shape)).astype(np.float32)
  got = np.asarray(token_entropy(jnp.asarray(logits)))
  assert got.shape == shape[:-1]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _np_entropy(logits), rtol=1e-5, atol=1e-5)
  assert np.all(got >= -1e-6) and np.all(got <= np.log(shape[-1]) + 1e-5)


def test_token_entropy_extremes():
  v = 8
  uniform = np.zeros((1, 1, v), np.float32)
  np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(uniform))), [[np.log(v)]], rtol=1e-6)
  peaked = np.full((1, 1, v), -1e4, np.float32)
  peaked[..., 3] = 1e4
  np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(peaked))), [[0.0]], atol=1e-6)
  # Two equally likely tokens: log 2.
  two = np.full((1, 1, v), -1e4, np.float32)
  two[..., [1, 5]] = 0.0
  np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(two))), [[np.log(2.0)]], rtol=1e-6)
