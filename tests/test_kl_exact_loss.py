"""rl.kl_estimator='exact': the full-vocabulary KL as the loss's KL term. core/kl.sequence_exact_kl against numpy and
make_exact_kl_fn (chunked and not), the loss's gradient against the exact KL's, a tiny GRPO stage that compiles once,
and the config errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import grpo_steps, load_config
from flax import nnx

from grpo_jax.core.kl import sequence_exact_kl
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.rollout.reference import make_exact_kl_fn
from grpo_jax.rollout.rollout import Rollout


@pytest.fixture(scope='module')
def models():
  # A wide init: two random models then disagree by a KL worth measuring.
  cfg = ModelConfig(vocab_size=23, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                    init_std=0.3)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  ref_params = nnx.split(Transformer(cfg, nnx.Rngs(1)), nnx.Param)[1]
  rng = np.random.default_rng(0)
  prompts, completions = rng.integers(1, 23, (3, 4)).astype(np.int32), rng.integers(1, 23, (3, 5)).astype(np.int32)
  prompt_mask = np.ones_like(prompts)
  prompt_mask[1, :2] = 0  # left padding
  completion_mask = np.ones_like(completions)
  completion_mask[2, 3:] = 0  # right padding
  return graphdef, params, ref_params, (prompts, prompt_mask, completions, completion_mask)


def np_kl_rows(graphdef, params, ref_params, prompts, prompt_mask, completions, completion_mask):
  """Each row's real tokens alone (no padding), both models' logits, sum_v p (log p - log q) in float64 per
  completion position: a list of [length] arrays."""
  out = []
  for b in range(prompts.shape[0]):
    tokens = np.concatenate([prompts[b][prompt_mask[b] > 0], completions[b][completion_mask[b] > 0]])[None]
    p = int(prompt_mask[b].sum())

    def logits_of(params, tokens=tokens, p=p):
      x = np.asarray(nnx.merge(graphdef, params)(tokens), np.float64)[0, p - 1:-1]
      x = x - x.max(-1, keepdims=True)
      return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logp, logq = logits_of(params), logits_of(ref_params)
    out.append([float((np.exp(logp[t]) * (logp[t] - logq[t])).sum()) for t in range(logp.shape[0])])
  return out


@pytest.mark.parametrize('chunk_size', [0, 2, 5])
def test_sequence_exact_kl_matches_numpy_and_the_measurement(models, chunk_size):
  graphdef, params, ref_params, batch = models
  per_token = np.asarray(jax.jit(lambda p, r: sequence_exact_kl(
      nnx.merge(graphdef, p), nnx.merge(graphdef, r), *batch, chunk_size=chunk_size))(params, ref_params))
  mask = batch[3].astype(bool)
  expected = np_kl_rows(graphdef, params, ref_params, *batch)
  for b in range(3):
    np.testing.assert_allclose(per_token[b][mask[b]], expected[b], rtol=1e-4, atol=1e-6)
  measured = float(make_exact_kl_fn(graphdef)(params, ref_params, *batch))
  assert per_token[mask].mean() == pytest.approx(measured, rel=1e-5)
  assert measured > 0.01


def test_the_losss_exact_kl_gradient_is_the_exact_kls(models):
  """Advantages 0 leave only beta * KL; with equal-length outputs the paper's per-output mean is the token mean
  make_exact_kl_fn measures, so the loss's gradient is the exact KL's."""
  graphdef, params, ref_params, (prompts, prompt_mask, completions, _) = models
  full = np.ones_like(completions)
  batch = Rollout(prompts, prompt_mask, completions, full, np.full(full.shape, -3.0, np.float32),
                  np.full(full.shape, -3.0, np.float32), np.zeros(3, np.float32))
  config = LossConfig(kl_estimator='exact', reference_model=functools.partial(nnx.merge, graphdef), logprob_chunk=2)
  hparams = {'beta': jnp.float32(1.0), 'ref_params': ref_params}
  loss_of = lambda p: grpo_objective(nnx.merge(graphdef, p), batch, hparams, config=config)  # noqa: E731
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(params)
  measure = make_exact_kl_fn(graphdef)
  kl, expected = jax.value_and_grad(lambda p: measure(p, ref_params, prompts, prompt_mask, completions, full))(params)
  assert float(loss) == pytest.approx(float(kl), rel=1e-5)
  assert float(metrics['kl']) == pytest.approx(float(kl), rel=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="needs LossConfig.reference_model and hparams\\['ref_params'\\]"):
    grpo_objective(nnx.merge(graphdef, params), batch, {'beta': jnp.float32(1.0)}, config=config)


def test_a_stage_with_the_exact_kl_compiles_once():
  cfg = load_config('tiny')  # beta 0.04, 2 epochs x 2 minibatches
  cfg.cpu_devices, cfg.rl.kl_estimator = 0, 'exact'
  check_config(cfg, 1)
  compiles, rows, _ = grpo_steps(cfg)
  kls = [row['kl'] for row in rows]
  assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles
  assert all(np.isfinite(k) and k >= 0 for k in kls) and kls[-1] > 0, kls


@pytest.mark.parametrize('overrides, message', [
    (dict(beta=0.0), r"kl_estimator='exact' is the loss's KL term: it needs rl.beta > 0"),
    (dict(kl_in_reward=True), r"kl_estimator='exact' is the loss's KL term"),
    (dict(trainer_sampling_filters=True), r"kl_estimator='exact' is the loss's KL term"),
])
def test_exact_kl_config_errors(overrides, message):
  cfg = load_config('tiny')
  cfg.rl.kl_estimator = 'exact'
  cfg.rl.update(overrides)
  with pytest.raises(ValueError, match=message):
    check_config(cfg, 1)


def test_exact_kl_with_lora_or_sharded_weights_fails():
  cfg = load_config('tiny')
  cfg.rl.kl_estimator, cfg.lora.rank = 'exact', 4
  with pytest.raises(ValueError, match='with LoRA on GRPO is unsupported'):
    check_config(cfg, 1)
  cfg = load_config('tiny')
  cfg.rl.kl_estimator, cfg.mesh.fsdp, cfg.mesh.data = 'exact', 2, 1
  with pytest.raises(ValueError, match=r'needs config.mesh.fsdp = mesh.tensor = 1'):
    check_config(cfg, 2)
