"""No compute on padding: a batch's completion arrays cut to its longest completion, rounded up to one of a few
fixed widths (buckets), so the reference forward, the trainer's forward and backward and the logprob chunks run over
[N, width] rather than [N, max_new_tokens], and each function compiles at most once per bucket.

Columns past every row's last real token hold only padding (mask 0): every loss reads tokens through the mask,
so cutting them changes no value (tests/test_trim.py), except a normalizer that counts columns (Dr. GRPO's
'constant' aggregation), which therefore divides by the budget, not the width (core/losses.py).

The cut leaves each row padded to the batch's longest completion; packing (core/packing.py) places a group's
outputs end to end in fewer rows, and `per_packed_rows` picks a batch's row count on the host, as bucket_width
picks its width.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from grpo_jax.core import packing


def completion_buckets(max_len: int, num_buckets: int, multiple: int = 8) -> tuple[int, ...]:
  """The widths a batch may be cut to: num_buckets evenly spaced fractions k / num_buckets of max_len (k = 1 ..
  num_buckets), each rounded up to a multiple of `multiple` (the logprob chunk, so chunks hold no extra padding),
  capped at max_len; increasing, without repeats, the last always max_len. num_buckets <= 1: (max_len,)."""
  if max_len < 1:
    raise ValueError(f'max_len must be positive, got {max_len}')
  widths = {max_len}
  for k in range(1, max(num_buckets, 1)):
    widths.add(min(max_len, multiple * math.ceil(max_len * k / num_buckets / multiple)))
  return tuple(sorted(widths))


def bucket_width(mask: np.ndarray, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds every row's real tokens: mask [N, c] (right-padded) -> a width <= c.
  The mask's own width when no bucket is smaller (or `buckets` is empty: no trimming)."""
  mask = np.asarray(mask)
  c = mask.shape[1]
  real = np.flatnonzero(mask.any(axis=0))
  longest = int(real[-1]) + 1 if real.size else 0
  return min([w for w in buckets if longest <= w < c] + [c])


def trim_columns(arrays: Sequence, width: int) -> list:
  """Each [N, c, ...] array (numpy or jax) cut to [N, width, ...]; [N] arrays (per-output advantages) and arrays
  no wider than `width` unchanged (not copied)."""
  return [x if np.ndim(x) < 2 or x.shape[1] <= width else x[:, :width] for x in arrays]


def pad_columns(arrays: Sequence, width: int) -> list[np.ndarray]:
  """Each [N, c, ...] array padded with zeros to [N, width, ...] on the host (a zero mask: padding); [N] arrays
  unchanged. The inverse of trim_columns where it cut only padding."""
  out = []
  for x in arrays:
    x = np.asarray(x)
    if x.ndim >= 2 and x.shape[1] < width:
      x = np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    out.append(x)
  return out


def per_packed_rows(build: Callable[[int], Callable], mask_of: Callable[..., np.ndarray], *, group_size: int,
                    row_buckets: Sequence[int]) -> Callable:
  """fn(*args) = build(R)(*args): R = packing.packed_rows of the batch's completion mask (mask_of(*args), [N, c]),
  the packed rows per group (0: unpacked). Each R's function is built on its first use, so a jitted one compiles
  once per R (and per width); row_buckets () (packing off): always build(0). An abstract mask (traced, as by the
  memory planner's lowering) has no lengths: build(0), the unpacked rows any batch fits in."""
  built = {}

  def call(*args, **kwargs):
    mask = mask_of(*args)
    concrete = not isinstance(mask, (jax.core.Tracer, jax.ShapeDtypeStruct))
    rows = packing.packed_rows(np.asarray(mask), group_size, row_buckets) if row_buckets and concrete else 0
    if rows not in built:
      built[rows] = build(rows)
    return built[rows](*args, **kwargs)
  return call
