"""A group's completions packed into fewer rows: no compute on the padding a batch cut to its longest completion
still holds.

After the cut to a length bucket (rollout/trim.py) a batch is [N, c] with c its longest completion: a group of G
outputs of mean length c / 2 runs half padding. Packing places each group's outputs end to end, first-fit
decreasing, into R <= G rows of the same width c ([P, R, c] for P groups); each output is one segment that attends
to its group's shared prompt and, causally, to its own earlier tokens (model.grouped_hidden_states with a
PackedLayout), so every value is the unpacked one. R is static (a compile per R): the host picks it for a batch
(rows_needed) and the jitted function recomputes the same placement from the mask (pack_plan), so no placement
travels with the batch.

Shapes: P groups (prompts), G outputs per group, c columns, R packed rows per group.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PackedLayout(NamedTuple):
  """What the packed rows [P * R, c] hold at each column, for the model's grouped forward."""
  positions: jax.Array  # [P * R, c] int32 RoPE positions, those of the unpacked row prompt ++ completion
  slots: jax.Array  # [P * R, c] int32 the column the token has in its unpacked completion (causality, windows)
  segments: jax.Array  # [P * R, c] int32 the output's index in its group; -1 on columns no output fills


def completion_spans(mask: jax.Array) -> jax.Array:
  """[..., c] mask -> [...] int32: the columns up to and including each row's last real token (0 for none). A row
  may hold masked columns before that (a masked prefix); they are packed with it, as in the unpacked row."""
  c = mask.shape[-1]
  return jnp.max(jnp.where(mask.astype(bool), jnp.arange(1, c + 1, dtype=jnp.int32), 0), axis=-1)


def pack_plan(spans: jax.Array, num_rows: int, width: int) -> tuple[jax.Array, jax.Array]:
  """First-fit decreasing placement of each group's outputs into num_rows rows of `width` columns.

  Args:
    spans: [P, G] int, each <= width.
    num_rows: R; the placement is the same for every R >= rows_needed (first fit never reaches a later row).
  Returns:
    (row [P, G], offset [P, G]) int32: output (i, j) fills columns offset .. offset + span - 1 of row `row` of group
    i. Where R is too small for a group, outputs that fit nowhere get row R (dropped by pack, zero after unpack).
  """
  def one_group(spans):  # [G]
    order = jnp.argsort(-spans, stable=True)

    def place(fill, j):
      fits = fill + spans[j] <= width
      row = jnp.where(fits.any(), jnp.argmax(fits), num_rows)
      offset = jnp.where(row < num_rows, fill[jnp.minimum(row, num_rows - 1)], 0)
      return fill.at[row].add(spans[j], mode='drop'), (row, offset)

    _, (rows, offsets) = jax.lax.scan(place, jnp.zeros(num_rows, jnp.int32), order)
    unsort = lambda x: jnp.zeros_like(x).at[order].set(x)  # noqa: E731
    return unsort(rows.astype(jnp.int32)), unsort(offsets.astype(jnp.int32))
  return jax.vmap(one_group)(spans.astype(jnp.int32))


def rows_needed(mask: np.ndarray, group_size: int) -> int:
  """The packed rows per group (R) that hold every group of a batch: mask [N, c], groups of group_size contiguous
  rows. On the host, in numpy (it runs before each jitted call): pack_plan's placement, first-fit decreasing with
  the same stable order, counting the rows it opens."""
  mask = np.asarray(mask).astype(bool)
  c = mask.shape[1]
  spans = np.max(np.where(mask, np.arange(1, c + 1), 0), axis=1).reshape(-1, group_size)
  most = 0
  for group in spans:
    fill: list[int] = []
    for span in group[np.argsort(-group, kind='stable')]:
      row = next((r for r, used in enumerate(fill) if used + span <= c), len(fill))
      fill[row:row + 1] = [fill[row] + span] if row < len(fill) else [span]
    most = max(most, len(fill))
  return most


def packed_rows(mask: np.ndarray, group_size: int, buckets: Sequence[int]) -> int:
  """R for a batch: rows_needed rounded up to the smallest of `buckets` (row counts per group) that holds it; 0 (do
  not pack) when that is group_size, which packing would not shrink, or when there are no buckets."""
  if not buckets or group_size < 2:
    return 0
  need = rows_needed(mask, group_size)
  rows = min([r for r in buckets if r >= need] + [group_size])
  return 0 if rows >= group_size else rows


def _indices(spans, row, offset, num_rows, c):
  """[P, G, c] int32: each (output, column)'s index in its group's packed [R * c] columns, R * c (out of range) past
  its span or where the output did not fit."""
  t = jnp.arange(c, dtype=jnp.int32)
  idx = (row * c + offset)[..., None] + t
  return jnp.where((t < spans[..., None]) & (row < num_rows)[..., None], idx, num_rows * c)


class Packing(NamedTuple):
  """Where each output's columns went: built by `plan`, read by pack / unpack."""
  index: jax.Array  # [P, G, c] int32, as _indices
  num_rows: int


def plan(mask: jax.Array, group_size: int, num_rows: int) -> Packing:
  """The placement (pack_plan) of a batch's outputs: mask [N, c], N = P * group_size, groups contiguous."""
  n, c = mask.shape
  spans = completion_spans(mask).reshape(n // group_size, group_size)
  row, offset = pack_plan(spans, num_rows, c)
  return Packing(_indices(spans, row, offset, num_rows, c), num_rows)


def pack(packing: Packing, x: jax.Array, fill=0) -> jax.Array:
  """[N, c, ...] unpacked rows -> [P * R, c, ...] packed rows; columns no output fills hold `fill`."""
  p, g, c = packing.index.shape
  r = packing.num_rows
  x = x.reshape(p, g * c, *x.shape[2:])

  def one_group(x, index):
    out = jnp.full((r * c, *x.shape[1:]), fill, x.dtype)
    return out.at[index.reshape(-1)].set(x, mode='drop')
  return jax.vmap(one_group)(x, packing.index).reshape(p * r, c, *x.shape[2:])


def unpack(packing: Packing, y: jax.Array) -> jax.Array:
  """[P * R, c, ...] packed rows -> [N, c, ...] unpacked; 0 past each output's span. Its gradient adds each
  packed column's cotangent back to the column it came from."""
  p, g, c = packing.index.shape
  r = packing.num_rows
  y = y.reshape(p, r * c, *y.shape[2:])
  valid = packing.index < r * c
  index = jnp.minimum(packing.index, r * c - 1).reshape(p, g * c)
  out = jax.vmap(lambda y, i: y[i])(y, index).reshape(p * g, c, *y.shape[2:])
  return jnp.where(valid.reshape(p * g, c, *[1] * (y.ndim - 2)), out, 0)


def layout(packing: Packing, positions: jax.Array) -> PackedLayout:
  """The PackedLayout of a batch whose unpacked positions are [N, c]."""
  p, g, c = packing.index.shape
  slots = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (p * g, c))
  segments = jnp.broadcast_to(jnp.repeat(jnp.arange(g, dtype=jnp.int32), c).reshape(g, c), (p, g, c))
  return PackedLayout(pack(packing, positions.astype(jnp.int32)), pack(packing, slots),
                      pack(packing, segments.reshape(p * g, c), fill=-1))
