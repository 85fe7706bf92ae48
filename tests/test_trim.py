"""No compute on padding (rollout/trim.py, rl.length_buckets): the buckets and the chosen width against plain loops;
the cut batch gives the same reference logprobs, loss, metrics and update as the full-width one; a bucket compiles
once; rollouts, dynamic sampling and prefix resampling at a cut width."""
from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
from conftest import count_compiles, load_config
from helpers import (
  CUTS,
  MESH,
  C,
  cached_sampler,
  char_reward,
  grpo_batch,
  host_params,
  policy_fixture,
  policy_rollout,
  tokenizer_fixture,
)
from ml_collections import ConfigDict

from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.prefix_credit import prefix_credit
from grpo_jax.rollout.reference import make_sequence_logprobs_fn
from grpo_jax.rollout.rollout import Rollout, take_groups
from grpo_jax.rollout.trim import bucket_width, completion_buckets, pad_columns, trim_columns

# The fixtures this file's tests take, under the names pytest finds them by.
tokenizer, policy = tokenizer_fixture, policy_fixture

OPT = dict(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0, master_dtype='float32')
HPARAMS = {'beta': np.float32(0.04)}


@pytest.mark.parametrize('max_len,num,multiple', [(40, 4, 8), (1024, 4, 8), (40, 1, 8), (100, 3, 64), (7, 8, 8),
                                                  (512, 6, 16)])
