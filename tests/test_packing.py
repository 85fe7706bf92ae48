"""Packing each group's outputs into fewer rows (core/packing.py, rl.pack_buckets): the placement against a loop
transcription of first-fit decreasing; pack / unpack; logprobs, entropies and gradients of the packed forward equal
the repeated-prompt path (plain, qk-norm + qkv-bias, sliding window, LoRA, remat, chunked head); the train step
packed and unpacked equal; one jitted function per row count."""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import BASE, CASES, build

from grpo_jax.core import packing
from grpo_jax.core.logprobs import sequence_logprobs
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.train_state import init_state, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.trim import per_packed_rows

P, G, PLEN, CLEN = 3, 4, 5, 8


def ffd_loop(spans: list[int], width: int) -> tuple[list[int], list[int], int]:
  """First-fit decreasing, as a plain loop: (row, offset) of each item, and the rows used."""
  fill: list[int] = []
  row, offset = [0] * len(spans), [0] * len(spans)
  for j in sorted(range(len(spans)), key=lambda j: -spans[j]):  # stable: ties keep their order
    r = next((r for r, f in enumerate(fill) if f + spans[j] <= width), len(fill))
    if r == len(fill):
      fill.append(0)
    row[j], offset[j] = r, fill[r]
    fill[r] += spans[j]
  return row, offset, len(fill)


def packed_batch(seed: int = 0):
  """[N, .] arrays of P prompts x G outputs that pack into fewer rows: prompts left-padded (one fully real);
  completions right-padded, one full width, one empty, one with a masked first token (a masked prefix)."""
  rng = np.random.default_rng(seed)
  lengths = np.r_[PLEN, rng.integers(1, PLEN, P - 1)]
  prompt_mask = (np.arange(PLEN)[None] >= PLEN - lengths[:, None]).astype(np.int32)
  prompt_tokens = np.where(prompt_mask, rng.integers(1, 40, (P, PLEN)), 0).astype(np.int32)
  ends = np.r_[CLEN, 0, rng.integers(1, 5, P * G - 2)]
  completion_mask = (np.arange(CLEN)[None] < ends[:, None]).astype(np.int32)
  completion_mask[5, 0] = 0 if ends[5] > 1 else completion_mask[5, 0]
  completion_tokens = np.where(np.arange(CLEN)[None] < ends[:, None], rng.integers(1, 40, (P * G, CLEN)), 0)
  return (np.repeat(prompt_tokens, G, 0), np.repeat(prompt_mask, G, 0), completion_tokens.astype(np.int32),
          completion_mask)


def test_pack_plan_is_first_fit_decreasing():
  rng = np.random.default_rng(0)
  for width, g in ((8, 4), (16, 8), (5, 16)):
    spans = rng.integers(0, width + 1, (6, g))
    spans[0] = width  # a group of full rows: R = G
    need = packing.rows_needed(np.arange(width)[None] < spans.reshape(-1, 1), g)
    loops = [ffd_loop(list(s), width) for s in spans]
    assert need == max(used for _, _, used in loops)
    for rows in (need, need + 2):  # the same placement for any R that holds it
      row, offset = map(np.asarray, packing.pack_plan(spans, rows, width))
      np.testing.assert_array_equal(row, [r for r, _, _ in loops])
      np.testing.assert_array_equal(offset, [o for _, o, _ in loops])
  # Too few rows: what fits nowhere is marked row R (dropped by pack, zero after unpack).
  row, _ = packing.pack_plan(np.array([[4, 4, 4]]), 2, 4)
  np.testing.assert_array_equal(row, [[0, 1, 2]])


def test_pack_then_unpack_is_the_identity_on_each_span():
  mask = packed_batch()[3]
  placed = packing.plan(mask, G, packing.rows_needed(mask, G))
  x = np.random.default_rng(1).standard_normal(mask.shape + (3,)).astype(np.float32)
  packed = packing.pack(placed, x)
  assert packed.shape == (P * placed.num_rows, CLEN, 3) and placed.num_rows < G
  spans = np.asarray(packing.completion_spans(mask))
  inside = np.arange(CLEN)[None] < spans[:, None]
  np.testing.assert_array_equal(np.asarray(packing.unpack(placed, packed)), np.where(inside[..., None], x, 0))
  # Every packed column holds one output's column or the fill: as many filled columns as the spans sum to.
  assert int((packing.pack(placed, np.ones(mask.shape, np.int32)) > 0).sum()) == spans.sum()


