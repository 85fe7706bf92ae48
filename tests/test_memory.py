"""Memory knobs give the default's numbers with less memory: model.remat, bfloat16 params trained through a
float32 master copy ({sft,rl}.master_dtype), gradient accumulation ({sft,rl}.grad_accum_steps).

Memory is XLA's compiled plan (`compiled.memory_analysis().temp_size_in_bytes`), read on CPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config
from flax import nnx
from helpers import HPARAMS, compiled_step, grpo_batch, host_params
from ml_collections import ConfigDict

from grpo_jax.core.losses import LossConfig, completion_token_count, grpo_objective, sft_loss
from grpo_jax.data.batches import SFTBatch
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.train_state import MasterState, make_optimizer
from grpo_jax.rollout.sampling import make_sampler

GRPO_LOSS = functools.partial(grpo_objective, config=LossConfig())
OPT = dict(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.1, grad_clip=1.0, master_dtype='float32')


def run_step(graphdef, params, tx, loss_fn, batch, **kwargs):
  compiled, state = compiled_step(graphdef, params, tx, loss_fn, batch, **kwargs)
  new_state, metrics = compiled(state, batch, HPARAMS)
  return new_state, jax.tree.map(np.asarray, metrics)


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


# --- remat ------------------------------------------------------------------------------------------------


def test_remat_policies_same_update_and_full_remat_needs_less_memory():
  # 16 x 128 tokens: per layer the [16, 2, 2, 128, 128] attention probabilities alone are 4 MiB. The saving
  # grows with depth (4 layers: 115 MB none, 36 MB full); 2 keep the compiles short.
  graphdef, params = host_params(num_layers=2, d_model=64, mlp_dim=256)
  batch = grpo_batch(16, 64, 64)
  tx = optax.sgd(1.0)  # new params = params - grads: compares the gradients themselves
  results = {}
  for remat in ('none', 'full', 'save_dots'):
    loss_fn = functools.partial(grpo_objective, config=LossConfig(remat=remat))
    # The trainer's own jit, no extra options: on CPU it keeps jax.checkpoint's barriers (sharding.KEEP_REMAT),
    # without which XLA:CPU's CSE merges the recomputation back into the forward and remat saves nothing.
    compiled, state = compiled_step(graphdef, params, tx, loss_fn, batch)
    new_state, metrics = compiled(state, batch, HPARAMS)
    results[remat] = (compiled.memory_analysis().temp_size_in_bytes, metrics, new_state.params)
  temp = {k: v[0] for k, v in results.items()}
  print(f'train step temp bytes: {temp}')
  for remat in ('full', 'save_dots'):
    np.testing.assert_allclose(results[remat][1]['loss'], results['none'][1]['loss'], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[remat][1]['grad_norm'], results['none'][1]['grad_norm'], rtol=1e-6)
    assert_trees_close(results[remat][2], results['none'][2], rtol=1e-6, atol=1e-6)
  # Measured 61.3 MB none, 35.3 MB full, 28.4 MB save_dots (jax 0.10.2).
  assert temp['full'] < 0.7 * temp['none'], temp
  assert temp['save_dots'] < temp['none'], temp


# --- mixed precision --------------------------------------------------------------------------------------


def test_bfloat16_train_step_keeps_float32_master_and_moments():
  graphdef32, params32 = host_params()
  graphdef16, params16 = host_params(param_dtype='bfloat16', dtype='bfloat16')  # the same draws, rounded
  batch = grpo_batch(8, 6, 8)
  opt_cfg = ConfigDict(OPT)
  state, metrics = run_step(graphdef16, params16, make_optimizer(opt_cfg, 10, param_dtype='bfloat16'), GRPO_LOSS,
                            batch)
  loss32, _ = jax.jit(lambda p: GRPO_LOSS(nnx.merge(graphdef32, p), batch, HPARAMS))(params32)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm']) and metrics['grad_norm'] > 0
  np.testing.assert_allclose(metrics['loss'], loss32, rtol=0.05, atol=0.02)  # bf16 compute: close, not equal
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
  assert isinstance(state.opt_state, MasterState)
  floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) == 3 * len(jax.tree.leaves(state.params))  # master, Adam's mu and nu
  assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  # The params are the master copy rounded, exactly.
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state.master), strict=True):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
  # float32 params: no wrapper, so the default optimizer state (and checkpoints) are unchanged.
  assert not isinstance(make_optimizer(opt_cfg, 10).init(params32), MasterState)


def test_master_copy_keeps_updates_that_bfloat16_rounds_away():
  # Adam moves a weight of 1.0 by ~lr = 1e-3 per step; bfloat16's spacing below 1.0 is 2^-8 = 0.0039, so each
  # step rounds back to 1.0 unless a master copy accumulates them (3 steps: 0.997 -> 0.9961).
  opt_cfg = ConfigDict(dict(OPT, weight_decay=0.0))
  params = {'w': jnp.ones((4,), jnp.bfloat16)}
  grads = {'w': jnp.ones((4,), jnp.bfloat16)}
  for master, moved in (('', False), ('float32', True)):
    tx = make_optimizer(ConfigDict(dict(opt_cfg, master_dtype=master)), 100, param_dtype='bfloat16')
    p, s = params, tx.init(params)
    for _ in range(3):
      updates, s = tx.update(grads, s, p)
      p = optax.apply_updates(p, updates)
    assert p['w'].dtype == jnp.bfloat16
    assert bool(jnp.all(p['w'] < 1.0)) == moved, (master, p['w'])


def test_bfloat16_sampler_runs():
  graphdef, params = host_params(param_dtype='bfloat16', dtype='bfloat16')
  sampler = make_sampler(graphdef, max_new_tokens=4, eos_id=1, pad_id=0, temperature=1.0, group_size=2)
  prompts = np.random.default_rng(0).integers(2, 40, (2, 5)).astype(np.int32)
  out = sampler(params, prompts, np.ones_like(prompts), jax.random.key(0))
  assert out.tokens.shape == (4, 4) and out.logprobs.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out.logprobs))) and np.all(np.asarray(out.logprobs) <= 0)


# --- gradient accumulation ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def grpo_accumulation():
  """One GRPO step with grad_accum_steps 1 and 4: {k: (temp bytes, new state, metrics)}. 32 x 64 tokens and a
  512 vocabulary, so activations dominate the step's memory."""
  graphdef, params = host_params(vocab=512)
  batch = grpo_batch(32, 16, 48, vocab=512, seed=1)
  out = {}
  for k in (1, 4):
    compiled, state = compiled_step(graphdef, params, optax.sgd(1.0), GRPO_LOSS, batch, grad_accum_steps=k)
    state, metrics = compiled(state, batch, HPARAMS)  # sgd(1.0): new params = params - grads
    out[k] = (compiled.memory_analysis().temp_size_in_bytes, state, jax.tree.map(np.asarray, metrics))
  return out


