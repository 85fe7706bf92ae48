"""Dynamic sampling (rl.dynamic_sampling): the group pick against a loop, the refill from keyed prompt streams, the
recomputed advantages, no recompiles across steps and draws, and the config checks of the sampling switches."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles, load_config

from grpo_jax.core.advantages import get_advantage_fn
from grpo_jax.data.batches import batch_indices
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.setup import build_setup
from grpo_jax.rollout.rollout import Rollout, choose_groups, dynamic_sampling, group_has_signal, take_groups


def choose_loop(signal, num_groups):
  """Signal-carrying groups first, in (draw, group) order, then the others in the same order."""
  first, second = [], []
  for d, s in enumerate(signal):
    for g, carries in enumerate(s):
      (first if carries else second).append((d, g))
  picks = first[:num_groups]
  filled = num_groups - len(picks)
  return picks + second[:filled], filled


def test_choose_groups_matches_a_loop():
  rng = np.random.default_rng(0)
  for _ in range(50):
    draws, p = rng.integers(1, 4), rng.integers(1, 6)
    signal = [rng.random(p) < rng.random() for _ in range(draws)]
    assert choose_groups(signal, p) == choose_loop(signal, p)
  # Worked: two draws of 3 groups, signal [F, T, F], [T, F, T]: (0,1), (1,0), (1,2); nothing filled.
  assert choose_groups([np.array([False, True, False]), np.array([True, False, True])], 3) == (
      [(0, 1), (1, 0), (1, 2)], 0)
  assert choose_groups([np.array([False, True, False])], 3) == ([(0, 1), (0, 0), (0, 2)], 2)


def test_group_has_signal():
  rewards = np.array([[1, 1, 1], [0, 1, 0], [0.5, 0.5, 0.5], [0, 0, 1e-3]], np.float32)
  np.testing.assert_array_equal(group_has_signal(rewards), [len(set(r)) > 1 for r in rewards.tolist()])


def fake_rollout(rewards, draw, group_size):
  """A Rollout whose every array marks its (draw, row), for following rows through take_groups."""
  n = rewards.size
  rows = (100 * draw + np.arange(n)).astype(np.float32)
  tag = np.repeat(rows[:, None], 3, axis=1)
  return Rollout(tag, tag, tag, np.ones((n, 3), np.int32), tag, tag, rows)


def test_dynamic_sampling_refills_signal_groups_and_recomputes_advantages():
  g = 2
  draws = [np.array([[1, 1], [0, 1], [0, 0]], np.float32),  # one group with signal
           np.array([[1, 0], [1, 1], [0, 0]], np.float32),  # one more
           np.array([[0, 0], [1, 0], [0.5, 1]], np.float32),  # two more: enough, stop
           np.array([[1, 0], [1, 0], [1, 0]], np.float32)]  # never drawn
  calls = []

  def draw(d):
    calls.append(d)
    return fake_rollout(draws[d], d, g), {'sample_time': 1.0, 'completion_len': 2.0}, draws[d]

  advantage_fn = get_advantage_fn('batch_std')  # a batch-level scale: must see the final batch, not each draw's
  batch, stats = dynamic_sampling(draw, num_groups=3, group_size=g, max_draws=5, advantage_fn=advantage_fn)
  assert calls == [0, 1, 2]
  picks = [(0, 1), (1, 0), (2, 1)]
  expected_rows = [100 * d + g * k + j for d, k in picks for j in range(g)]
  np.testing.assert_array_equal(batch.completion_tokens[:, 0], expected_rows)
  picked = np.stack([draws[d][k] for d, k in picks])
  np.testing.assert_allclose(batch.advantages, np.asarray(advantage_fn(picked)).ravel(), rtol=1e-6)
  assert stats == {'dynamic_draws': 2, 'dynamic_filled_frac': 0.0, 'sampled_tokens': 3 * 6 * 2.0, 'sample_time': 3.0}
  # Out of draws: the missing groups are zero-signal ones, counted.
  calls.clear()
  batch, stats = dynamic_sampling(draw, num_groups=3, group_size=g, max_draws=1, advantage_fn=advantage_fn)
  assert calls == [0, 1] and stats['dynamic_filled_frac'] == pytest.approx(1 / 3) and stats['dynamic_draws'] == 1
  np.testing.assert_array_equal(batch.completion_tokens[::g, 0], [2, 100, 0])  # (0,1), (1,0), then filler (0,0)


def test_take_groups_keeps_each_group_contiguous():
  r = [fake_rollout(np.zeros((3, 2)), d, 2) for d in range(2)]
  out = take_groups(r, [(1, 2), (0, 0)], 2)
  np.testing.assert_array_equal(out.advantages, [104, 105, 0, 1])
  assert all(np.asarray(x).shape[0] == 4 for x in out)


def text_length_reward(texts, answers):
  """A deterministic reward that gives some groups variance and others none."""
  return np.asarray([float(len(t) % 9 == 0) for t in texts], np.float32)


@pytest.fixture(scope='module')
def dynamic_stage():
  cfg = load_config('tiny')
  cfg.cpu_devices, cfg.rl.dynamic_sampling, cfg.rl.dynamic_sampling_max_draws = 0, True, 3
  check_config(cfg, 1)
  setup = build_setup(cfg)
  setup = dataclasses.replace(setup, reward_fn=text_length_reward)
  return cfg, setup


def test_dynamic_sampling_draws_from_step_keyed_streams_without_recompiling(dynamic_stage, monkeypatch):
  cfg, setup = dynamic_stage
  seen = []
  collect = grpo.collect_rollout

  def spy(sampler, ref_fn, params, ref_params, prompts, rng, **kwargs):
    out = collect(sampler, ref_fn, params, ref_params, prompts, rng, **kwargs)
    seen.append((prompts.prompt_tokens, np.asarray(jax.random.key_data(rng)), out[2]))
    return out

  monkeypatch.setattr(grpo, 'collect_rollout', spy)
  stage = grpo.make_stage(setup, jax.tree.map(jnp.copy, setup.init_params))  # the step donates
  state, compiles, rows = stage.state, [], []
  for i in range(3):
    seen.clear()
    (state, metrics), n = count_compiles(lambda: stage.step(state, i))  # noqa: B023
    compiles.append(n)
    rows.append((dict(metrics), list(seen)))
  assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles  # further draws reuse the step's programs
  train = setup.splits['train']
  drew_more = False
  for i, (metrics, draws) in enumerate(rows):
    assert metrics['dynamic_draws'] == len(draws) - 1 <= cfg.rl.dynamic_sampling_max_draws
    drew_more |= len(draws) > 1
    for d, (prompt_tokens, _, _) in enumerate(draws):  # draw d of step i: batch i of its own stream
      stream = 'grpo' if d == 0 else f'grpo_dynamic_{d}'
      idx = batch_indices(len(train), cfg.rl.num_prompts, i, seed=cfg.seed, stream=stream)
      np.testing.assert_array_equal(prompt_tokens, train.prompt_tokens[idx])
    signal = sum(int(group_has_signal(r).sum()) for _, _, r in draws)
    filled = max(cfg.rl.num_prompts - signal, 0)
    assert metrics['dynamic_filled_frac'] == filled / cfg.rl.num_prompts
    assert len({k.tobytes() for _, k, _ in draws}) == len(draws)  # each draw its own sampling key
    assert metrics['sampled_tokens'] >= metrics['completion_len'] * cfg.rl.num_prompts * cfg.rl.group_size
  assert drew_more, 'the reward should leave some step short of signal groups'


def test_a_dynamic_step_is_a_function_of_the_step(dynamic_stage):
  """What resuming needs: step i from the same state draws the same prompts and samples, so gives the same row."""
  _, setup = dynamic_stage
  stage = grpo.make_stage(setup, jax.tree.map(jnp.copy, setup.init_params))  # the step donates
  state, _ = stage.step(stage.state, 0)
  copy = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731  (the step donates its state)
  _, first = stage.step(copy(), 1)
  _, again = stage.step(copy(), 1)
  timing = ('sample_time', 'sampled_tokens_per_s')
  values = lambda metrics: {k: float(v) for k, v in metrics.items() if k not in timing}  # noqa: E731
  assert values(first) == values(again)


@pytest.mark.parametrize('overrides, message', [
    (dict(dynamic_sampling=1), r'rl.dynamic_sampling must be True or False'),
    (dict(dynamic_sampling_max_draws=0), r'rl.dynamic_sampling_max_draws must be an int >= 1'),
    (dict(dynamic_sampling=True, supervision='process'), r"dynamic_sampling with rl.supervision='process'"),
    (dict(overlong_penalty_len=-1), r'rl.overlong_penalty_len must be an int >= 0'),
    (dict(overlong_penalty_len=41), r'overlong_penalty_len=41 \(L_cache\) must be at most max_new_tokens=40'),
    (dict(mask_truncated='yes'), r'rl.mask_truncated must be True or False'),
    (dict(tis_cap=0.5), r'rl.tis_cap=0.5 must be 0 \(off\) or >= 1'),
    (dict(tis_cap=-1.0), r'rl.tis_cap=-1.0 must be 0'),
    (dict(trainer_sampling_filters=0), r'rl.trainer_sampling_filters must be True or False'),
    (dict(trainer_sampling_filters=True, kl_in_reward=True, beta=0.04), r'trainer_sampling_filters with rl.kl_in_'),
    (dict(mismatch_rows=10_000), r'mismatch_rows=10000 is more than'),
    (dict(mismatch_rows=1.5), r'rl.mismatch_rows must be an int >= 0'),
])
def test_bad_sampling_switches_fail_before_anything_is_built(overrides, message):
  cfg = load_config()
  for key, value in overrides.items():
    del cfg.rl[key]  # ConfigDict keeps a field's type: a wrongly typed value needs the field replaced
    cfg.rl[key] = value
  with pytest.raises(ValueError, match=message):
    check_config(cfg, 1)


def test_dynamic_sampling_with_g_below_2_fails():
  cfg = load_config()
  cfg.rl.dynamic_sampling, cfg.rl.group_size = True, 1
  with pytest.raises(ValueError, match=r'group_size \(G\) must be >= 2'):
    check_config(cfg, 1)


def test_good_sampling_switches_pass():
  cfg = load_config()
  cfg.rl.update(dict(dynamic_sampling=True, overlong_penalty_len=8, mask_truncated=True, tis_cap=2.0,
                     trainer_sampling_filters=True, mismatch_rows=0))
  check_config(cfg, 1)
