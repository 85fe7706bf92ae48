"""A fixed-capacity replay buffer of comparisons for the reward model's iterative retraining (DeepSeekMath's
iterative RL keeps 10% of historical data when it retrains the reward model).

  buffer = empty_buffer(capacity=4096, row_len=p + c)
  buffer = add(buffer, comparisons, rng)                   # reservoir sampling once full
  batch = mix_batch(new, buffer, batch_size=64, replay_fraction=0.1, rng=rng)

The buffer is a plain dict of numpy arrays of fixed shape (Orbax checkpoints it as is and restores it into the
same shapes): chosen_tokens / chosen_mask / rejected_tokens / rejected_mask [capacity, row_len] int32, and
'size' (rows filled) and 'seen' (pairs ever added) as 0-d int64 arrays. Rows [0, size) are valid.
"""
from __future__ import annotations

import numpy as np

from grpo_jax.models.reward_model import Comparisons

FIELDS = Comparisons._fields


def empty_buffer(capacity: int, row_len: int) -> dict[str, np.ndarray]:
  """A buffer holding up to `capacity` pairs of rows [row_len]; nothing stored yet."""
  if capacity < 1:
    raise ValueError(f'replay buffer capacity must be >= 1, got {capacity}')
  if row_len < 1:
    raise ValueError(f'replay buffer row_len must be >= 1, got {row_len}')
  buffer = {k: np.zeros((capacity, row_len), np.int32) for k in FIELDS}
  buffer['size'], buffer['seen'] = np.zeros((), np.int64), np.zeros((), np.int64)
  return buffer


def size(buffer: dict[str, np.ndarray]) -> int:
  """How many pairs the buffer holds now (at most its capacity)."""
  return int(buffer['size'])


def _check_rows(buffer: dict[str, np.ndarray], c: Comparisons, what: str) -> None:
  row_len = buffer['chosen_tokens'].shape[1]
  shapes = {k: np.shape(a) for k, a in zip(FIELDS, c, strict=True)}
  if len(set(shapes.values())) > 1 or len(shapes['chosen_tokens']) != 2:
    raise ValueError(f'{what}: comparisons must be four arrays of one shape [n, t], got {shapes}')
  if shapes['chosen_tokens'][1] != row_len:
    raise ValueError(f"{what}: comparisons have rows of length {shapes['chosen_tokens'][1]}, the replay buffer's "
                     f'rows have length {row_len}')


def add(buffer: dict[str, np.ndarray], comparisons: Comparisons, rng: np.random.Generator
        ) -> dict[str, np.ndarray]:
  """A new buffer with comparisons [n, row_len] added; `buffer` is left as it was.

  Fills free rows in order; once full, Vitter's algorithm R: the t-th pair ever added (0-based, t >= capacity)
  replaces a uniformly chosen row with probability capacity / (t + 1). The buffer is then always a uniform
  sample of everything ever added, however the pairs were split across calls.
  """
  _check_rows(buffer, comparisons, 'replay add')
  capacity = buffer['chosen_tokens'].shape[0]
  seen, n = int(buffer['seen']), np.shape(comparisons.chosen_tokens)[0]
  t = seen + np.arange(n, dtype=np.int64)  # each new pair's position in the stream
  slots = t.copy()
  full = t >= capacity
  if full.any():
    # One draw per pair past capacity, independent of the buffer's contents, so drawing them all at once is
    # algorithm R run pair by pair.
    j = rng.integers(0, t[full] + 1)
    slots[full] = np.where(j < capacity, j, -1)
  # A slot drawn twice in one call ends with the later pair, as sequential replacement would leave it; numpy
  # leaves the winner of a repeated index in one fancy assignment unspecified, so only the last is written.
  reversed_slots = slots[::-1]
  unique, first_in_reversed = np.unique(reversed_slots, return_index=True)
  src = (n - 1 - first_in_reversed)[unique >= 0]
  dst = unique[unique >= 0]
  out = {k: buffer[k].copy() for k in FIELDS}
  for k, a in zip(FIELDS, comparisons, strict=True):
    out[k][dst] = np.asarray(a)[src]
  out['size'] = np.asarray(min(capacity, seen + n), np.int64)
  out['seen'] = np.asarray(seen + n, np.int64)
  return out


def sample(buffer: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> Comparisons:
  """n pairs drawn uniformly with replacement from the stored ones: Comparisons of [n, row_len] int32."""
  stored = size(buffer)
  if n < 0:
    raise ValueError(f'cannot sample {n} pairs')
  if n > 0 and stored == 0:
    raise ValueError(f'cannot sample {n} pairs from an empty replay buffer')
  idx = rng.integers(0, stored, n) if n else np.zeros(0, np.int64)
  return Comparisons(*(buffer[k][idx] for k in FIELDS))


def mix_batch(new: Comparisons, buffer: dict[str, np.ndarray], batch_size: int, replay_fraction: float,
              rng: np.random.Generator) -> Comparisons:
  """batch_size pairs: round(replay_fraction * batch_size) (Python's round, half to even) from the buffer, none
  if it is empty, the rest drawn uniformly with replacement from `new` [m, row_len]; in a random order, so no
  slice of the batch (a microbatch, a device's shard) holds only old or only new pairs."""
  if not 0.0 <= replay_fraction <= 1.0:  # also refuses NaN
    raise ValueError(f'replay_fraction must be in [0, 1], got {replay_fraction}')
  if batch_size < 0:
    raise ValueError(f'batch_size must be >= 0, got {batch_size}')
  _check_rows(buffer, new, 'mix_batch')
  n_replay = round(replay_fraction * batch_size) if size(buffer) else 0
  n_new, m = batch_size - n_replay, np.shape(new.chosen_tokens)[0]
  if n_new and not m:
    raise ValueError(f'mix_batch needs {n_new} new pairs but `new` holds none')
  new_idx = rng.integers(0, m, n_new) if n_new else np.zeros(0, np.int64)
  old = sample(buffer, n_replay, rng)
  order = rng.permutation(batch_size)
  return Comparisons(*(np.concatenate([np.asarray(a)[new_idx].astype(np.int32), b])[order]
                       for a, b in zip(new, old, strict=True)))