@pytest.mark.parametrize('rows', [0, 1])
def test_packed_rows_picks_the_smallest_bucket(rows):
  mask = packed_batch()[3]
  need = packing.rows_needed(mask, G)
  assert 1 < need < G
  assert packing.packed_rows(mask, G, (1, need, G)) == need
  assert packing.packed_rows(mask, G, (need + rows, G)) == (need + rows if need + rows < G else 0)
  assert packing.packed_rows(mask, G, (G,)) == 0  # no fewer rows: not packed
  assert packing.packed_rows(mask, G, ()) == 0


@functools.partial(jax.jit, static_argnames=('graphdef', 'chunk_size', 'remat', 'group_size', 'pack_rows'))
def values_and_grads(graphdef, params, arrays, weights, *, chunk_size, remat, group_size, pack_rows):
  def loss(params):
    out = sequence_logprobs(nnx.merge(graphdef, params), *arrays, return_entropy=True, chunk_size=chunk_size,
                            remat=remat, group_size=group_size, pack_rows=pack_rows)
    return (weights[0] * out[0] + weights[1] * out[1]).sum(), out
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return out, grads


# Two cases that between them cover every feature run in CI; the rest with the slow tests.
@pytest.mark.parametrize('case', [c if c in ('sliding_qk_chunked', 'lora_chunked_remat') else
                                  pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_packed_forward_and_gradients_equal_repeated_prompts(case):
  model_cfg, lora_cfg, chunk, remat = CASES[case]
  graphdef, params = build(model_cfg, lora_cfg)
  arrays = packed_batch()
  rows = packing.rows_needed(arrays[3], G)
  weights = np.random.default_rng(1).standard_normal((2, *arrays[2].shape)).astype(np.float32) * arrays[3]
  kw = dict(chunk_size=chunk, remat=remat)
  (lp, ent), grads = values_and_grads(graphdef, params, arrays, weights, group_size=1, pack_rows=0, **kw)
  (lp_p, ent_p), grads_p = values_and_grads(graphdef, params, arrays, weights, group_size=G, pack_rows=rows, **kw)
  real = arrays[3] > 0
  np.testing.assert_allclose(np.asarray(lp_p)[real], np.asarray(lp)[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent_p)[real], np.asarray(ent)[real], rtol=1e-5, atol=1e-5)
  spans = np.asarray(packing.completion_spans(arrays[3]))
  past_span = np.arange(CLEN)[None] >= spans[:, None]
  assert (np.asarray(lp_p)[past_span] == 0).all() and np.abs(np.asarray(lp)[real]).max() > 0.1
  flat, flat_p = nnx.to_flat_state(grads), dict(nnx.to_flat_state(grads_p))
  for path, g in flat:
    g, g_p = np.asarray(g[...]), np.asarray(flat_p[path][...])
    scale = max(np.abs(g).max(), 1e-3)
    np.testing.assert_allclose(g_p, g, atol=2e-5 * scale, rtol=1e-4, err_msg=str(path))


def test_a_packed_row_holds_several_outputs_that_do_not_see_each_other():
  """The packing is real (fewer rows than outputs, each row's segments side by side) and a segment's logprobs do
  not change when another output of its row changes."""
  graphdef, params = build(ModelConfig(**BASE))
  arrays = list(packed_batch())
  rows = packing.rows_needed(arrays[3], G)
  forward = jax.jit(lambda params, *arrays: sequence_logprobs(nnx.merge(graphdef, params), *arrays, group_size=G,
                                                               pack_rows=rows))
  run = lambda arrays: np.asarray(forward(params, *arrays))  # noqa: E731
  before = run(arrays)
  placed = packing.plan(arrays[3], G, rows)
  segments = np.asarray(packing.layout(placed, np.zeros_like(arrays[3])).segments)
  assert rows < G and (np.sort(segments, axis=1)[:, -1] > np.sort(segments, axis=1)[:, 0]).any()
  spans = np.asarray(packing.completion_spans(arrays[3]))
  j = int(np.flatnonzero((spans > 1) & (spans < CLEN))[0])  # an output that shares its row with others
  changed = arrays[2].copy()
  changed[j] = (changed[j] + 5) % 40
  after = run([*arrays[:2], changed, arrays[3]])
  others = np.arange(P * G) != j
  np.testing.assert_array_equal(after[others], before[others])
  assert not np.array_equal(after[j], before[j])


def rollout_of(arrays, seed: int = 0) -> Rollout:
  rng = np.random.default_rng(seed)
  shape = arrays[2].shape
  old, ref = (-3.5 + 0.3 * rng.standard_normal((2, *shape))).astype(np.float32)
  return Rollout(*arrays, old, ref, rng.standard_normal(shape[0]).astype(np.float32))


@pytest.mark.parametrize('aggregation', ['sequence_mean', pytest.param('constant', marks=pytest.mark.slow)])
def test_train_step_packed_equals_unpacked(aggregation):
  """grad_accum_steps = 2 over whole groups, 2 minibatches: loss, metrics and updated params equal."""
  graphdef, params = build(ModelConfig(**BASE, qkv_bias=True))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))  # linear in the gradient (test_shared_prompt)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  arrays = [np.concatenate([a, b]) for a, b in zip(packed_batch(0)[:4], packed_batch(1)[:4], strict=True)]
  rollout = rollout_of(arrays)  # 6 prompts
  rows = packing.rows_needed(rollout.completion_mask, G)
  assert rows < G
  results = {}
  for pack_rows in (0, rows):
    state = init_state(jax.tree.map(np.array, params), tx, mesh)
    config = LossConfig(loss_aggregation=aggregation, shared_prompt_group=G, pack_rows=pack_rows, logprob_chunk=3,
                        max_len=CLEN)
    step = make_train_step(graphdef, tx, functools.partial(grpo_objective, config=config),
                           state_shardings(state, mesh), sharding.batch_sharding(mesh), mesh, grad_accum_steps=2,
                           micro_weight=grpo.grpo_micro_weight(config), group_size=G)
    state, metrics = grpo.update(step, state, rollout, jax.random.key(0), {'beta': np.float32(0.04)},
                                 num_epochs=1, num_minibatches=1, group_size=G)
    results[pack_rows] = (jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)),
                          {k: float(v) for k, v in metrics.items()})
  (params_off, metrics_off), (params_on, metrics_on) = results[0], results[rows]
  assert metrics_off['grad_norm'] > 0 and metrics_on.keys() == metrics_off.keys()
  for key in metrics_off:
    np.testing.assert_allclose(metrics_on[key], metrics_off[key], rtol=1e-4, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_on, params_off)


