"""Tests for grpo_jax.core.advantages: group-relative advantages and the estimator registry."""
import jax
import numpy as np
import pytest

from grpo_jax.core import advantages
from grpo_jax.core.advantages import ADVANTAGES, get_advantage_fn

# Jitted: one compile per shape instead of one per primitive (op-by-op dispatch is slow to warm up on CPU).
group_advantages = jax.jit(advantages.group_advantages, static_argnames=('scale_by_std', 'eps'))


def _np_group_advantages(rewards, scale_by_std=True, eps=1e-6):
  r = np.asarray(rewards, np.float64)
  centered = r - r.mean(axis=-1, keepdims=True)
  if scale_by_std:
    centered = centered / (r.std(axis=-1, keepdims=True) + eps)  # population std (ddof=0)
  return centered


@pytest.mark.parametrize('scale_by_std', [True, False])
@pytest.mark.parametrize('shape', [(1, 2), (3, 4), (5, 8)])
def test_matches_numpy_reference(scale_by_std, shape):
  rng = np.random.default_rng(sum(shape) + scale_by_std)
  rewards = rng.normal(size=shape).astype(np.float32)
  got = np.asarray(group_advantages(rewards, scale_by_std=scale_by_std))
  assert got.shape == shape
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _np_group_advantages(rewards, scale_by_std), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scale_by_std', [True, False])
def test_binary_rewards_match_numpy(scale_by_std):
  rng = np.random.default_rng(0)
  rewards = rng.integers(0, 2, size=(6, 8)).astype(np.float32)
  got = np.asarray(group_advantages(rewards, scale_by_std=scale_by_std))
  np.testing.assert_allclose(got, _np_group_advantages(rewards, scale_by_std), rtol=1e-5, atol=1e-5)


def test_hand_worked_example():
  # rewards [1, 0, 0, 1]: mean 0.5, population std 0.5 -> (r - 0.5) / 0.5 = [1, -1, -1, 1].
  got = np.asarray(group_advantages(np.array([[1.0, 0.0, 0.0, 1.0]])))
  np.testing.assert_allclose(got, [[1.0, -1.0, -1.0, 1.0]], rtol=1e-5)
  # Without std scaling only the mean is removed: [0.5, -0.5, -0.5, 0.5].
  got = np.asarray(group_advantages(np.array([[1.0, 0.0, 0.0, 1.0]]), scale_by_std=False))
  np.testing.assert_allclose(got, [[0.5, -0.5, -0.5, 0.5]], rtol=1e-6)


def test_hand_worked_one_correct_of_four():
  # rewards [1, 0, 0, 0]: mean 0.25, std sqrt(0.1875) = 0.4330 -> [0.75, -0.25, -0.25, -0.25] / 0.4330
  #                                                              = [1.7321, -0.5774, -0.5774, -0.5774].
  got = np.asarray(group_advantages(np.array([[1.0, 0.0, 0.0, 0.0]])))
  np.testing.assert_allclose(got, [[1.7320508, -0.5773503, -0.5773503, -0.5773503]], rtol=1e-5)


def test_groups_are_independent():
  # Each row is normalized on its own: changing one group does not move another.
  a = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 5.0, 7.0, 9.0]], np.float32)
  b = a.copy()
  b[1] = [100.0, -4.0, 2.0, 0.5]
  ga, gb = np.asarray(group_advantages(a)), np.asarray(group_advantages(b))
  np.testing.assert_array_equal(ga[0], gb[0])
  assert not np.allclose(ga[1], gb[1])


@pytest.mark.parametrize('scale_by_std', [True, False])
def test_rows_sum_to_zero(scale_by_std):
  rewards = np.random.default_rng(1).uniform(-2, 2, size=(4, 6)).astype(np.float32)
  got = np.asarray(group_advantages(rewards, scale_by_std=scale_by_std))
  np.testing.assert_allclose(got.sum(axis=-1), 0.0, atol=1e-5)


@pytest.mark.parametrize('scale_by_std', [True, False])
@pytest.mark.parametrize('value', [0.0, 1.0, -3.5])
def test_identical_rewards_give_zero_not_nan(scale_by_std, value):
  rewards = np.array([[value] * 4, [1.0, 0.0, 1.0, 0.0]], np.float32)
  got = np.asarray(group_advantages(rewards, scale_by_std=scale_by_std))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got[0], np.zeros(4, np.float32))
  assert np.all(got[1] != 0)