def test_buckets_against_a_loop(max_len, num, multiple):
  widths = []
  for k in range(1, num + 1):
    w = max_len if k == num else min(max_len, -(-(max_len * k) // (num * multiple)) * multiple)
    if w not in widths:
      widths.append(w)
  assert completion_buckets(max_len, num, multiple) == tuple(sorted(widths))
  assert completion_buckets(max_len, num, multiple)[-1] == max_len


def test_width_is_the_smallest_bucket_holding_the_longest_row():
  buckets = (16, 24, 32, 40)
  for longest in range(41):
    mask = np.zeros((3, 40), np.int32)
    mask[1, :longest] = 1
    expected = min(w for w in buckets if w >= max(longest, 1)) if longest else 16
    assert bucket_width(mask, buckets) == expected, longest
  assert bucket_width(np.ones((2, 40)), ()) == 40  # no buckets: no cut
  assert bucket_width(np.ones((2, 10)), buckets) == 10  # already narrower than every bucket that fits


def test_pad_undoes_trim_on_padding():
  batch = grpo_batch(6, 5, 12)
  width = bucket_width(batch.completion_mask, (4, 8, 12))
  cut = trim_columns(batch[2:], width)
  assert [np.shape(x)[1] for x in cut[:4]] == [width] * 4 and cut[4] is batch.advantages
  for a, b in zip(pad_columns(cut, 12)[:4], batch[2:6], strict=True):
    np.testing.assert_array_equal(np.where(batch.completion_mask > 0, a, 0), np.where(batch.completion_mask > 0, b, 0))


def _short_batch(n=8, p=5, c=24, longest=9, seed=0) -> Rollout:
  """grpo_batch with every completion at most `longest` tokens: columns longest.. are padding."""
  batch = grpo_batch(n, p, longest, seed=seed)
  return Rollout(*batch[:2], *pad_columns(batch[2:], c))


@pytest.mark.parametrize('chunk', [0, 4])
def test_reference_forward_of_the_cut_batch_equals_the_full_one(chunk):
  graphdef, params = host_params()
  batch = _short_batch()
  forward = make_sequence_logprobs_fn(graphdef, chunk_size=chunk)
  full = np.asarray(forward(params, *batch[:4]))
  width = bucket_width(batch.completion_mask, (8, 16, 24))
  assert width < 24
  cut = np.asarray(forward(params, *batch[:2], *trim_columns(batch[2:4], width)))
  real = batch.completion_mask[:, :width] > 0
  np.testing.assert_allclose(cut[real], full[:, :width][real], rtol=1e-5, atol=1e-5)


def _train_step(graphdef, config: LossConfig):
  tx = make_optimizer(ConfigDict(OPT), 10)
  step = make_train_step(graphdef, tx, functools.partial(grpo_objective, config=config),
                         state_shardings(init_state(host_params()[1], tx, MESH), MESH), sharding.batch_sharding(MESH),
                         MESH)
  return step, tx


@pytest.mark.parametrize('aggregation,chunk', [('sequence_mean', 0), ('token_mean', 4), ('constant', 0)])
def test_update_on_the_cut_batch_equals_the_full_one(aggregation, chunk):
  graphdef, params = host_params()
  config = LossConfig(kl_penalty=True, loss_aggregation=aggregation, logprob_chunk=chunk, max_len=24)
  step, tx = _train_step(graphdef, config)
  batch = _short_batch()
  width = bucket_width(batch.completion_mask, (8, 16, 24))
  full_state, full = step(init_state(params, tx, MESH), batch, HPARAMS)
  cut_state, cut = step(init_state(params, tx, MESH), Rollout(*batch[:2], *trim_columns(batch[2:], width)), HPARAMS)
  for k in full:
    np.testing.assert_allclose(np.asarray(cut[k]), np.asarray(full[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  assert float(full['grad_norm']) > 0
  for a, b in zip(jax.tree.leaves(cut_state.params), jax.tree.leaves(full_state.params), strict=True):
    # Adam divides by the gradient's own scale, so a near-zero gradient's rounding shows at 1e-6 in its update.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-5)


def test_a_bucket_compiles_once():
  graphdef, params = host_params()
  step, tx = _train_step(graphdef, LossConfig(kl_penalty=True))
  run = lambda batch: step(init_state(params, tx, MESH), batch, HPARAMS)  # noqa: E731
  narrow = [Rollout(*b[:2], *trim_columns(b[2:], 8)) for b in (_short_batch(longest=7, seed=s) for s in (1, 2))]
  wide = _short_batch(longest=20)
  counts = [count_compiles(lambda b=b: run(b))[1] for b in (narrow[0], narrow[1], wide, narrow[0])]
  assert counts[0] > 0 and counts[2] > 0 and counts[1] == counts[3] == 0, counts


def test_take_groups_pads_draws_of_different_widths():
  a, b = _short_batch(n=4, c=8, longest=8, seed=1), _short_batch(n=4, c=16, longest=16, seed=2)
  picked = take_groups([a, b], [(0, 1), (1, 0)], group_size=2)
  assert picked.completion_tokens.shape == (4, 16)
  np.testing.assert_array_equal(picked.completion_mask[:2, :8], a.completion_mask[2:])
  assert not picked.completion_mask[:2, 8:].any()
  np.testing.assert_array_equal(picked.completion_tokens[2:], b.completion_tokens[:2])


def test_prefix_credit_of_a_cut_rollout_keeps_the_budget(tokenizer, policy):
  # Greedy continuations of a greedy rollout: the full-width rollout and its cut copy (told the budget) see the same
  # joined outputs, so the same values and advantages on the kept columns.
  graphdef, params, eos = policy
  rollout, split = policy_rollout(tokenizer, policy, True)
  # Outputs ended early (the greedy ones fill the budget), so the batch has columns to cut; the continuations do not.
  lengths = np.arange(rollout.completion_mask.shape[0]) % (C // 2) + 1
  short = (np.arange(C)[None] < lengths[:, None]).astype(np.int32)
  rollout = rollout._replace(completion_tokens=np.where(short > 0, rollout.completion_tokens, tokenizer.pad_token_id),
                             completion_mask=short)
  sampler = cached_sampler(graphdef, eos, tokenizer.pad_token_id, group_size=2, greedy=True)
  width = bucket_width(rollout.completion_mask, completion_buckets(C, 4))
  assert width < C
  kw = dict(group_size=2, continuations=2, cut_fractions=CUTS, tokenizer=tokenizer, reward_fn=char_reward)
  full, full_stats = prefix_credit(rollout, split, sampler, params, jax.random.key(1), **kw)
  cut_rollout = Rollout(*rollout[:2], *trim_columns(rollout[2:], width))
  cut, cut_stats = prefix_credit(cut_rollout, split, sampler, params, jax.random.key(1), max_len=C, **kw)
  np.testing.assert_allclose(np.asarray(cut.advantages), np.asarray(full.advantages)[:, :width], atol=1e-6)
  for k in ('prefix_continuation_tokens', 'prefix_value_change', 'prefix_truncated', 'prefix_value_first'):
    assert cut_stats[k] == pytest.approx(full_stats[k]), k


def test_grpo_steps_cut_to_buckets_and_log_the_width():
  from conftest import grpo_steps
  cfg = load_config('tiny')
  cfg.cpu_devices, cfg.rl.length_buckets = 0, 4
  compiles, rows, _ = grpo_steps(cfg, num_steps=2)
  buckets = grpo.length_buckets(cfg)
  for r in rows:
    assert r['completion_width'] in buckets
    assert r['completion_width'] >= math.ceil(r['completion_len'])


def test_length_buckets_config_check():
  cfg = load_config('tiny')
  cfg.rl.length_buckets = 0
  with pytest.raises(ValueError, match=r'rl.length_buckets must be an int >= 1'):
    check_config(cfg, 1)


def test_update_cuts_each_minibatch_to_its_own_bucket():
  rng = np.random.default_rng(0)
  n, c, buckets = 16, 32, (8, 16, 24, 32)
  lengths = np.where(np.arange(n) < 8, rng.integers(1, 9, n), rng.integers(17, 33, n))  # short rows, then long
  mask = (np.arange(c)[None] < lengths[:, None]).astype(np.int32)
  ids = np.arange(n)[:, None]
  rollout = Rollout(ids, ids, np.where(mask > 0, 5, 0), mask, np.zeros((n, c), np.float32),
                    np.zeros((n, c), np.float32), np.zeros(n, np.float32))
  seen = []

  def step(state, batch, hparams):
    mask = np.asarray(batch.completion_mask)
    seen.append((np.asarray(batch.prompt_tokens)[:, 0], mask.shape[1], mask))
    return state, {'loss': np.float32(0.0)}

  grpo.update(step, None, rollout, jax.random.key(0), {}, num_epochs=3, num_minibatches=2, group_size=8,
              length_buckets=buckets)
  widths = []
  for rows, width, cut in seen:
    assert width == bucket_width(mask[rows], buckets)
    np.testing.assert_array_equal(cut, mask[rows][:, :width])
    assert not mask[rows][:, width:].any()  # only padding was cut
    widths.append(width)
  assert set(widths) == {8, 32}  # the short group's minibatch runs 8 wide, the long one's the whole 32
