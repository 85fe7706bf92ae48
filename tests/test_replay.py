"""Tests for grpo_jax/data/replay.py: the buffer's layout, reservoir sampling's uniformity, sample and mix_batch."""
from __future__ import annotations

import numpy as np
import pytest

from grpo_jax.data import replay
from grpo_jax.models.reward_model import Comparisons


def _items(ids, row_len: int = 1) -> Comparisons:
  """Pairs whose every token is the pair's id (rejected: -id), so a row says which pair it came from."""
  ids = np.asarray(ids)[:, None]
  ones = np.ones((len(ids), row_len), np.int32)
  return Comparisons(ids * ones, ones, -ids * ones, ones)


def test_empty_buffer_layout_and_errors():
  b = replay.empty_buffer(5, 3)
  assert set(b) == {'chosen_tokens', 'chosen_mask', 'rejected_tokens', 'rejected_mask', 'size', 'seen'}
  for k in Comparisons._fields:
    assert b[k].shape == (5, 3) and b[k].dtype == np.int32
  assert b['size'].shape == b['seen'].shape == () and b['size'].dtype == b['seen'].dtype == np.int64
  assert replay.size(b) == 0
  with pytest.raises(ValueError, match='capacity must be >= 1, got 0'):
    replay.empty_buffer(0, 3)


def test_add_fills_in_order_without_touching_the_input():
  b0 = replay.empty_buffer(4, 2)
  b1 = replay.add(b0, _items([7, 8], row_len=2), np.random.default_rng(0))
  assert replay.size(b0) == 0 and not b0['chosen_tokens'].any()  # the old buffer is unchanged
  assert replay.size(b1) == 2 and int(b1['seen']) == 2
  np.testing.assert_array_equal(b1['chosen_tokens'], [[7, 7], [8, 8], [0, 0], [0, 0]])
  np.testing.assert_array_equal(b1['rejected_tokens'][:2], [[-7, -7], [-8, -8]])
  np.testing.assert_array_equal(b1['chosen_mask'], [[1, 1], [1, 1], [0, 0], [0, 0]])
  b2 = replay.add(b1, _items([], row_len=2), np.random.default_rng(0))
  assert replay.size(b2) == 2 and int(b2['seen']) == 2


def test_add_rejects_other_row_lengths():
  b = replay.empty_buffer(4, 3)
  with pytest.raises(ValueError, match="rows of length 5, the replay buffer's rows have length 3"):
    replay.add(b, _items([1], row_len=5), np.random.default_rng(0))
  with pytest.raises(ValueError, match="rows of length 2, the replay buffer's rows have length 3"):
    replay.mix_batch(_items([1], row_len=2), b, 4, 0.5, np.random.default_rng(0))


class _FixedDraws:
  """An rng whose integers() returns given values: which slot each pair past capacity draws."""

  def __init__(self, draws):
    self.draws = np.asarray(draws)

  def integers(self, low, high):
    assert low == 0 and len(high) == len(self.draws) and (self.draws < high).all()
    return self.draws


def test_add_past_capacity_by_hand():
  """Capacity 3 holding pairs 0, 1, 2; pairs 3..6 arrive in one call and draw slots 1, 4, 1, 0: pair 3 lands in
  slot 1, pair 4 is dropped (4 >= capacity), pair 5 then overwrites slot 1 (the later pair wins, as adding them
  one at a time would), pair 6 lands in slot 0."""
  b = replay.add(replay.empty_buffer(3, 1), _items([0, 1, 2]), np.random.default_rng(0))
  b = replay.add(b, _items([3, 4, 5, 6]), _FixedDraws([1, 4, 1, 0]))
  np.testing.assert_array_equal(b['chosen_tokens'][:, 0], [6, 5, 2])
  np.testing.assert_array_equal(b['rejected_tokens'][:, 0], [-6, -5, -2])
  assert replay.size(b) == 3 and int(b['seen']) == 7


def _inclusion_counts(chunk: int, seeds: range, n_items: int = 10_000, capacity: int = 100) -> np.ndarray:
  counts = np.zeros(n_items, np.int64)
  for seed in seeds:
    rng, b = np.random.default_rng(seed), replay.empty_buffer(capacity, 1)
    for start in range(0, n_items, chunk):
      b = replay.add(b, _items(np.arange(start, min(start + chunk, n_items))), rng)
    assert replay.size(b) == capacity and int(b['seen']) == n_items
    held = b['chosen_tokens'][:, 0]
    assert len(set(held)) == capacity  # no pair stored twice
    np.testing.assert_array_equal(b['rejected_tokens'][:, 0], -held)  # rows move as whole pairs
    counts[held] += 1
  return counts


