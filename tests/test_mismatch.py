"""Sampler / trainer mismatch (rl.mismatch_rows, rl.tis_cap, rl.trainer_sampling_filters): the TIS weights and the
logged gap against numpy loops, identical numerics giving weight 1 and gap 0, the trainer's filtered logprobs
against a numpy transcription of temperature / top-k / top-p, and the loss with the filter."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import grpo_steps, load_config
from flax import nnx

from grpo_jax.core.losses import LossConfig, grpo_loss, grpo_objective, mean_abs_diff, tis_weights
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.setup import build_setup
from grpo_jax.rollout.reference import make_trainer_logprobs_fn, sampling_filter
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.sampling import make_sampler


def tis_loop(trainer, sampler, mask, cap):
  out = np.zeros(trainer.shape, np.float32)
  for i in range(trainer.shape[0]):
    for t in range(trainer.shape[1]):
      if mask[i, t]:
        out[i, t] = min(np.exp(trainer[i, t] - sampler[i, t]), cap)
  return out


def test_tis_weights_and_the_gap_match_loops():
  rng = np.random.default_rng(0)
  sampler = rng.normal(-2, 1, (5, 7)).astype(np.float32)
  trainer = (sampler + rng.normal(0, 0.5, (5, 7))).astype(np.float32)
  mask = (rng.random((5, 7)) < 0.7).astype(np.int32)
  trainer[mask == 0] = np.inf  # padding's values must not matter
  for cap in (1.0, 2.0, 10.0):
    np.testing.assert_allclose(tis_weights(trainer, sampler, mask, cap=cap), tis_loop(trainer, sampler, mask, cap),
                               rtol=1e-6)
  gaps = [abs(trainer[i, t] - sampler[i, t]) for i in range(5) for t in range(7) if mask[i, t]]
  assert float(mean_abs_diff(trainer, sampler, mask)) == pytest.approx(np.mean(gaps), rel=1e-6)
  assert float(mean_abs_diff(trainer, sampler, 0 * mask)) == 0.0
  # Identical numerics: every weight 1, the gap 0.
  np.testing.assert_array_equal(tis_weights(sampler, sampler, mask, cap=2.0), mask.astype(np.float32))
  assert float(mean_abs_diff(sampler, sampler, mask)) == 0.0


def rollout_of(rng, n=4, c=5, per_token=False):
  mask = np.ones((n, c), np.int32)
  mask[0, 3:] = 0
  tokens = rng.integers(4, 20, (n, c)).astype(np.int32)
  old = np.where(mask > 0, rng.normal(-2, 1, (n, c)), 0.0).astype(np.float32)
  advantages = rng.normal(size=(n, c) if per_token else (n,)).astype(np.float32)
  return Rollout(tokens, np.ones_like(tokens), tokens, mask, old, old - 0.1, advantages)


def test_sampler_vs_trainer_weights_each_tokens_advantage():
  rng = np.random.default_rng(1)
  for per_token in (False, True):
    rollout = rollout_of(rng, per_token=per_token)
    raw = rollout.old_logprobs + rng.normal(0, 0.7, rollout.old_logprobs.shape).astype(np.float32)
    filtered = raw - 1.0  # what the loss reads as pi_old
    calls = []

    def trainer_old(params, *arrays, raw=raw, filtered=filtered, calls=calls):
      calls.append(arrays[0].shape[0])
      return raw, filtered

    out, stats = grpo.sampler_vs_trainer(trainer_old, None, rollout, rows=None, tis_cap=2.0)
    weights = tis_loop(raw, rollout.old_logprobs, rollout.completion_mask, 2.0)
    adv = rollout.advantages if per_token else np.repeat(rollout.advantages[:, None], 5, axis=1)
    np.testing.assert_allclose(out.advantages, adv * weights, rtol=1e-6)
    np.testing.assert_array_equal(out.old_logprobs, filtered)
    np.testing.assert_array_equal(out.ref_logprobs, rollout.ref_logprobs)
    real = rollout.completion_mask > 0
    assert stats['tis_weight'] == pytest.approx(weights[real].mean(), rel=1e-6)
    assert stats['tis_capped_frac'] == pytest.approx((np.exp(raw - rollout.old_logprobs) > 2.0)[real].mean())
    assert stats['logprob_diff_sampler_trainer'] == pytest.approx(np.abs(raw - rollout.old_logprobs)[real].mean(),
                                                                  rel=1e-6)
    assert calls == [4]


def test_identical_numerics_give_weight_one_and_no_gap():
  rollout = rollout_of(np.random.default_rng(2))
  same = lambda params, *arrays: (arrays[-1] * 0 + rollout.old_logprobs,) * 2  # noqa: E731
  out, stats = grpo.sampler_vs_trainer(same, None, rollout, rows=None, tis_cap=3.0)
  assert stats['logprob_diff_sampler_trainer'] == 0.0 and stats['tis_weight'] == 1.0 and stats['tis_capped_frac'] == 0
  np.testing.assert_array_equal(out.advantages, rollout.advantages[:, None] * rollout.completion_mask)
  # Only the logged gap: a few rows (0 and 3 of 4), the rollout unchanged.
  seen = []

  def few_rows(params, *arrays):
    seen.append(arrays[0].shape[0])
    return (rollout.old_logprobs[[0, 3]],) * 2

  out, stats = grpo.sampler_vs_trainer(few_rows, None, rollout, rows=2, tis_cap=0.0)
  assert seen == [2]
  assert out is rollout and stats == {'logprob_diff_sampler_trainer': 0.0}


@pytest.fixture(scope='module')
def tiny_model():
  tokenizer = build_tokenizer()
  cfg = ModelConfig(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  return graphdef, params, cfg.vocab_size


def test_the_trainers_forward_agrees_with_the_samplers_logprobs(tiny_model):
  """Same model, same tokens: the trainer's raw pi_old matches what the sampler reported up to float rounding
  (a cached decode against one full forward), so the TIS weights are 1 to that precision."""
  graphdef, params, _ = tiny_model
  sampler = make_sampler(graphdef, max_new_tokens=8, eos_id=3, pad_id=0, group_size=4, temperature=0.8, top_k=10)
  prompts = np.random.default_rng(0).integers(4, 30, (2, 5)).astype(np.int32)
  prompt_mask = np.ones_like(prompts)
  out = jax.tree.map(np.asarray, sampler(params, prompts, prompt_mask, jax.random.key(1)))
  raw, filtered = make_trainer_logprobs_fn(graphdef)(params, np.repeat(prompts, 4, 0), np.repeat(prompt_mask, 4, 0),
                                                     out.tokens, out.mask)
  assert float(mean_abs_diff(raw, out.logprobs, out.mask)) < 1e-5
  np.testing.assert_allclose(np.asarray(tis_weights(raw, out.logprobs, out.mask, cap=2.0))[out.mask > 0], 1.0,
                             atol=1e-5)
  np.testing.assert_array_equal(raw, filtered)  # no filter: the same logprobs twice


def filter_loop(logits, temperature, top_k, top_p):
  """filter_logits transcribed one row at a time: divide by temperature, keep the top_k largest, then the
  smallest prefix (by descending logit) whose mass reaches top_p; the rest -inf."""
  out = np.full(logits.shape, -np.inf)
  for i, row in enumerate(logits.astype(np.float64) / temperature):
    keep = np.ones(row.shape, bool)
    if top_k:
      keep &= row >= np.sort(row)[::-1][top_k - 1]
    kept = np.where(keep, row, -np.inf)
    if top_p < 1:
      probs = np.exp(kept - kept.max())
      probs /= probs.sum()
      order, before, nucleus = np.argsort(-kept, kind='stable'), 0.0, np.zeros(row.shape, bool)
      for j in order:
        if before < top_p:
          nucleus[j] = True
        before += probs[j]
      keep &= row >= row[nucleus].min()
    out[i] = np.where(keep, row, -np.inf)
  return out


def log_softmax_loop(row):
  finite = row[np.isfinite(row)]
  return row - (finite.max() + np.log(np.exp(finite - finite.max()).sum()))


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8),
                                                        (0.9, 8, 0.6)])
def test_filtered_trainer_logprobs_match_numpy(tiny_model, temperature, top_k, top_p):
  graphdef, params, vocab = tiny_model
  rng = np.random.default_rng(3)
  prompts, completions = rng.integers(4, 30, (3, 4)).astype(np.int32), rng.integers(4, 30, (3, 6)).astype(np.int32)
  pm, cm = np.ones_like(prompts), np.ones_like(completions)
  filt = sampling_filter(temperature=temperature, top_k=top_k, top_p=top_p)
  raw, filtered = make_trainer_logprobs_fn(graphdef, logits_filter=filt)(params, prompts, pm, completions, cm)
  model = nnx.merge(graphdef, params)
  tokens = np.concatenate([prompts, completions], 1)
  logits = np.asarray(model(tokens, np.broadcast_to(np.arange(10), (3, 10)), np.ones((3, 10), bool)))[:, 3:-1]
  expected_raw, expected = np.zeros((3, 6)), np.zeros((3, 6))
  for b in range(3):
    flat = filter_loop(logits[b], temperature, top_k, top_p)
    for t in range(6):
      expected_raw[b, t] = log_softmax_loop(logits[b, t].astype(np.float64))[completions[b, t]]
      expected[b, t] = log_softmax_loop(flat[t])[completions[b, t]]
  np.testing.assert_allclose(raw, expected_raw, rtol=1e-4, atol=1e-5)
  finite = np.isfinite(expected)
  np.testing.assert_array_equal(np.isfinite(filtered), finite)  # the same tokens filtered out
  np.testing.assert_allclose(np.asarray(filtered)[finite], expected[finite], rtol=1e-4, atol=1e-5)
  if top_k or top_p < 1:
    assert not finite.all()  # the case tests the exclusion too


def test_the_loss_with_the_samplers_filter(tiny_model):
  """grpo_objective with logits_filter = grpo_loss on the filtered logprobs, tokens the filter excludes left out of
  the loss; the identity filter changes nothing; the gradient stays finite."""
  graphdef, params, _ = tiny_model
  rng = np.random.default_rng(4)
  prompts, completions = rng.integers(4, 30, (4, 3)).astype(np.int32), rng.integers(4, 30, (4, 5)).astype(np.int32)
  pm, cm = np.ones_like(prompts), np.ones_like(completions)
  filt = sampling_filter(temperature=0.8, top_k=6)
  _, filtered = make_trainer_logprobs_fn(graphdef, logits_filter=filt)(params, prompts, pm, completions, cm)
  filtered = np.asarray(filtered)
  inside = np.isfinite(filtered)
  assert inside.any() and not inside.all()
  old = np.where(inside, filtered - 0.05, -np.inf).astype(np.float32)
  ref = np.where(inside, filtered + 0.1, 0.0).astype(np.float32)
  advantages = np.array([1.0, -0.5, 0.3, -1.2], np.float32)
  batch = Rollout(prompts, pm, completions, cm, old, ref, advantages)
  hparams = {'beta': jnp.float32(0.04)}

  def loss_of(params, config):
    return grpo_objective(nnx.merge(graphdef, params), batch, hparams, config=config)

  loss, metrics = jax.jit(functools.partial(loss_of, config=LossConfig(logits_filter=filt)))(params)
  expected, _ = grpo_loss(np.where(inside, filtered, 0.0), np.where(inside, old, 0.0), ref, advantages,
                          inside.astype(np.int32), beta=0.04)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  grads = jax.jit(jax.grad(lambda p: loss_of(p, LossConfig(logits_filter=filt))[0]))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  identity = sampling_filter(temperature=1.0)
  finite = Rollout(prompts, pm, completions, cm, np.full_like(old, -3.0), np.full_like(old, -3.1), advantages)
  plain = grpo_objective(nnx.merge(graphdef, params), finite, hparams, config=LossConfig())[0]
  same = grpo_objective(nnx.merge(graphdef, params), finite, hparams, config=LossConfig(logits_filter=identity))[0]
  assert float(same) == pytest.approx(float(plain), rel=1e-6)
  assert metrics['entropy'] > 0


def test_a_step_with_tis_and_filters_starts_on_policy_and_compiles_once():
  cfg = load_config('tiny')
  cfg.cpu_devices, cfg.rl.tis_cap, cfg.rl.trainer_sampling_filters = 0, 2.0, True
  cfg.rl.temperature, cfg.rl.top_k, cfg.rl.top_p = 0.9, 12, 0.95
  check_config(cfg, 1)
  compiles, rows, _ = grpo_steps(cfg)
  assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles
  for row in rows:  # the same params on both sides: the gap is float rounding, every weight about 1
    assert row['logprob_diff_sampler_trainer'] < 1e-4
    assert row['tis_weight'] == pytest.approx(1.0, abs=1e-4) and row['tis_capped_frac'] == 0.0
    assert np.isfinite(row['loss']) and np.isfinite(row['kl'])
  # The first minibatch of each step is on-policy under the filtered distribution: ratio 1 before any update.
  assert rows[0]['ratio_min'] <= 1.0 <= rows[0]['ratio_max']


def test_the_default_logs_the_gap_on_a_few_rows():
  cfg = load_config('tiny')
  cfg.cpu_devices, cfg.rl.num_steps = 0, 1
  setup = build_setup(cfg)
  stage = grpo.make_stage(setup, setup.init_params)
  _, metrics = stage.step(stage.state, 0)
  assert 0 <= float(metrics['logprob_diff_sampler_trainer']) < 1e-4 and 'tis_weight' not in metrics
