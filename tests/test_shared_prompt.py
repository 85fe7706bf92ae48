"""The shared-prompt training forward (rl.shared_prompt): each group's prompt runs once and its G completions attend
to its keys and values. Logprobs, entropies and gradients equal the repeated-prompt path (every row prompt ++
completion) within float32 rounding: plain, qk-norm + qkv-bias, sliding window, LoRA, remat, chunked head; the
train step with the switch on and off equal; micro-batches and minibatch shuffles keep whole groups; the same on
8-device meshes, packed (rl.pack_buckets) too (a subprocess: XLA_FLAGS must be set before jax starts)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import BASE, CASES, build

from grpo_jax.core.logprobs import sequence_logprobs
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import grpo
from grpo_jax.pipeline.train_state import init_state, make_train_step, state_shardings
from grpo_jax.rollout.reference import make_sequence_logprobs_fn
from grpo_jax.rollout.rollout import Rollout

REPO = Path(__file__).resolve().parents[1]
P, G, PLEN, CLEN = 3, 4, 6, 7  # 3 prompts x G = 4 outputs


def group_batch(seed: int = 0, num_prompts: int = P, g: int = G):
  """[N, .] arrays of num_prompts prompts x g outputs: prompts left-padded to different lengths (one fully real),
  repeated over their group; completions right-padded after EOS to different lengths (one full width)."""
  rng = np.random.default_rng(seed)
  lengths = np.r_[PLEN, rng.integers(1, PLEN, num_prompts - 1)]
  prompt_mask = (np.arange(PLEN)[None] >= PLEN - lengths[:, None]).astype(np.int32)
  prompt_tokens = np.where(prompt_mask, rng.integers(1, 40, (num_prompts, PLEN)), 0).astype(np.int32)
  n = num_prompts * g
  ends = np.r_[CLEN, rng.integers(1, CLEN + 1, n - 1)]
  completion_mask = (np.arange(CLEN)[None] < ends[:, None]).astype(np.int32)
  completion_tokens = np.where(completion_mask, rng.integers(1, 40, (n, CLEN)), 0).astype(np.int32)
  return (np.repeat(prompt_tokens, g, 0), np.repeat(prompt_mask, g, 0), completion_tokens, completion_mask)


@functools.partial(jax.jit, static_argnames=('graphdef', 'chunk_size', 'remat', 'group_size'))
def values_and_grads(graphdef, params, arrays, weights, *, chunk_size, remat, group_size):
  """(logprobs, entropy) [N, c] and the gradient of sum(w0 * logprobs + w1 * entropy) w.r.t. params."""
  def loss(params):
    out = sequence_logprobs(nnx.merge(graphdef, params), *arrays, return_entropy=True, chunk_size=chunk_size,
                            remat=remat, group_size=group_size)
    return (weights[0] * out[0] + weights[1] * out[1]).sum(), out
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return out, grads


@pytest.mark.parametrize('case', list(CASES))
def test_grouped_forward_and_gradients_equal_repeated_prompts(case):
  model_cfg, lora_cfg, chunk, remat = CASES[case]
  graphdef, params = build(model_cfg, lora_cfg)
  arrays = group_batch()
  rng = np.random.default_rng(1)
  weights = rng.standard_normal((2, *arrays[2].shape)).astype(np.float32) * arrays[3]
  kw = dict(chunk_size=chunk, remat=remat)
  (lp, ent), grads = values_and_grads(graphdef, params, arrays, weights, group_size=1, **kw)
  (lp_g, ent_g), grads_g = values_and_grads(graphdef, params, arrays, weights, group_size=G, **kw)
  # At real completion tokens. A padding slot whose whole (sliding) window is padding attends uniformly to every
  # slot, and a padded prompt slot's "every slot" takes in the completion in the repeated rows only: such slots
  # differ, and no loss reads them (the gradient check below weighs them by 0).
  real = arrays[3] > 0
  np.testing.assert_allclose(np.asarray(lp_g)[real], np.asarray(lp)[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent_g)[real], np.asarray(ent)[real], rtol=1e-5, atol=1e-5)
  if not model_cfg.sliding_window:  # without a window every slot sees a real token: equal everywhere
    np.testing.assert_allclose(lp_g, lp, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(lp)).all() and np.abs(np.asarray(lp)).max() > 0.1  # not trivially equal
  flat, flat_g = nnx.to_flat_state(grads), dict(nnx.to_flat_state(grads_g))
  for path, g in flat:
    g, g_g = np.asarray(g[...]), np.asarray(flat_g[path][...])
    scale = max(np.abs(g).max(), 1e-3)
    np.testing.assert_allclose(g_g, g, atol=2e-5 * scale, rtol=1e-4, err_msg=str(path))
  if lora_cfg is not None:  # the adapters really are in the forward: their gradients are not zero
    assert any(np.abs(np.asarray(g[...])).max() > 0 for path, g in flat if 'lora' in path)


def test_filtered_logits_grouped_equals_repeated():
  """FilteredLogits (the sampler's temperature / top-k on the trainer's logits) through the grouped path: the
  GRPO loss and its metrics equal the repeated-prompt ones, chunked and not."""
  from grpo_jax.rollout.reference import sampling_filter
  graphdef, params = build(ModelConfig(**BASE))
  rollout = grpo_rollout(num_prompts=3)
  filt = sampling_filter(temperature=0.7, top_k=8)
  out = {}
  for group in (1, G):
    for chunk in (0, 3):
      config = LossConfig(logits_filter=filt, shared_prompt_group=group, logprob_chunk=chunk)
      loss, metrics = jax.jit(lambda params, batch, c=config: grpo_objective(  # noqa: B023
          nnx.merge(graphdef, params), batch, {'beta': np.float32(0.04)}, config=c))(params, rollout)
      out[group, chunk] = {'loss': float(loss), **{k: float(v) for k, v in metrics.items()}}
  for chunk in (0, 3):
    for key, value in out[1, chunk].items():
      np.testing.assert_allclose(out[G, chunk][key], value, rtol=1e-5, atol=1e-6, err_msg=f'{chunk} {key}')


def test_only_each_groups_first_prompt_row_is_read():
  graphdef, params = build(ModelConfig(**BASE))
  prompt_tokens, prompt_mask, completion_tokens, completion_mask = group_batch()
  garbage = prompt_tokens.copy()
  garbage[np.arange(len(garbage)) % G != 0] = 7  # rows other than 0, G, 2G, ...
  model = nnx.merge(graphdef, params)
  run = lambda tokens: np.asarray(sequence_logprobs(model, tokens, prompt_mask, completion_tokens,  # noqa: E731
                                                    completion_mask, group_size=G))
  np.testing.assert_array_equal(run(garbage), run(prompt_tokens))


@pytest.mark.parametrize('k, g', [(1, 1), (2, 1), (3, 1), (2, 2), (3, 4)])
def test_split_micro_batches_keeps_whole_groups(k, g):
  rows = 24
  x = np.arange(rows * 2).reshape(rows, 2)
  micro = np.asarray(sharding.split_micro_batches(x, k, g))
  # A loop transcription: micro-batch j holds groups j, j + k, j + 2k, ... (rows of group i: i * g .. i * g + g - 1).
  expected = [[x[i * g + r] for i in range(j, rows // g, k) for r in range(g)] for j in range(k)]
  np.testing.assert_array_equal(micro, np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(sharding.merge_micro_batches(micro, g)), x)


@pytest.mark.parametrize('g', [1, 4])
def test_update_shuffles_whole_groups(g):
  n, seen = 24, []

  def fake_step(state, batch, hparams):
    seen.append(np.asarray(batch.advantages).astype(int))
    return state, {'loss': np.float32(0.0)}

  rollout = Rollout(*[np.zeros((n, 1))] * 6, np.arange(n, dtype=np.float32))
  grpo.update(fake_step, None, rollout, jax.random.key(3), {}, num_epochs=2, num_minibatches=3, group_size=g)
  assert len(seen) == 6 and all(len(rows) == n // 3 for rows in seen)
  for epoch in (seen[:3], seen[3:]):
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(n))  # every row once per epoch
  for rows in seen:
    groups = rows.reshape(-1, g)
    np.testing.assert_array_equal(groups, groups[:, :1] + np.arange(g))  # whole groups, rows in order
    assert (groups[:, 0] % g == 0).all()
  if g == 1:  # group_size 1 is the row shuffle as before the switch existed
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(3), 0), n))
    np.testing.assert_array_equal(np.concatenate(seen[:3]), order)


def grpo_rollout(num_prompts: int = 4, seed: int = 0) -> Rollout:
  prompt_tokens, prompt_mask, completion_tokens, completion_mask = group_batch(seed, num_prompts)
  rng = np.random.default_rng(seed)
  n = len(completion_tokens)
  old = (-3.5 + 0.3 * rng.standard_normal(completion_tokens.shape)).astype(np.float32)
  ref = (-3.5 + 0.3 * rng.standard_normal(completion_tokens.shape)).astype(np.float32)
  adv = rng.standard_normal(n).astype(np.float32)
  return Rollout(prompt_tokens, prompt_mask, completion_tokens, completion_mask, old, ref, adv)


@pytest.mark.parametrize('aggregation', ['sequence_mean', 'token_mean'])
def test_train_step_switch_on_equals_off(aggregation):
  """grad_accum_steps = 2 and num_minibatches = 2 (update's group shuffle for all, so all see the same
  minibatches). On vs off as the pipeline builds them (off splits micro-batches by rows, on by groups): loss,
  gradient norm and updated params equal. On vs off with the same group-wise micro-batches: every metric equal too
  (token-mean metrics are means of micro-batch values, so they depend on how rows fall into micro-batches)."""
  graphdef, params = build(ModelConfig(**BASE, qkv_bias=True))
  # SGD, not Adam: Adam's first step is about lr * sign(gradient), so a weight whose gradient is ~0 would move by
  # an amount its rounding decides; SGD's update is linear in the gradient.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  results = {}
  for name, forward_group, split_group in (('off', 1, 1), ('off_group_split', 1, G), ('on', G, G)):
    state = init_state(jax.tree.map(np.array, params), tx, mesh)
    config = LossConfig(loss_aggregation=aggregation, shared_prompt_group=forward_group, logprob_chunk=3)
    step = make_train_step(graphdef, tx, functools.partial(grpo_objective, config=config),
                           state_shardings(state, mesh), sharding.batch_sharding(mesh), mesh, grad_accum_steps=2,
                           micro_weight=grpo.grpo_micro_weight(config), group_size=split_group)
    state, metrics = grpo.update(step, state, grpo_rollout(), jax.random.key(0), {'beta': np.float32(0.04)},
                                 num_epochs=1, num_minibatches=2, group_size=G)
    results[name] = (jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)),
                     {k: float(v) for k, v in metrics.items()})
  params_on, metrics_on = results['on']
  assert results['off'][1]['grad_norm'] > 0
  for name, keys in (('off', ('loss', 'grad_norm', 'ratio_min', 'ratio_max', 'nonfinite')),
                     ('off_group_split', tuple(metrics_on))):
    params_off, metrics_off = results[name]
    assert metrics_on.keys() == metrics_off.keys()
    for key in keys:
      np.testing.assert_allclose(metrics_on[key], metrics_off[key], rtol=1e-4, atol=1e-6, err_msg=f'{name} {key}')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_on, params_off)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params_on, nnx.to_pure_dict(params)))
  assert max(moved) > 1e-3  # the step did move the params


def test_reference_forward_micro_batched_equals_repeated():
  graphdef, params = build(ModelConfig(**BASE))
  arrays = grpo_rollout(num_prompts=4)[:4]
  plain = np.asarray(make_sequence_logprobs_fn(graphdef)(params, *arrays))
  for k in (1, 2, 4):
    shared = np.asarray(make_sequence_logprobs_fn(graphdef, num_micro_batches=k, group_size=G)(params, *arrays))
    np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-5, err_msg=f'num_micro_batches={k}')
  with pytest.raises(ValueError, match='whole groups of 4'):
    make_sequence_logprobs_fn(graphdef, num_micro_batches=3, group_size=G)(params, *arrays)


def test_shared_prompt_config_checks(tiny_config):
  from grpo_jax.pipeline.config_checks import check_config
  cfg = tiny_config
  assert cfg.rl.shared_prompt is True  # on by default
  cfg.rl.num_prompts, cfg.rl.group_size, cfg.rl.num_minibatches, cfg.rl.grad_accum_steps = 4, 4, 8, 1
  with pytest.raises(ValueError, match=r'rl\.shared_prompt=True .*rl\.num_prompts=4 must be divisible by '
                                       r'rl\.num_minibatches \* rl\.grad_accum_steps = 8 \* 1'):
    check_config(cfg, 1)
  cfg.rl.num_minibatches, cfg.rl.grad_accum_steps = 2, 4
  with pytest.raises(ValueError, match=r'= 2 \* 4'):
    check_config(cfg, 1)
  cfg.rl.shared_prompt = False  # every row's prompt: any split of the rows is fine
  check_config(cfg, 1)
  cfg.rl.shared_prompt, cfg.rl.grad_accum_steps = True, 2
  check_config(cfg, 1)
  with pytest.raises(TypeError, match='shared_prompt'):  # ml_collections keeps the field a bool
    cfg.rl.shared_prompt = 1


def test_no_recompiles_after_the_first_step(tiny_config):
  from conftest import grpo_steps
  cfg = tiny_config
  cfg.rl.grad_accum_steps = 2
  assert cfg.rl.shared_prompt and cfg.rl.num_minibatches == 2
  compiles, rows, _ = grpo_steps(cfg, 3)
  assert compiles[1:] == [0, 0], compiles
  assert all(np.isfinite(r['loss']) for r in rows)


MESH_SCRIPT = textwrap.dedent('''
    import functools, json, sys
    import jax, numpy as np, optax
    from flax import nnx
    sys.path.insert(0, sys.argv[2])
    from helpers import BASE, build
    from test_shared_prompt import G, grpo_rollout
    from grpo_jax.core import packing
    from grpo_jax.core.losses import LossConfig, grpo_objective
    from grpo_jax.models.transformer import ModelConfig
    from grpo_jax.parallel import sharding
    from grpo_jax.pipeline import grpo
    from grpo_jax.pipeline.train_state import init_state, make_train_step, state_shardings
    from grpo_jax.rollout.reference import make_sequence_logprobs_fn

    assert jax.device_count() == 8, jax.devices()
    # 8 query / 4 kv heads, so every mesh axis up to 4 divides the heads.
    graphdef, params = build(ModelConfig(**{**BASE, 'num_heads': 8, 'num_kv_heads': 4, 'head_dim': 4}))
    rollout = grpo_rollout(num_prompts=8)  # 32 rows: 8 prompts x G = 4
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))  # linear in the gradient (see the test above)
    packed = packing.rows_needed(rollout.completion_mask, G)  # also the packed path when that is G
    out = {}
    for name, shape in json.loads(sys.argv[1]).items():
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices())
        rules = sharding.DEFAULT_RULES
        for group, rows in ((1, 0), (G, 0), (G, packed)):
            state = init_state(jax.tree.map(np.array, params), tx, mesh, rules)
            shardings = state_shardings(state, mesh, rules)
            ref = make_sequence_logprobs_fn(graphdef, param_shardings=shardings.params, mesh=mesh, rules=rules,
                                            num_micro_batches=2, group_size=group, pack_rows=rows
                                            )(state.params, *rollout[:4])
            config = LossConfig(shared_prompt_group=group, pack_rows=rows)
            step = make_train_step(graphdef, tx, functools.partial(grpo_objective, config=config), shardings,
                                   sharding.batch_sharding(mesh, rules), mesh, rules, grad_accum_steps=2,
                                   group_size=G)  # both: the same micro-batches, so every metric compares
            state, metrics = grpo.update(step, state, rollout, jax.random.key(0), {'beta': np.float32(0.04)},
                                         num_epochs=1, num_minibatches=2, group_size=G)
            out[f'{name}/{group}/{rows}'] = dict(
                ref=np.asarray(ref).tolist(), metrics={k: float(v) for k, v in metrics.items()},
                params=[np.asarray(x).tolist() for x in jax.tree.leaves(nnx.to_pure_dict(state.params))])
    print('RESULT ' + json.dumps(out))
''')


# test_sharding's layouts; (2, 2, 2) splits over all three axes at once, the rest run with the slow tests.
@pytest.mark.parametrize('meshes', [{'all': (2, 2, 2)},
                                    pytest.param({'data': (8, 1, 1), 'fsdp': (2, 4, 1), 'tensor': (1, 2, 4)},
                                                 marks=pytest.mark.slow)], ids=['all', 'data_fsdp_tensor'])
def test_eight_device_meshes_grouped_equals_repeated(tmp_path, meshes):
  script = tmp_path / 'shared_prompt_mesh.py'
  script.write_text(MESH_SCRIPT)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, str(script), json.dumps(meshes), str(REPO / 'tests')], env=env,
                        capture_output=True, text=True, timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT '))[len('RESULT '):])
  on_keys = [key for key in out if not key.endswith('/1/0')]  # shared prompt, and shared prompt packed
  assert len(on_keys) == 2 * len(meshes)
  real = grpo_rollout(num_prompts=8).completion_mask > 0  # packed logprobs are 0 past each output's last token
  for key in on_keys:
    off, on = out[f'{key.split("/")[0]}/1/0'], out[key]
    np.testing.assert_allclose(np.asarray(on['ref'])[real], np.asarray(off['ref'])[real], rtol=1e-5, atol=1e-5,
                               err_msg=key)
    for metric in off['metrics']:
      np.testing.assert_allclose(on['metrics'][metric], off['metrics'][metric], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{key} {metric}')
    for a, b in zip(on['params'], off['params'], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=key)
  # Across layouts too: the first mesh's repeated-prompt step is the reference for every shared one.
  first = next(iter(meshes))
  for key in on_keys:
    for a, b in zip(out[key]['params'], out[f'{first}/1/0']['params'], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=key)
