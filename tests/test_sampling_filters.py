"""Tests for grpo_jax.rollout.sampling.filter_logits (temperature, top-k, nucleus top-p)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.rollout.sampling import filter_logits

B, V = 8, 16


# Jitted with temperature traced: one compile per (shape, top_k, top_p).
@functools.partial(jax.jit, static_argnames=('top_k', 'top_p'))
def _jit_filter(logits, temperature, *, top_k, top_p):
  return filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _filter(logits, *, temperature=1.0, top_k=0, top_p=1.0):
  return _jit_filter(logits, jnp.float32(temperature), top_k=top_k, top_p=top_p)


def _run(logits, **kw):
  return np.asarray(_filter(jnp.asarray(logits), **kw))


def _random_logits(seed, b=B, v=V, scale=2.0):
  logits = scale * np.random.default_rng(seed).normal(size=(b, v))
  assert all(len(set(row)) == v for row in logits)  # distinct values: no ties at a cutoff
  return logits.astype(np.float32)


def _np_top_k_keep(logits, k):
  keep = np.zeros(logits.shape, bool)
  for i, row in enumerate(logits):
    keep[i, np.argsort(-row)[:k]] = True
  return keep


def _np_top_p_keep(logits, top_p):
  """Smallest set of most likely tokens whose probability mass is >= top_p (float64)."""
  keep = np.zeros(logits.shape, bool)
  for i, row in enumerate(np.asarray(logits, np.float64)):
    finite = np.isfinite(row)
    probs = np.where(finite, np.exp(row - row[finite].max()), 0.0)
    probs /= probs.sum()
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    # Keep the fixture away from float32 / float64 disagreements right at the threshold.
    assert np.min(np.abs(cum - top_p)) > 1e-4
    n_keep = int(np.searchsorted(cum, top_p) + 1)  # first prefix whose mass reaches top_p
    keep[i, order[:n_keep]] = True
  return keep


@pytest.mark.parametrize('temperature', [1.0, 0.5, 2.0, 0.7])
def test_temperature_scales_logits(temperature):
  logits = _random_logits(0)
  got = _run(logits, temperature=temperature)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, logits / temperature, rtol=1e-6)


def test_bfloat16_input_returns_float32():
  logits = jnp.asarray(_random_logits(1), jnp.bfloat16)
  got = _filter(logits, temperature=1.0)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(logits.astype(jnp.float32)))


@pytest.mark.parametrize('k', [1, 3, V - 1])
@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_top_k_keeps_exactly_the_k_largest(k, temperature):
  logits = _random_logits(k)
  got = _run(logits, temperature=temperature, top_k=k)
  keep = _np_top_k_keep(logits, k)
  assert np.all(keep.sum(axis=-1) == k)
  assert np.all(np.isneginf(got[~keep]))
  np.testing.assert_allclose(got[keep], (logits / temperature)[keep], rtol=1e-6)
  assert np.all(np.isfinite(got[keep]))


@pytest.mark.parametrize('k', [0, V, V + 5])
def test_top_k_off_or_at_least_vocab_is_noop(k):
  logits = _random_logits(2)
  np.testing.assert_array_equal(_run(logits, top_k=k), logits)


@pytest.mark.parametrize('top_p', [0.05, 0.3, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize('temperature', [1.0, 0.6])
def test_top_p_matches_numpy(top_p, temperature):
  logits = _random_logits(int(top_p * 100))
  got = _run(logits, temperature=temperature, top_p=top_p)
  keep = _np_top_p_keep(logits / temperature, top_p)
  np.testing.assert_array_equal(np.isfinite(got), keep)
  np.testing.assert_allclose(got[keep], (logits / temperature)[keep], rtol=1e-6)
  assert np.all(np.isneginf(got[~keep]))


@pytest.mark.parametrize('top_p', [0.3, 0.8])
def test_top_p_kept_set_is_minimal(top_p):
  logits = _random_logits(7)
  got = _run(logits, top_p=top_p)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
  for row_probs, row in zip(probs, got, strict=True):
    kept = np.isfinite(row)
    mass = row_probs[kept].sum()
    assert mass >= top_p  # enough mass
    assert mass - row_probs[kept].min() < top_p  # dropping the least likely kept token would fall short
    # Every kept token is more likely than every dropped one.
    if (~kept).any():
      assert row_probs[kept].min() > row_probs[~kept].max()


def test_tiny_top_p_keeps_only_the_argmax():
  logits = _random_logits(3)
  got = _run(logits, top_p=1e-6)
  assert np.all(np.isfinite(got).sum(axis=-1) == 1)
  np.testing.assert_array_equal(np.argmax(got, axis=-1), np.argmax(logits, axis=-1))


def test_top_p_one_is_noop():
  logits = _random_logits(4)
  np.testing.assert_array_equal(_run(logits, top_p=1.0), logits)
  np.testing.assert_allclose(_run(logits, temperature=0.5, top_p=1.0, top_k=0), logits / 0.5, rtol=1e-6)


@pytest.mark.parametrize('k,top_p', [(5, 0.5), (3, 0.95), (8, 0.2)])
def test_top_k_then_top_p(k, top_p):
  # Nucleus runs on the distribution renormalized over the top-k survivors.
  logits = _random_logits(k + 10)
  got = _run(logits, top_k=k, top_p=top_p)
  after_k = np.where(_np_top_k_keep(logits, k), logits, -np.inf)
  keep = _np_top_p_keep(after_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), keep)
  assert np.all(keep.sum(axis=-1) <= k)


def test_filtered_logits_sample_only_kept_tokens():
  logits = _random_logits(5, b=2)
  draw = jax.jit(lambda key, x: jax.random.categorical(key, filter_logits(x, temperature=1.0, top_k=3), shape=(500, 2)))
  samples = np.asarray(draw(jax.random.key(0), jnp.asarray(logits)))
  keep = _np_top_k_keep(logits, 3)
  for row in range(2):
    assert set(samples[:, row]) <= set(np.flatnonzero(keep[row]))