def test_integer_rewards_are_cast_to_float():
  got = np.asarray(advantages.group_advantages(np.array([[1, 0, 0, 1]], np.int32)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, [[1.0, -1.0, -1.0, 1.0]], rtol=1e-5)


def test_registry_functions():
  rewards = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
  assert get_advantage_fn('grpo') is advantages.group_advantages
  np.testing.assert_allclose(np.asarray(get_advantage_fn('grpo')(rewards)), _np_group_advantages(rewards, True),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(get_advantage_fn('group_mean')(rewards)),
                             _np_group_advantages(rewards, False), rtol=1e-5, atol=1e-5)
  assert set(ADVANTAGES) >= {'grpo', 'group_mean'}


@pytest.mark.parametrize('name', ['nope', '', 'GRPO', 'k3'])
def test_registry_unknown_name_raises(name):
  with pytest.raises(ValueError, match='unknown advantage estimator'):
    get_advantage_fn(name)


def _process_reference(step_rewards, step_ends, step_mask, num_tokens, eps=1e-6):
  """Straight from the paper: normalize every real step reward over the group, then sum the later ones."""
  p, g, _ = step_rewards.shape
  out = np.zeros((p, g, num_tokens))
  for i in range(p):
    real = step_rewards[i][step_mask[i] == 1]
    mean, std = real.mean(), real.std()
    for j in range(g):
      for s in np.flatnonzero(step_mask[i, j]):
        out[i, j, :step_ends[i, j, s] + 1] += (step_rewards[i, j, s] - mean) / (std + eps)
  return out


def test_process_advantages_match_the_paper_formula():
  from grpo_jax.core.advantages import process_advantages
  rng = np.random.default_rng(0)
  p, g, s, t = 3, 4, 5, 12
  rewards = rng.standard_normal((p, g, s)).astype(np.float32)
  mask = (np.arange(s) < rng.integers(1, s + 1, (p, g, 1))).astype(np.int32)
  ends = np.sort(rng.integers(0, t, (p, g, s)), axis=-1)
  got = process_advantages(rewards, ends, mask, num_tokens=t)
  np.testing.assert_allclose(np.asarray(got), _process_reference(rewards, ends, mask, t), atol=1e-5)


def test_process_advantages_hand_worked():
  from grpo_jax.core.advantages import process_advantages
  # One prompt, G=2, one step each ending at token 1: rewards [1, 0] -> normalized [1, -1] (mean 0.5, std 0.5).
  # Tokens 0..1 of each output carry its step's advantage; token 2 comes after the last step: 0.
  got = process_advantages(np.array([[[1.0], [0.0]]]), np.array([[[1], [1]]]), np.ones((1, 2, 1)), num_tokens=3,
                           eps=0.0)
  np.testing.assert_allclose(np.asarray(got), [[[1, 1, 0], [-1, -1, 0]]], atol=1e-6)


def _np_batch_std_loops(rewards, eps=1e-6):
  """Group-mean baseline over the population std (ddof=0) of all rewards, one element at a time."""
  r = np.asarray(rewards, np.float64)
  flat = [x for row in r for x in row]
  batch_mean = sum(flat) / len(flat)
  batch_std = np.sqrt(sum((x - batch_mean) ** 2 for x in flat) / len(flat))
  out = np.zeros_like(r)
  for i, row in enumerate(r):
    group_mean = sum(row) / len(row)
    for j, x in enumerate(row):
      out[i, j] = (x - group_mean) / (batch_std + eps)
  return out


@pytest.mark.parametrize('shape', [(1, 2), (3, 4), (6, 8)])
@pytest.mark.parametrize('binary', [False, True])
def test_batch_std_matches_numpy_loops(shape, binary):
  rng = np.random.default_rng(sum(shape) + binary)
  rewards = (rng.integers(0, 2, shape) if binary else rng.normal(size=shape)).astype(np.float32)
  fn = jax.jit(get_advantage_fn('batch_std'))
  got = np.asarray(fn(rewards))
  assert got.shape == shape and got.dtype == np.float32
  np.testing.assert_allclose(got, _np_batch_std_loops(rewards), rtol=1e-5, atol=1e-5)


def test_batch_std_keeps_the_groups_relative_scale():
  """One scale for the whole batch: a group's advantages are its group-mean advantages times the same factor for
  every group (unlike 'grpo', which rescales each group by its own std), and rows still sum to zero."""
  rewards = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]], np.float32)
  batch = np.asarray(get_advantage_fn('batch_std')(rewards))
  centered = np.asarray(get_advantage_fn('group_mean')(rewards))
  ratio = batch[centered != 0] / centered[centered != 0]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  np.testing.assert_allclose(ratio[0], 1 / (rewards.astype(np.float64).std() + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(batch.sum(axis=-1), 0.0, atol=1e-5)
  np.testing.assert_array_equal(batch[2], 0.0)  # no variance in the group: no advantage
  grpo = np.asarray(get_advantage_fn('grpo')(rewards))
  # 'grpo' gives the 1-of-4 group's correct output a larger advantage than the 2-of-4 group's; batch_std the
  # same deviation from the mean times one scale.
  assert grpo[0, 0] > grpo[1, 0]
  np.testing.assert_allclose(batch[0, 0] / batch[1, 0], 0.75 / 0.5, rtol=1e-5)


def test_all_equal_batch_gives_zero_not_nan():
  got = np.asarray(get_advantage_fn('batch_std')(np.full((3, 4), 2.5, np.float32)))
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, 0.0)


@pytest.mark.parametrize('g', [2, 3, 4, 16])
def test_std_is_the_population_std_as_documented(g):
  """ddof=0: each std-scaled group with any spread has mean square 1 (up to eps), whatever G; a sample std (ddof=1)
  would give (G - 1) / G instead, the difference the advantages docstring warns about for small G."""
  rewards = np.random.default_rng(g).normal(size=(5, g)).astype(np.float32)
  got = np.asarray(group_advantages(rewards)).astype(np.float64)
  np.testing.assert_allclose((got ** 2).mean(axis=-1), 1.0, rtol=1e-4)
  sample_std = rewards.astype(np.float64).std(axis=-1, ddof=1, keepdims=True)
  with_ddof1 = (rewards - rewards.mean(axis=-1, keepdims=True)) / sample_std
  np.testing.assert_allclose((with_ddof1 ** 2).mean(axis=-1), (g - 1) / g, rtol=1e-4)
  batch = np.asarray(get_advantage_fn('batch_std')(rewards)).astype(np.float64)
  np.testing.assert_allclose(batch * (rewards.std() + 1e-6),
                             rewards - rewards.mean(axis=-1, keepdims=True), rtol=1e-4, atol=1e-5)