def test_grad_accumulation_gives_the_single_batch_grpo_update(grpo_accumulation):
  (_, one, m1), (_, four, m4) = grpo_accumulation[1], grpo_accumulation[4]
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-7)
  assert_trees_close(four.params, one.params, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_holds_one_micro_batch_of_activations(grpo_accumulation):
  temp = {k: v[0] for k, v in grpo_accumulation.items()}
  print(f'train step temp bytes by grad_accum_steps: {temp}')
  assert temp[4] < 0.5 * temp[1], temp


def test_grad_accumulation_gives_the_single_batch_sft_update():
  # sft_loss is a token mean: micro-batches are weighted by their token counts, which differ here.
  graphdef, params = host_params()
  batch = SFTBatch(*grpo_batch(16, 6, 8, seed=2)[:4])
  one, m1 = run_step(graphdef, params, optax.sgd(1.0), sft_loss, batch)
  four, m4 = run_step(graphdef, params, optax.sgd(1.0), sft_loss, batch, grad_accum_steps=4,
                      micro_weight=completion_token_count)
  for key in ('loss', 'grad_norm', 'nll'):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-7)
  assert_trees_close(four.params, one.params, rtol=1e-5, atol=1e-6)


# --- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('path, value', [
    ('model.remat', 'some'), ('model.logprob_chunk', -1), ('sft.master_dtype', 'bfloat16'),
    ('rl.grad_accum_steps', 0), ('rl.grad_accum_steps', 3), ('sft.grad_accum_steps', 5)])
def test_bad_memory_knobs_fail_naming_the_key(path, value):
  cfg = load_config('tiny')  # sft batch 8, rl minibatch 8
  section, key = path.split('.')
  cfg[section][key] = value
  with pytest.raises(ValueError, match=path.replace('.', r'\.')):
    check_config(cfg, 1)
