"""Tests for grpo_jax.core.gae: GAE as a reverse scan against a plain numpy loop."""
import jax
import numpy as np
import pytest

from grpo_jax.core.gae import gae

gae_jit = jax.jit(gae, static_argnames=('gamma', 'lam'))


def _np_gae(rewards, values, lengths, gamma, lam):
  """The textbook double loop, one output at a time, reading only its first `length` tokens."""
  n, t_max = rewards.shape
  advantages, returns = np.zeros((n, t_max)), np.zeros((n, t_max))
  for i in range(n):
    last = 0.0
    for t in reversed(range(lengths[i])):
      next_value = values[i, t + 1] if t + 1 < lengths[i] else 0.0
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      last = delta + gamma * lam * last
      advantages[i, t] = last
      returns[i, t] = last + values[i, t]
  return advantages, returns


def _inputs(seed, n=7, t_max=9):
  rng = np.random.default_rng(seed)
  # Garbage (not zeros) in the padding, so any leak into valid positions shows.
  rewards = rng.normal(size=(n, t_max)).astype(np.float32)
  values = rng.normal(size=(n, t_max)).astype(np.float32)
  lengths = rng.integers(0, t_max + 1, size=n)
  lengths[0], lengths[1] = 0, t_max  # an empty output and a full-length one every time
  mask = (np.arange(t_max) < lengths[:, None]).astype(np.float32)
  return rewards, values, mask, lengths


@pytest.mark.parametrize('gamma,lam', [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7), (1.0, 0.95)])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_numpy_loop(gamma, lam, seed):
  rewards, values, mask, lengths = _inputs(seed)
  advantages, returns = gae_jit(rewards, values, mask, gamma=gamma, lam=lam)
  assert advantages.shape == returns.shape == rewards.shape
  assert advantages.dtype == returns.dtype == np.float32
  want_a, want_r = _np_gae(rewards.astype(np.float64), values.astype(np.float64), lengths, gamma, lam)
  np.testing.assert_allclose(advantages, want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, want_r, rtol=1e-5, atol=1e-5)


def test_padding_is_zero_and_does_not_leak():
  rewards, values, mask, _ = _inputs(3)
  advantages, returns = gae_jit(rewards, values, mask, gamma=0.9, lam=0.8)
  assert np.all(np.asarray(advantages)[mask == 0] == 0)
  assert np.all(np.asarray(returns)[mask == 0] == 0)
  # Other garbage in the padding: the valid positions do not change.
  rng = np.random.default_rng(4)
  noisy = lambda x: np.where(mask == 1, x, rng.normal(size=x.shape) * 100).astype(np.float32)
  advantages2, returns2 = gae_jit(noisy(rewards), noisy(values), mask, gamma=0.9, lam=0.8)
  np.testing.assert_array_equal(advantages2, advantages)
  np.testing.assert_array_equal(returns2, returns)


def test_lam_one_gamma_one_zero_values_is_reward_to_go():
  rewards, _, mask, _ = _inputs(5)
  advantages, returns = gae_jit(rewards, np.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
  to_go = np.flip(np.cumsum(np.flip(rewards * mask, axis=1), axis=1), axis=1) * mask
  np.testing.assert_allclose(advantages, to_go, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, to_go, rtol=1e-5, atol=1e-5)


def test_lam_one_returns_are_discounted_reward_to_go_whatever_the_values():
  # With lambda = 1 the values telescope out of the return: R_t = sum_k gamma^k r_{t+k}.
  rewards, values, mask, lengths = _inputs(6)
  gamma = 0.8
  _, returns = gae_jit(rewards, values, mask, gamma=gamma, lam=1.0)
  want = np.zeros_like(rewards, dtype=np.float64)
  for i, length in enumerate(lengths):
    for t in range(length):
      want[i, t] = sum(gamma ** k * rewards[i, t + k] for k in range(length - t))
  np.testing.assert_allclose(returns, want, rtol=1e-5, atol=1e-5)


def test_lam_zero_is_one_step_td_error():
  rewards, values, mask, lengths = _inputs(7)
  gamma = 0.9
  advantages, _ = gae_jit(rewards, values, mask, gamma=gamma, lam=0.0)
  next_values = np.concatenate([values[:, 1:], np.zeros_like(values[:, :1])], axis=1)
  next_values = np.where(np.arange(values.shape[1]) + 1 < lengths[:, None], next_values, 0.0)
  np.testing.assert_allclose(advantages, (rewards + gamma * next_values - values) * mask, rtol=1e-5, atol=1e-5)


def test_jit_with_traced_gamma_lam_matches_eager():
  rewards, values, mask, _ = _inputs(8)
  traced = jax.jit(lambda r, v, m, g, lm: gae(r, v, m, gamma=g, lam=lm))
  got = traced(rewards, values, mask, 0.97, 0.9)
  eager = gae(rewards, values, mask, gamma=0.97, lam=0.9)
  for a, b in zip(got, eager, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
