"""Sharding: GRPO steps and sampling on meshes of 8 simulated CPU devices give the numbers of one device; params,
optimizer state and KV cache really are split; bad layouts fail before anything compiles.

XLA_FLAGS must be set before jax initializes, and this pytest process already has jax with its own device
count, so the multi-device checks run in fresh python subprocesses (one script printing JSON, one trainer run).
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
from conftest import load_config, train_command
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.setup import layout_rules

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
# (data, fsdp, tensor): pure data parallel, FSDP, all three, FSDP x 4-way tensor parallel.
MESHES = {'one': (1, 1, 1), 'data': (8, 1, 1), 'fsdp': (2, 4, 1), 'all': (2, 2, 2), 'tensor': (1, 2, 4)}
SAMPLER_RULES = (('embed', None),)  # the sampler's own layout: weights whole over fsdp, split over tensor

SCRIPT = textwrap.dedent('''
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from ml_collections import ConfigDict
    from grpo_jax.parallel import sharding
    from grpo_jax.core.losses import LossConfig, grpo_objective
    from grpo_jax.rollout.rollout import Rollout
    from grpo_jax.core.logprobs import sequence_logprobs
    from grpo_jax.rollout.reference import make_sequence_logprobs_fn
    from grpo_jax.core.logprobs import positions_from_mask
    from grpo_jax.models.transformer import KVCache, ModelConfig, Transformer
    from grpo_jax.models.reward_model import Comparisons, RewardModel, make_score_fn, pairwise_loss
    from grpo_jax.rollout.sampling import make_sampler
    from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings

    assert jax.device_count() == 8, jax.devices()
    meshes, sampler_overrides = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    # Every dim divides every mesh axis size up to 4 (8 query / 4 kv heads: GQA), so nothing falls back.
    cfg = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4, mlp_dim=64)
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))  # abstract, then random weights: fast on CPU
    graphdef, abstract = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    draw = lambda path, x: (1.0 + 0.1 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'
                            else 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract)))
    host_params = jax.tree.map(np.asarray, abstract)  # fresh device buffers per mesh: the step donates its state
    nnx.update(model, host_params)

    # A GRPO batch, N = 16 (4 prompts x G = 4): left-padded prompts, right-padded completions, some clipped ratios.
    n, p, c = 16, 6, 8
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
    prompt_tokens = np.where(prompt_mask, rng.integers(1, 40, (n, p)), 0).astype(np.int32)
    completion_mask = (np.arange(c)[None] < rng.integers(1, c + 1, (n, 1))).astype(np.int32)
    completion_tokens = np.where(completion_mask, rng.integers(1, 40, (n, c)), 0).astype(np.int32)
    logprobs = np.asarray(sequence_logprobs(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask))
    old = (logprobs + 0.1 * rng.standard_normal((n, c))).astype(np.float32)
    ref = (logprobs + 0.1 * rng.standard_normal((n, c))).astype(np.float32)
    rewards = rng.integers(0, 2, (4, 4)).astype(np.float32)
    adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)).reshape(-1)
    rollout = Rollout(prompt_tokens, prompt_mask, completion_tokens, completion_mask, old, ref, adv.astype(np.float32))
    loss_fn = functools.partial(grpo_objective, config=LossConfig())
    opt_cfg = ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0,
                              master_dtype='float32'))
    prompts, prompts_mask = prompt_tokens[::2], prompt_mask[::2]  # 8 prompts x G = 2 for the samplers

    def spec(x):
        return [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]

    def describe(tree):
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]
        return {'/'.join(str(getattr(e, 'key', e)) for e in k): [spec(x), list(x.addressable_shards[0].data.shape)]
                for k, x in flat}

    def replicated_arrays(tree, min_size):
        """Paths of arrays with >= min_size elements that every device holds whole (on a mesh of > 1 device)."""
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return ['/'.join(str(getattr(e, 'key', getattr(e, 'name', getattr(e, 'idx', e)))) for e in k) for k, x in flat
                if isinstance(x, jax.Array) and x.size >= min_size and len(x.sharding.device_set) > 1
                and x.sharding.is_fully_replicated]

    def greedy(mesh, rules, params):
        shardings = sharding.tree_shardings(params, mesh, rules)
        sampler = make_sampler(graphdef, param_shardings=shardings, mesh=mesh, rules=rules, max_new_tokens=6,
                               eos_id=1, pad_id=0, greedy=True, group_size=2)
        out = sampler(params, prompts, prompts_mask, jax.random.key(3))
        return dict(tokens=np.asarray(out.tokens).tolist(), logprobs=np.asarray(out.logprobs).tolist())

    def prefill_cache(mesh, rules, params):
        """The KV cache and logits after a prefill, as the sampler builds them (same context and in_shardings)."""
        def run(params, tokens, mask):
            with sharding.activation_mesh(mesh, rules):
                cache = KVCache.zeros(cfg, tokens.shape[0], tokens.shape[1] + 4)
                model = nnx.merge(graphdef, params)
                return model.forward_with_cache(tokens, positions_from_mask(mask), mask, cache, 0)
        batch = sharding.batch_sharding(mesh, rules)
        logits, cache = jax.jit(run, in_shardings=(sharding.tree_shardings(params, mesh, rules), batch, batch))(
            params, prompts, prompts_mask.astype(bool))
        return dict(k=spec(cache.k[0]), k_shard=list(cache.k[0].addressable_shards[0].data.shape),
                    mask=spec(cache.mask), logits=spec(logits))

    # A reward model of the same shapes, random head; comparisons from the GRPO batch's sequences.
    rm_graphdef, rm_params = nnx.split(RewardModel(cfg, nnx.Rngs(1)), nnx.Param)
    rm_params['head'].value = rng.standard_normal(32).astype(np.float32)
    rm_host = jax.tree.map(np.asarray, rm_params)
    sequences = np.concatenate([prompt_tokens, completion_tokens], 1)
    sequence_mask = np.concatenate([prompt_mask, completion_mask], 1)
    comparisons = Comparisons(sequences[:8], sequence_mask[:8], sequences[8:], sequence_mask[8:])

    def reward_model(mesh, rules):
        shardings = sharding.tree_shardings(rm_host, mesh, rules)
        scores = make_score_fn(rm_graphdef, param_shardings=shardings, mesh=mesh, rules=rules)(
            jax.device_put(rm_host, shardings), sequences, sequence_mask)
        tx = make_optimizer(opt_cfg, total_steps=10)
        state = init_state(rm_host, tx, mesh, rules)
        step = make_train_step(rm_graphdef, tx, pairwise_loss, state_shardings(state, mesh, rules),
                               sharding.batch_sharding(mesh, rules), mesh, rules)
        losses = []
        for _ in range(2):
            state, metrics = step(state, comparisons, {})
            losses.append(float(metrics['loss']))
        return dict(scores=np.asarray(scores).tolist(), losses=losses, head=spec(state.params['head'].value),
                    mu=describe(state.opt_state[1][0].mu)['backbone/blocks/0/mlp/up'])

    out, final = {}, {}
    for name, shape in meshes.items():
        devices = jax.devices()[:1] if shape == [1, 1, 1] else None
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
        rules = sharding.DEFAULT_RULES
        tx = make_optimizer(opt_cfg, total_steps=10)
        state = init_state(host_params, tx, mesh, rules)
        shardings = state_shardings(state, mesh, rules)
        step = make_train_step(graphdef, tx, loss_fn, shardings, sharding.batch_sharding(mesh, rules), mesh, rules)
        losses, grad_norms, clip_fracs = [], [], []
        for _ in range(2):  # the second call runs on the donated, pinned output of the first
            state, metrics = step(state, rollout, {'beta': np.float32(0.04)})
            losses.append(float(metrics['loss']))
            grad_norms.append(float(metrics['grad_norm']))
            clip_fracs.append(float(metrics['clip_frac']))
        final[name] = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
        params = jax.device_put(host_params, shardings.params)  # the training layout, as the trainer hands it over
        ref_fn = make_sequence_logprobs_fn(graphdef, param_shardings=shardings.params, mesh=mesh, rules=rules,
                                           num_micro_batches=2)
        ref_micro = np.asarray(ref_fn(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask))
        r = out[name] = dict(losses=losses, grad_norms=grad_norms, clip_fracs=clip_fracs, step=int(state.step),
                             mesh=dict(mesh.shape), params=describe(state.params),
                             mu=describe(state.opt_state[1][0].mu), greedy=greedy(mesh, rules, params),
                             replicated=replicated_arrays(state, min_size=256),
                             ref_micro_err=float(np.abs(ref_micro - logprobs).max()),
                             reward_model=reward_model(mesh, rules))
        if name in sampler_overrides:
            sampler_rules = rules.override(sampler_overrides[name])
            r['sampler_rules_greedy'] = greedy(mesh, sampler_rules, params)
            moved = sharding.reshard(params, sharding.tree_shardings(params, mesh, sampler_rules))
            r['sampler_params'] = describe(moved)
            r['cache'] = prefill_cache(mesh, rules, params)
            big = jax.device_put(np.zeros((40, 32), np.float32), sharding.replicated(mesh))
            r['replicated_probe'] = replicated_arrays({'w': big, 'params': params}, min_size=256)
            f = jax.jit(lambda x: sharding.constrain(x * 2, ('batch', 'length', 'mlp')))
            with jax.set_mesh(mesh):  # jax's own mesh context drives constrain too (with the default rules)
                r['set_mesh'] = spec(f(np.ones((8, 3, 64), np.float32)))
    for name in final:
        diff = jax.tree.map(lambda a, b: np.abs(a - b) / (1e-6 + 1e-5 * np.abs(b)), final[name], final['one'])
        out[name]['max_param_err'] = float(max(x.max() for x in jax.tree.leaves(diff)))  # <= 1: within tolerance
        out[name]['max_param_diff'] = float(max(np.abs(a - b).max() for a, b in
                                                zip(jax.tree.leaves(final[name]), jax.tree.leaves(final['one']))))
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(final['one']),
                                                 jax.tree.leaves(nnx.to_pure_dict(host_params)))]
    out['max_param_change'] = float(max(moved))
    print('RESULT ' + json.dumps(out))
''')


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  script = tmp_path_factory.mktemp('sharding') / 'sharded_step.py'
  script.write_text(SCRIPT)
  overrides = {'all': SAMPLER_RULES, 'tensor': SAMPLER_RULES}
  proc = subprocess.run([sys.executable, str(script), json.dumps(MESHES), json.dumps(overrides)], env=ENV,
                        capture_output=True, text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


def test_meshes_have_the_requested_shapes(result):
  for name, shape in MESHES.items():
    assert tuple(result[name]['mesh'].values()) == shape and list(result[name]['mesh']) == list(sharding.MESH_AXES)


@pytest.mark.parametrize('mesh', [m for m in MESHES if m != 'one'])
def test_sharded_step_matches_single_device(result, mesh):
  one, many = result['one'], result[mesh]
  assert one['step'] == many['step'] == 2
  for key in ('losses', 'grad_norms', 'clip_fracs'):
    assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
  # Params after two AdamW steps, every element: |sharded - one| <= 1e-6 + 1e-5 |one|.
  assert many['max_param_err'] <= 1.0, many['max_param_diff']
  # The steps really moved the params (lr 1e-3), so that is not a comparison of two untouched copies ...
  assert result['max_param_change'] > 1e-4
  # ... and they differ (the second saw updated params and a non-trivial loss with some ratios clipped).
  assert one['losses'][0] != one['losses'][1] and one['grad_norms'][0] > 0
  assert 0 < one['clip_fracs'][0] < 1


@pytest.mark.parametrize('mesh', [m for m in MESHES if m != 'one'])
def test_sharded_greedy_sampler_matches_single_device(result, mesh):
  assert result[mesh]['greedy']['tokens'] == result['one']['greedy']['tokens']
  np.testing.assert_allclose(result[mesh]['greedy']['logprobs'], result['one']['greedy']['logprobs'], rtol=1e-5,
                             atol=1e-5)
  assert any(t != 0 for row in result['one']['greedy']['tokens'] for t in row)  # it did generate


@pytest.mark.parametrize('mesh', [m for m in MESHES if m != 'one'])
def test_sharded_reward_model_matches_single_device(result, mesh):
  one, many = result['one']['reward_model'], result[mesh]['reward_model']
  np.testing.assert_allclose(many['scores'], one['scores'], rtol=1e-5, atol=1e-5)
  assert many['losses'] == pytest.approx(one['losses'], rel=1e-5) and one['losses'][0] != one['losses'][1]
  # Its optimizer state is split like the policy's: the 'up' projection's Adam moment [embed 32, mlp 64].
  sizes = result[mesh]['mesh']
  assert many['mu'] == [['fsdp', 'tensor'], [32 // sizes['fsdp'], 64 // sizes['tensor']]]


@pytest.mark.parametrize('mesh', list(MESHES))
def test_sharded_micro_batched_reference_forward_matches_single_device(result, mesh):
  assert result[mesh]['ref_micro_err'] < 1e-5  # against sequence_logprobs of the whole batch on one device


@pytest.mark.parametrize('mesh', ['all', 'tensor'])
def test_sampler_with_its_own_layout_matches_the_training_layout(result, mesh):
  r = result[mesh]
  assert r['sampler_rules_greedy']['tokens'] == r['greedy']['tokens']
  np.testing.assert_allclose(r['sampler_rules_greedy']['logprobs'], r['greedy']['logprobs'], rtol=1e-5, atol=1e-5)
  # Resharded to the sampler's layout: 'embed' dims whole (no fsdp all-gather per token), heads / mlp still split.
  tensor = r['mesh']['tensor']
  assert r['params']['embed'][0] == ['tensor', 'fsdp']
  assert r['sampler_params']['embed'] == [['tensor', None], [40 // tensor, 32]]
  assert r['sampler_params']['blocks/0/attn/wq'] == [[None, 'tensor', None], [32, 8 // tensor, 4]]
  assert r['sampler_params']['blocks/1/mlp/down'] == [['tensor', None], [64 // tensor, 32]]


def test_params_and_optimizer_state_are_split(result):
  fsdp = result['fsdp']['params']  # (2, 4, 1)
  assert fsdp['embed'] == [['tensor', 'fsdp'], [40, 8]]  # ('vocab', 'embed'); tensor has size 1 here
  assert fsdp['blocks/0/attn/wq'] == [['fsdp', 'tensor', None], [8, 8, 4]]
  assert fsdp['blocks/1/mlp/down'] == [['tensor', 'fsdp'], [64, 8]]
  assert fsdp['final_norm/scale'] == [[None], [32]]  # norms replicate
  assert result['fsdp']['mu']['embed'] == fsdp['embed']  # Adam moments are split like their params
  tensor = result['tensor']['params']  # (1, 2, 4)
  assert tensor['embed'][1] == [10, 16] and tensor['lm_head'][1] == [16, 10]
  assert tensor['blocks/0/attn/wq'][1] == [16, 2, 4] and tensor['blocks/0/attn/wk'][1] == [16, 1, 4]
  assert tensor['blocks/0/attn/wo'] == [['tensor', None, 'fsdp'], [2, 4, 16]]
  assert tensor['blocks/0/mlp/gate'][1] == [16, 16]
  assert result['tensor']['mu']['blocks/0/mlp/gate'] == tensor['blocks/0/mlp/gate']


@pytest.mark.parametrize('mesh', ['all', 'tensor'])
def test_kv_cache_and_activations_are_split(result, mesh):
  cache = result[mesh]['cache']
  # keys [b, kv_heads, h, s]: batch over data x fsdp, kv heads over tensor. 8 prompts, 4 kv heads.
  m = result[mesh]['mesh']
  assert cache['k_shard'] == [8 // (m['data'] * m['fsdp']), 4 // m['tensor'], 4, 10]
  assert cache['k'][1] == 'tensor' and cache['k'][2:] in ([], [None])  # (jax drops a trailing None from specs)
  batch = ['data', 'fsdp'] if m['data'] > 1 else 'fsdp'
  assert cache['k'][0] == cache['mask'][0] == batch
  assert cache['logits'][0] == batch  # [b, t, v] stays batch-split
  assert result[mesh]['set_mesh'] == [batch, None, 'tensor']


@pytest.mark.parametrize('mesh', ['all', 'tensor'])
def test_no_big_array_is_replicated(result, mesh):
  # Params and optimizer state (moments) with >= 256 elements: none is held whole by every device.
  assert result[mesh]['replicated'] == []
  assert result[mesh]['replicated_probe'] == ['w']  # ... and the check does see a replicated one


def test_trainer_runs_on_a_sharded_mesh(tmp_path):
  """The main command on 2 x 2 x 2 simulated devices, with the samplers in their own layout (a reshard per
  rollout); two steps of each stage."""
  proc = subprocess.run(train_command(tmp_path / 'w', '--config.mesh.data=2', '--config.mesh.fsdp=2',
                                      '--config.mesh.tensor=2', '--config.sft.max_steps=2', '--config.rl.num_steps=2',
                                      f'--config.sharding.sampler_rules={SAMPLER_RULES!r}'),
                        env=ENV, capture_output=True, text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in proc.stdout
  summary = json.loads((tmp_path / 'w' / 'summary.json').read_text())
  assert summary['sft_steps'] == 2 and summary['rl_steps'] == 2


def test_trainer_refuses_a_mesh_that_does_not_divide_a_weight(tmp_path):
  # tiny: 2 kv heads (and a 122-token vocab) on tensor = 4. The error comes before any compile or checkpoint.
  proc = subprocess.run(train_command(tmp_path / 'w', '--config.mesh.data=2', '--config.mesh.fsdp=1',
                                      '--config.mesh.tensor=4'),
                        env=ENV, capture_output=True, text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode != 0
  assert 'parameter blocks/0/attn/wk (32, 2, 8)' in proc.stderr and "mesh axis 'tensor' of size 4" in proc.stderr


# ---------------------------------------------------------------------------------- in-process unit tests

MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)


@pytest.mark.parametrize('spec, shape, want', [
    (P('fsdp', 'tensor'), (8, 4), P('fsdp', 'tensor')),
    (P('fsdp', 'tensor'), (8, 3), P('fsdp', None)),
    (P('fsdp', 'tensor'), (6, 4), P(None, 'tensor')),
    (P('tensor', 'fsdp', None), (41, 30, 8), P(None, None, None)),
    (P(('data', 'fsdp')), (16, 5), P(('data', 'fsdp'), None)),  # shorter spec: padded with None
    (P(('data', 'fsdp')), (12, 5), P(None, None)),  # 12 % 8 != 0 (though 12 % 4 == 0: all or nothing)
    (P(), (3, 5), P(None, None)),
])
def test_fit_spec_drops_axes_that_do_not_divide(spec, shape, want):
  assert sharding.fit_spec(spec, shape, MESH) == want


def test_rules_map_logical_axes_to_specs():
  rules = sharding.DEFAULT_RULES
  assert rules.spec(('vocab', 'embed')) == P('tensor', 'fsdp')
  assert rules.spec(('batch', 'length', 'kv_heads', 'head_dim')) == P(('data', 'fsdp'), None, 'tensor', None)
  assert rules.spec(None) == P()
  with pytest.raises(ValueError, match="'nonsense' has no sharding rule"):
    rules.spec(('embed', 'nonsense'))
  lacking = sharding.Rules({k: v for k, v in sharding.LOGICAL_RULES.items() if k != 'mlp'})
  with pytest.raises(ValueError, match="'mlp' has no sharding rule"):
    lacking.spec(('embed', 'mlp'))
  twice = sharding.DEFAULT_RULES.override([('mlp', 'fsdp')])  # gate [embed, mlp] would use fsdp twice
  with pytest.raises(ValueError, match='map a mesh axis twice'):
    twice.spec(('embed', 'mlp'))
  sampler = sharding.DEFAULT_RULES.override([('embed', None)])
  assert sampler.spec(('vocab', 'embed')) == P('tensor', None) and sampler.table['mlp'] == 'tensor'
  assert sharding.DEFAULT_RULES.table['embed'] == 'fsdp'  # override leaves the original alone


def _abstract_params(**overrides):
  cfg = ModelConfig(**{**dict(vocab_size=40, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                              mlp_dim=64), **overrides})
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)[1]


def test_param_that_a_mesh_axis_does_not_divide_is_an_error_naming_it():
  params = _abstract_params()
  mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)  # 2 kv heads over tensor = 4
  with pytest.raises(ValueError, match=r"parameter blocks/0/attn/wk \(32, 2, 8\): dim 1 \('kv_heads'\) = 2 is not "
                                       r"divisible by mesh axis 'tensor' of size 4.*allow_replication_fallback"):
    sharding.tree_specs(params, mesh)
  # The knob: replicate that dim instead; the rest stays split.
  specs = sharding.tree_specs(params, mesh, sharding.Rules(allow_replication_fallback=True))
  assert specs['blocks'][0]['attn']['wk'].get_value() == P('fsdp', None, None)
  assert specs['blocks'][0]['attn']['wq'].get_value() == P('fsdp', 'tensor', None)
  # Optimizer-state paths are named too (here a bare tree holding the same Params under 'mu').
  with pytest.raises(ValueError, match='parameter mu/embed'):
    sharding.tree_specs({'mu': {'embed': params['embed']}}, AbstractMesh((1, 3, 1), sharding.MESH_AXES))
  # A mesh that divides everything: no error, nothing dropped.
  specs = sharding.tree_specs(params, MESH)
  assert specs['blocks'][0]['attn']['wk'].get_value() == P('fsdp', 'tensor', None)


def test_constrain_is_a_no_op_without_a_mesh_or_on_one_device():
  x = np.ones((4, 3, 8), np.float32)
  assert sharding.constrain(x, ('batch', 'length', 'act_embed')) is x
  one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  with sharding.activation_mesh(one):
    assert sharding.constrain(x, ('batch', 'length', 'act_embed')) is x


TABLE = tuple(sharding.LOGICAL_RULES.items())  # its last entry is 'act_embed'


@pytest.mark.parametrize('rules, match', [
    ((*TABLE[:-1], ('act_embed', 'model')), "'act_embed' -> 'model' names an unknown or repeated mesh axis"),
    ((*TABLE[:-1], ('act_embed', ('fsdp', 'fsdp'))), 'unknown or repeated mesh axis'),
    ((*TABLE, ('embd', 'fsdp')), "unknown logical axis 'embd'"),
    ((*TABLE, ('embed', None)), "'embed' has two rules"),
    ((*TABLE, ('embed',)), 'pair'),
    (TABLE[1:], r"no rule for logical axes \['vocab'\]"),
])
def test_malformed_rules_fail_the_config_check(tiny_config, rules, match):
  tiny_config.sharding.rules = rules
  with pytest.raises(ValueError, match=f'config.sharding.rules: .*{match}'):
    check_config(tiny_config, 1)


def test_sampler_rules_and_batch_rule_in_the_config_check(tiny_config):
  tiny_config.sharding.sampler_rules = (('embed', 'tensors'),)
  with pytest.raises(ValueError, match='config.sharding.sampler_rules: .*unknown or repeated mesh axis'):
    check_config(tiny_config, 1)
  tiny_config.sharding.sampler_rules = (('embed', None),)
  check_config(tiny_config, 1)
  # Batches split over the mesh axes of the 'batch' rule: over ('data', 'tensor') = 8, rl.num_prompts = 4 does not.
  cfg = load_config('tiny')
  cfg.mesh.data, cfg.mesh.tensor = 1, 8
  check_config(cfg, 8)  # batches over (data, fsdp) = 1: fine
  cfg.sharding.rules = tuple({**sharding.LOGICAL_RULES, 'batch': ('data', 'tensor')}.items())
  with pytest.raises(ValueError, match='rl.num_prompts=4 is not divisible by the data-parallel mesh size 8'):
    check_config(cfg, 8)


def test_default_config_rules_are_the_table(tiny_config):
  rules, sampler_rules = layout_rules(tiny_config)
  assert rules == sampler_rules == sharding.DEFAULT_RULES  # one layout: no reshard before sampling
  assert rules.allow_replication_fallback is False


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


def test_mesh_that_does_not_match_the_devices_fails_the_config_check(tiny_config):
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 2, 2
  with pytest.raises(ValueError, match=r"config.mesh .* needs 4 devices; 1 available"):
    check_config(tiny_config, 1)


def test_make_mesh_single_device_and_errors():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == dict(data=1, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match='mesh'):
    sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), devices)
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1), devices)