def test_reservoir_is_uniform_one_at_a_time():
  """10_000 pairs added one by one to capacity 100: each is held with probability 100 / 10_000 = 1%. Over 20
  fixed seeds a block of 1000 consecutive pairs is held 200 times on average (sd ~13); +-25% is ~3.7 sd, and
  the seeds are fixed, so it cannot flake. Keeping the first pairs (never replacing) or the last ones (always
  replacing) would put 2000 in one block."""
  counts = _inclusion_counts(chunk=1, seeds=range(20))
  blocks = counts.reshape(10, 1000).sum(axis=1)
  assert np.all(np.abs(blocks - 200) <= 50), blocks
  assert counts[:100].sum() <= 50 and counts[-100:].sum() <= 50  # the first fill and the last arrivals: 20 each


def test_reservoir_is_uniform_in_chunks():
  """The same stream added in uneven chunks of 37 (so slots repeat within a call): 400 fixed seeds, blocks of
  100 pairs held 400 times on average (sd ~20), each within +-25%."""
  counts = _inclusion_counts(chunk=37, seeds=range(400))
  blocks = counts.reshape(100, 100).sum(axis=1)
  assert np.all(np.abs(blocks - 400) <= 100), blocks


def test_sample():
  b = replay.add(replay.empty_buffer(10, 1), _items([4, 5, 6]), np.random.default_rng(0))
  s = replay.sample(b, 300, np.random.default_rng(1))
  assert all(a.shape == (300, 1) for a in s)
  assert set(s.chosen_tokens[:, 0]) == {4, 5, 6}  # only stored rows, never the empty ones
  np.testing.assert_array_equal(s.rejected_tokens, -s.chosen_tokens)
  empty = replay.empty_buffer(10, 1)
  assert replay.sample(empty, 0, np.random.default_rng(0)).chosen_tokens.shape == (0, 1)
  with pytest.raises(ValueError, match='empty replay buffer'):
    replay.sample(empty, 1, np.random.default_rng(0))


@pytest.mark.parametrize('batch_size, fraction, n_old', [(10, 0.3, 3), (10, 0.0, 0), (10, 1.0, 10), (8, 0.1, 1),
                                                         (5, 0.5, 2), (0, 0.5, 0)])
def test_mix_batch_fractions(batch_size, fraction, n_old):
  """Buffer pairs have ids 1..3, new ones 100..104: the count of ids < 100 is the replayed count, exactly.
  5 x 0.5 = 2.5 rounds half to even, to 2."""
  b = replay.add(replay.empty_buffer(4, 2), _items([1, 2, 3], row_len=2), np.random.default_rng(0))
  batch = replay.mix_batch(_items(np.arange(100, 105), row_len=2), b, batch_size, fraction,
                           np.random.default_rng(1))
  assert all(a.shape == (batch_size, 2) and a.dtype == np.int32 for a in batch)
  ids = batch.chosen_tokens[:, 0]
  assert (ids < 100).sum() == n_old
  assert set(ids[ids < 100]) <= {1, 2, 3} and set(ids[ids >= 100]) <= set(range(100, 105))
  np.testing.assert_array_equal(batch.rejected_tokens, -batch.chosen_tokens)


def test_mix_batch_empty_buffer_and_errors():
  new, rng = _items([100, 101]), np.random.default_rng(0)
  batch = replay.mix_batch(new, replay.empty_buffer(4, 1), 6, 0.5, rng)
  assert set(batch.chosen_tokens[:, 0]) <= {100, 101} and batch.chosen_tokens.shape == (6, 1)
  b = replay.add(replay.empty_buffer(4, 1), _items([1]), rng)
  for bad in (-0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='replay_fraction must be in'):
      replay.mix_batch(new, b, 4, bad, rng)
  with pytest.raises(ValueError, match='needs 2 new pairs'):
    replay.mix_batch(_items([]), b, 4, 0.5, rng)
  assert set(replay.mix_batch(_items([]), b, 4, 1.0, rng).chosen_tokens[:, 0]) == {1}