def test_per_packed_rows_builds_one_function_per_row_count():
  built = []

  def build_fn(rows):
    built.append(rows)
    return lambda mask: rows
  call = per_packed_rows(build_fn, lambda mask: mask, group_size=G, row_buckets=(1, 2, 3, 4))
  short = np.zeros((P * G, CLEN), np.int32)
  short[:, :2] = 1  # 4 outputs of 2 columns fit one row of 8
  full = np.ones((P * G, CLEN), np.int32)  # R = G: not packed
  assert [call(m) for m in (short, short, full, short, full)] == [1, 1, 0, 1, 0]
  assert built == [1, 0]
  assert call(jax.ShapeDtypeStruct(short.shape, short.dtype)) == 0  # abstract (the planner lowers it): unpacked
  call = per_packed_rows(build_fn, lambda mask: mask, group_size=G, row_buckets=())
  assert call(short) == 0


def test_pack_buckets_config_check(tiny_config):
  from grpo_jax.pipeline.config_checks import check_config
  from grpo_jax.pipeline.setup import pack_row_buckets
  cfg = tiny_config
  cfg.rl.pack_buckets = -1
  with pytest.raises(ValueError, match=r'config\.rl\.pack_buckets must be an int >= 0, got -1'):
    check_config(cfg, 1)
  with pytest.raises(TypeError, match='pack_buckets'):  # ml_collections keeps the field an int
    cfg.rl.pack_buckets = 1.5
  cfg.rl.pack_buckets = 2
  check_config(cfg, 1)
  assert pack_row_buckets(cfg) == (cfg.rl.group_size // 2, cfg.rl.group_size)
  cfg.rl.shared_prompt = False  # packing runs under the shared prompt only: unused, not an error
  check_config(cfg, 1)
  assert pack_row_buckets(cfg) == ()
