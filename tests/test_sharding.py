"""Sharding: one GRPO train step on 1 device and on 8 simulated CPU devices gives the same numbers.

XLA_FLAGS must be set before jax initializes, and this pytest process already has jax with its own device
count, so the multi-device check runs in a fresh python subprocess that prints JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from grpo_jax import sharding

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import functools
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from ml_collections import ConfigDict

    from grpo_jax import sharding
    from grpo_jax.grpo import Rollout, grpo_objective
    from grpo_jax.logprobs import sequence_logprobs
    from grpo_jax.model import ModelConfig, Transformer
    from grpo_jax.sampling import make_sampler
    from grpo_jax.train_state import init_state, make_optimizer, make_train_step, state_shardings

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    # Abstract build filled with random weights (eager init on CPU costs seconds).
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    draw = lambda path, x: (1.0 + 0.1 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'
                            else 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract)))
    # Host (numpy) copy: every mesh gets fresh device buffers, since the train step donates its state.
    host_params = jax.tree.map(np.asarray, abstract)
    nnx.update(model, host_params)

    # A random GRPO batch, N = 16 (4 prompts x G = 4), left-padded prompts, right-padded completions.
    n, p, c = 16, 6, 8
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
    prompt_tokens = np.where(prompt_mask, rng.integers(1, 40, (n, p)), 0).astype(np.int32)
    completion_mask = (np.arange(c)[None] < rng.integers(1, c + 1, (n, 1))).astype(np.int32)
    completion_tokens = np.where(completion_mask, rng.integers(1, 40, (n, c)), 0).astype(np.int32)
    logprobs = np.asarray(sequence_logprobs(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask))
    old = (logprobs + 0.1 * rng.standard_normal((n, c))).astype(np.float32)  # some ratios get clipped
    ref = (logprobs + 0.1 * rng.standard_normal((n, c))).astype(np.float32)
    rewards = rng.integers(0, 2, (4, 4)).astype(np.float32)
    advantages = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)).reshape(-1)
    rollout = Rollout(prompt_tokens, prompt_mask, completion_tokens, completion_mask, old, ref,
                      advantages.astype(np.float32))

    loss_fn = functools.partial(grpo_objective, clip_eps=0.2, beta=0.04, kl_estimator='k3')
    opt_cfg = ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0))
    meshes = {
        'one': dict(devices=jax.devices()[:1], shape=dict(data=1, fsdp=1, tensor=1)),
        'fsdp': dict(devices=None, shape=dict(data=2, fsdp=4, tensor=1)),
        'tensor': dict(devices=None, shape=dict(data=2, fsdp=-1, tensor=2)),
    }

    def describe(x):
        return dict(spec=[a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec],
                    shape=list(x.shape), shard_shape=list(x.addressable_shards[0].data.shape),
                    num_devices=len(x.sharding.device_set))

    out, final = {}, {}
    for name, m in meshes.items():
        mesh = sharding.make_mesh(m['shape'], m['devices'])
        tx = make_optimizer(opt_cfg, total_steps=10)
        state = init_state(host_params, tx, mesh)
        shardings = state_shardings(state, mesh)
        step = make_train_step(graphdef, tx, loss_fn, shardings, sharding.batch_sharding(mesh), mesh)
        losses, grad_norms, clip_fracs = [], [], []
        for _ in range(2):  # the second call exercises the pinned / donated shardings
            state, metrics = step(state, rollout)
            losses.append(float(metrics['loss']))
            grad_norms.append(float(metrics['grad_norm']))
            clip_fracs.append(float(metrics['clip_frac']))
        sampler = make_sampler(graphdef, param_shardings=state_shardings(state, mesh).params, mesh=mesh,
                               max_new_tokens=6, eos_id=1, pad_id=0, temperature=1.0)
        samples = sampler(jax.device_put(host_params, shardings.params), prompt_tokens, prompt_mask,
                          jax.random.key(3))
        params = nnx.to_pure_dict(state.params)
        adam_mu = nnx.to_pure_dict(state.opt_state[1][0].mu)
        final[name] = jax.tree.map(np.asarray, params)
        flat = {'/'.join(str(getattr(e, 'key', e)) for e in path): describe(v)
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        out[name] = dict(
            samples=np.asarray(samples.tokens).tolist(), sample_logprobs=np.asarray(samples.logprobs).tolist(),
            sample_tokens_spec=str(samples.tokens.sharding.spec),
            mesh=dict(mesh.shape), losses=losses, grad_norms=grad_norms, clip_fracs=clip_fracs, step=int(state.step),
            params=flat, mu_embed=describe(adam_mu['embed']),
            batch=describe(jax.device_put(rollout.completion_tokens, sharding.batch_sharding(mesh))),
            fit_spec=[str(sharding.fit_spec(P('fsdp', 'tensor'), (8, 3), mesh)),
                      str(sharding.fit_spec(P(('data', 'fsdp'), None), (8, 3), mesh)),
                      str(sharding.fit_spec(P(('data', 'fsdp'),), (6, 3), mesh))])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final['one'], nnx.to_pure_dict(host_params))
    out['max_param_change'] = max(jax.tree.leaves(moved))
    for name in ('fsdp', 'tensor'):
        diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final[name], final['one'])
        out[name]['max_param_diff'] = max(jax.tree.leaves(diffs))
        outside = jax.tree.map(lambda a, b: int((~np.isclose(a, b, rtol=1e-5, atol=1e-6)).sum()), final[name],
                               final['one'])
        out[name]['frac_params_outside_tol'] = sum(jax.tree.leaves(outside)) / sum(x.size for x in
                                                                                 jax.tree.leaves(final['one']))
    print('RESULT ' + json.dumps(out))
''')


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  script = tmp_path_factory.mktemp('sharding') / 'sharded_step.py'
  script.write_text(SCRIPT)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                        cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


def test_meshes_have_the_requested_shapes(result):
  assert result['one']['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert result['fsdp']['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert result['tensor']['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('mesh', ['fsdp', 'tensor'])
def test_sharded_step_matches_single_device(result, mesh):
  one, many = result['one'], result[mesh]
  assert one['step'] == many['step'] == 2
  for key in ('losses', 'grad_norms', 'clip_fracs'):
    assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
  # Params after two AdamW steps: the same to rtol 1e-5 / atol 1e-6 except for a handful of elements. Adam's
  # first steps move an element by lr * g / (|g| + 1e-8), which turns float noise in a gradient element that
  # happens to be ~1e-8 into ~1e-6 of parameter; those stay within 1% of one lr step.
  assert many['frac_params_outside_tol'] <= 1e-3
  assert many['max_param_diff'] <= 1e-5
  # The step really moved the params (so the comparison above is not between two untouched copies) ...
  assert result['max_param_change'] > 1e-4
  # ... and the two steps differ (the second saw updated params and a non-trivial loss).
  assert one['losses'][0] != one['losses'][1] and one['grad_norms'][0] > 0
  assert 0 < one['clip_fracs'][0] < 1


def test_fsdp_mesh_really_shards_params(result):
  params = result['fsdp']['params']
  embed = params['embed']
  assert embed['spec'] == ['tensor', 'fsdp']  # ('vocab', 'embed') under LOGICAL_RULES
  assert embed['shape'] == [40, 32] and embed['shard_shape'] == [40, 8]
  assert embed['num_devices'] == 8
  wq = params['blocks/0/attn/wq']
  assert wq['spec'][0] == 'fsdp' and wq['shard_shape'] == [8, 4, 8]
  down = params['blocks/1/mlp/down']
  assert down['spec'] == ['tensor', 'fsdp'] and down['shard_shape'] == [64, 8]
  # Norm scales are replicated.
  assert params['final_norm/scale']['shard_shape'] == params['final_norm/scale']['shape'] == [32]
  sharded = [k for k, v in params.items() if v['shard_shape'] != v['shape']]
  assert len(sharded) >= len(params) // 2
  # Batches split their leading (example) axis over data x fsdp = 8 devices.
  assert result['fsdp']['batch']['shard_shape'] == [2, 8] and result['tensor']['batch']['shard_shape'] == [4, 8]
  # The optimizer state is sharded like the params.
  assert result['fsdp']['mu_embed']['spec'] == ['tensor', 'fsdp']
  assert result['fsdp']['mu_embed']['shard_shape'] == [40, 8]


def test_tensor_mesh_shards_heads_mlp_and_vocab(result):
  params = result['tensor']['params']
  assert params['embed']['shard_shape'] == [20, 16]
  assert params['lm_head']['shard_shape'] == [16, 20]
  assert params['blocks/0/attn/wq']['shard_shape'] == [16, 2, 8]
  assert params['blocks/0/attn/wk']['shard_shape'] == [16, 1, 8]
  assert params['blocks/0/attn/wo']['shard_shape'] == [2, 8, 16]
  assert params['blocks/0/mlp/gate']['shard_shape'] == [16, 32]
  # Single-device run: nothing is split.
  assert all(v['shard_shape'] == v['shape'] for v in result['one']['params'].values())


def test_fit_spec_on_real_meshes(result):
  # fsdp=4, tensor=1: (8, 3) keeps fsdp (8 % 4 == 0); tensor has size 1 and divides anything.
  assert result['fsdp']['fit_spec'][0] == str(P('fsdp', 'tensor'))
  assert result['fsdp']['fit_spec'][1] == str(P(('data', 'fsdp'), None))  # 8 % (2 * 4) == 0
  assert result['fsdp']['fit_spec'][2] == str(P(None, None))  # 6 % 8 != 0: replicated; padded to rank 2
  # fsdp=2, tensor=2: 3 % 2 != 0 drops tensor.
  assert result['tensor']['fit_spec'][0] == str(P('fsdp', None))


# ---------------------------------------------------------------------------------- in-process unit tests

MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)


@pytest.mark.parametrize('spec, shape, want', [
    (P('fsdp', 'tensor'), (8, 4), P('fsdp', 'tensor')),
    (P('fsdp', 'tensor'), (8, 3), P('fsdp', None)),
    (P('fsdp', 'tensor'), (6, 4), P(None, 'tensor')),
    (P('tensor', 'fsdp', None), (40, 32, 8), P('tensor', 'fsdp', None)),
    (P('tensor', 'fsdp', None), (41, 30, 8), P(None, None, None)),
    (P(('data', 'fsdp')), (16, 5), P(('data', 'fsdp'), None)),  # shorter spec: padded with None
    (P(('data', 'fsdp')), (12, 5), P(None, None)),  # 12 % 8 != 0 (though 12 % 4 == 0: all or nothing)
    (P(), (3, 5), P(None, None)),
])
def test_fit_spec_drops_axes_that_do_not_divide(spec, shape, want):
  assert sharding.fit_spec(spec, shape, MESH) == want


def test_logical_to_spec():
  assert sharding.logical_to_spec(('vocab', 'embed')) == P('tensor', 'fsdp')
  assert sharding.logical_to_spec(('embed', 'kv_heads', 'head_dim')) == P('fsdp', 'tensor', None)
  assert sharding.logical_to_spec(None) == P()
  with pytest.raises(ValueError, match='nonsense'):
    sharding.logical_to_spec(('embed', 'nonsense'))


@pytest.mark.parametrize('shape, devices, want', [
    (dict(data=2, fsdp=4, tensor=1), 8, dict(data=2, fsdp=4, tensor=1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, dict(data=2, fsdp=2, tensor=2)),
    (dict(data=-1, fsdp=1, tensor=1), 8, dict(data=8, fsdp=1, tensor=1)),
    (dict(data=1, fsdp=1, tensor=-1), 1, dict(data=1, fsdp=1, tensor=1)),
])
def test_mesh_shape_resolves(shape, devices, want):
  assert sharding.mesh_shape(shape, devices) == want


@pytest.mark.parametrize('shape, devices', [
    (dict(data=-1, fsdp=-1, tensor=1), 8),  # two -1
    (dict(data=0, fsdp=8, tensor=1), 8),  # zero
    (dict(data=-2, fsdp=4, tensor=1), 8),  # negative other than -1
    (dict(data=2, fsdp=2, tensor=1), 8),  # product 4 != 8
    (dict(data=2, fsdp=8, tensor=1), 8),  # product 16 != 8
    (dict(data=3, fsdp=-1, tensor=1), 8),  # -1 cannot make it fit
    (dict(data=16, fsdp=-1, tensor=1), 8),  # -1 would be 0
])
def test_mesh_shape_errors(shape, devices):
  with pytest.raises(ValueError, match='mesh'):
    sharding.mesh_shape(shape, devices)


def test_make_mesh_single_device_and_errors():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == dict(data=1, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match='mesh'):
    sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), devices)
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1), devices)


@pytest.mark.parametrize('name', ['fsdp', 'tensor'])
def test_sharded_sampler_matches_single_device(result, name):
  # Same initial params, same rng: the same tokens and (to float tolerance) logprobs.
  assert result[name]['samples'] == result['one']['samples']
  np.testing.assert_allclose(result[name]['sample_logprobs'], result['one']['sample_logprobs'], atol=1e-4)
