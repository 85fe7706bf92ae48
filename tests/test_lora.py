"""LoRA (grpo_jax/models/lora.py): a fresh adapter changes nothing, the unmerged forward (training and sampler) equals a
plain model on numpy-merged weights, a train step moves only the adapters and keeps optimizer state for them
alone, the reference is the frozen base (same arrays, no copy), the tiny main command with --config.lora.rank=4
trains, resumes and exports the merged weights, a LoRA step on a (2, 2, 2) mesh matches one device, bad config
values fail with their names."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config, train_command
from flax import nnx
from ml_collections import ConfigDict

from grpo_jax.core.logprobs import positions_from_mask, sequence_logprobs
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.models import hf, lora
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import checkpoint, evaluate, grpo as grpo_stage, metrics, run as runner, setup as setup_lib
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.reference import make_sequence_logprobs_fn
from grpo_jax.rollout.rollout import Rollout
from grpo_jax.rollout.sampling import make_sampler

CFG = ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
ALL = tuple(lora.TARGETS)
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
# Timings, and the compile count: a resumed process compiles again what the uninterrupted one had cached.
TIMING_KEYS = {'step_time', 'sample_time', 'sampled_tokens_per_s', 'tokens_per_s_per_device', 'mfu', 'compiles'}


@functools.cache
def build(lora_cfg: lora.LoraConfig | None = None):
  """(graphdef, params) of lora.transformer(CFG, nnx.Rngs(0), lora_cfg) (None: the plain model), initialized under
  jit (eagerly: seconds). Cached: callers copy before changing or donating the params."""
  model = lambda: lora.transformer(CFG, nnx.Rngs(0), lora_cfg)  # noqa: E731
  return nnx.graphdef(nnx.eval_shape(model)), jax.jit(lambda: nnx.state(model(), nnx.Param))()


def plain_params():
  return jax.tree.map(lambda x: x, build()[1])


def lora_params(lora_cfg: lora.LoraConfig, b_std: float = 0.0):
  """(LoRA graphdef, plain graphdef, params): the default-init base of seed 0 plus adapters, B ~ N(0, b_std)."""
  graphdef, params = build(lora_cfg)
  params = jax.tree.map(lambda x: x, params)  # new Variables: the cached ones stay as they are
  if b_std:
    rng = np.random.default_rng(1)
    draw = lambda path, x: (b_std * rng.standard_normal(x.shape)).astype(np.float32) if path[-1] == 'b' else x  # noqa: E731
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(
        lambda kp, x: draw(tuple(getattr(k, 'key', k) for k in kp), x), nnx.to_pure_dict(params)))
  return graphdef, build()[0], params


@functools.partial(jax.jit, static_argnums=0)
def logits_of(graphdef, params, tokens, mask):
  return nnx.merge(graphdef, params)(tokens, positions_from_mask(mask), mask)


def batch(seed: int = 0, n: int = 4, p: int = 5, c: int = 6):
  """Left-padded prompts, right-padded completions: [n, p], [n, p], [n, c], [n, c]."""
  rng = np.random.default_rng(seed)
  prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
  completion_mask = (np.arange(c)[None] < rng.integers(1, c + 1, (n, 1))).astype(np.int32)
  return (np.where(prompt_mask, rng.integers(1, 40, (n, p)), 0).astype(np.int32), prompt_mask,
          np.where(completion_mask, rng.integers(1, 40, (n, c)), 0).astype(np.int32), completion_mask)


def numpy_merge(pure: dict, scale: float) -> dict:
  """The reference merge on a pure dict: every `lora/<w>/{a, b}` folded into its sibling W + scale * A @ B."""
  out = {}
  for key, value in pure.items():
    if key == 'lora':
      continue
    out[key] = numpy_merge(value, scale) if isinstance(value, dict) else np.asarray(value, np.float64)
  for name, ab in pure.get('lora', {}).items():
    out[name] = out[name] + scale * np.tensordot(np.asarray(ab['a'], np.float64), np.asarray(ab['b'], np.float64), 1)
  return out


def test_fresh_adapters_change_nothing():
  graphdef, plain_graphdef, params = lora_params(lora.LoraConfig(4, 8.0, ALL))
  adapters, base = lora.split_params(params)
  plain = plain_params()
  # The constructor draws the adapters last: the base weights are the plain model's of the same seed.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), base, plain))
  assert all(not np.any(np.asarray(x)) for k, x in nnx.to_flat_state(adapters) if k[-1] == 'b')  # B = 0
  assert all(np.any(np.asarray(x)) for k, x in nnx.to_flat_state(adapters) if k[-1] == 'a')
  prompt, prompt_mask = batch()[:2]
  np.testing.assert_array_equal(logits_of(graphdef, params, prompt, prompt_mask.astype(bool)),
                                logits_of(plain_graphdef, plain, prompt, prompt_mask.astype(bool)))


# A of each adapter of lora.transformer(CFG, nnx.Rngs(0), LoraConfig(2, 4.0, ('q', 'v', 'down'))): its first three
# entries and its sum, as the constructor drew them when Transformer itself added the adapters (before lora.py
# built on transformer.py). Pinned so that a change of the order of the draws, which would silently change the
# adapters of every seed, fails here; the values are JAX's threefry numbers, so a JAX change of the PRNG could too.
PINNED_A = {('attn', 'wq'): ([-0.06940676, -0.004747, 0.14266342], 0.40640748),
            ('attn', 'wv'): ([-0.07695395, 0.14638208, 0.03925363], 1.5340347),
            ('mlp', 'down'): ([-0.08143225, -0.11786112, -0.0108456], 1.2066884)}


def test_adapters_are_drawn_after_the_base_weights():
  lora_cfg = lora.LoraConfig(2, 4.0, ('q', 'v', 'down'))
  adapters, base = lora.split_params(build(lora_cfg)[1])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), base, plain_params()))
  pure = nnx.to_pure_dict(adapters)['blocks'][0]
  assert {(m, w) for m in pure for w in pure[m]['lora']} == set(PINNED_A)
  for (module, weight), (head, total) in PINNED_A.items():
    a, b = np.asarray(pure[module]['lora'][weight]['a']), np.asarray(pure[module]['lora'][weight]['b'])
    np.testing.assert_allclose(a.ravel()[:3], head, rtol=1e-6)
    np.testing.assert_allclose(a.sum(), total, rtol=1e-5)
    assert a.shape[-1] == b.shape[0] == 2 and not b.any()


def test_lora_forward_and_sampler_equal_merged_weights():
  # q (query heads), v (kv heads), o (two input dims), gate, down; k and up stay untouched.
  lora_cfg = lora.LoraConfig(4, 8.0, ('q', 'v', 'o', 'gate', 'down'))
  graphdef, plain_graphdef, params = lora_params(lora_cfg, b_std=0.3)
  want = numpy_merge(nnx.to_pure_dict(params), lora_cfg.scale)  # scale = 8 / 4 = 2
  merged = lora.merge_params(params, lora_cfg.scale)
  got = nnx.to_pure_dict(merged)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  base = nnx.to_pure_dict(lora.base_params(params))
  assert np.array_equal(got['blocks'][0]['attn']['wk'], base['blocks'][0]['attn']['wk'])
  assert not np.allclose(got['blocks'][0]['attn']['wo'], base['blocks'][0]['attn']['wo'], atol=1e-3)
  plain = plain_params()
  nnx.replace_by_pure_dict(plain, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), want))
  prompt, prompt_mask = batch()[:2]
  mask = prompt_mask.astype(bool)
  lora_logits, merged_logits = logits_of(graphdef, params, prompt, mask), logits_of(plain_graphdef, plain, prompt, mask)
  np.testing.assert_allclose(lora_logits, merged_logits, rtol=1e-5, atol=1e-5)
  assert np.abs(lora_logits - logits_of(plain_graphdef, lora.base_params(params), prompt, mask)).max() > 1e-2
  # The sampler (prefill + KV-cache decode) runs the adapters unmerged: same tokens as the merged plain model.
  options = dict(max_new_tokens=5, eos_id=1, pad_id=0, greedy=True, group_size=2)
  ours = make_sampler(graphdef, **options)(params, prompt, prompt_mask, jax.random.key(0))
  ref = make_sampler(plain_graphdef, **options)(plain, prompt, prompt_mask, jax.random.key(0))
  np.testing.assert_array_equal(ours.tokens, ref.tokens)
  np.testing.assert_allclose(ours.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def grpo_rollout(seed: int = 0) -> Rollout:
  prompt, prompt_mask, completion, completion_mask = batch(seed, n=8)
  rng = np.random.default_rng(seed)
  old = (-3.0 + 0.1 * rng.standard_normal(completion.shape)).astype(np.float32)
  adv = rng.standard_normal(8).astype(np.float32)
  return Rollout(prompt, prompt_mask, completion, completion_mask, old, old, adv)


@pytest.mark.parametrize('grad_accum_steps, remat', [(1, 'none'), (2, 'full')])
def test_train_step_moves_only_the_adapters(grad_accum_steps, remat):
  lora_cfg = lora.LoraConfig(4, 8.0, ALL)
  graphdef, _, params = lora_params(lora_cfg)
  params = jax.tree.map(np.asarray, params)  # init_state puts them in fresh buffers: the step donates them
  before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
  opt_cfg = ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0,
                            master_dtype='float32'))
  tx = make_optimizer(opt_cfg, total_steps=10)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state = init_state(params, tx, mesh, trainable=lora.TRAINABLE)
  loss_fn = functools.partial(grpo_objective, config=LossConfig(remat=remat))
  step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, mesh), sharding.batch_sharding(mesh), mesh,
                         grad_accum_steps=grad_accum_steps, trainable=lora.TRAINABLE)
  state, out = step(state, grpo_rollout(), {'beta': np.float32(0.04)})
  assert float(out['grad_norm']) > 0
  after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(state.params)}
  assert after.keys() == before.keys()
  for k in before:
    if 'lora' not in k:
      np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))  # the base: bit-identical
    elif k[-1] == 'b':  # B moves from 0 (A does not yet: its gradient has a factor B = 0)
      assert np.abs(after[k]).min() > 0, k
  # Optimizer state only for the adapters. Per layer (d 32, 4 q / 2 kv heads of 8, mlp 64, r 4), A + B:
  # q 32*4 + 4*32 = 256, k and v 32*4 + 4*16 = 192 each, o 32*4 + 4*32 = 256, gate and up 32*4 + 4*64 = 384
  # each, down 64*4 + 4*32 = 384: 2048 adapter params in the one layer. AdamW keeps mu and nu: 4096 floats.
  n_adapters = sum(x.size for x in jax.tree.leaves(lora.split_params(state.params)[0]))
  assert n_adapters == 2048
  opt_floats = sum(x.size for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
  assert opt_floats == 2 * 2048
  assert sum(x.size for x in jax.tree.leaves(state.params)) == 2048 + sum(
      x.size for x in jax.tree.leaves(plain_params()))  # the base once


def test_reference_is_the_frozen_base_without_a_copy():
  graphdef, plain_graphdef, params = lora_params(lora.LoraConfig(4, 8.0, ALL), b_std=0.3)
  ref = lora.base_params(params)
  ids = {id(x) for x in jax.tree.leaves(params)}
  assert all(id(x) in ids for x in jax.tree.leaves(ref))  # the very arrays of the policy's state
  tokens = batch(1)
  ref_logprobs = make_sequence_logprobs_fn(plain_graphdef)(ref, *tokens)  # what the trainer runs when beta > 0
  base_model = nnx.merge(plain_graphdef, plain_params())  # the plain model of the same seed: the same base
  np.testing.assert_allclose(ref_logprobs, sequence_logprobs(base_model, *tokens), rtol=1e-6, atol=1e-6)
  policy = sequence_logprobs(nnx.merge(graphdef, params), *tokens)
  assert np.abs((np.asarray(policy) - np.asarray(ref_logprobs)) * tokens[3]).max() > 1e-3  # adapters on vs off


# ------------------------------------------------------------------------------------------- end to end

LORA_OVERRIDES = ('--config.lora.rank=4', '--config.rl.lr=1e-2', '--config.export_hf=True')  # lr: B moves visibly


def read_rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics.read_metrics(str(workdir))]


def unwrap(tree):
  """An orbax-restored nnx.State ({'0': {'wq': {'value': x}}}) as a pure dict of numpy ({0: {'wq': x}})."""
  if isinstance(tree, dict) and tree.keys() == {'value'}:
    return np.asarray(tree['value'])
  if isinstance(tree, dict):
    return {int(k) if k.isdigit() else k: unwrap(v) for k, v in tree.items()}
  return tree


def raw_state(workdir, stage: str) -> dict:
  """The latest checkpoint's train state as saved, as numpy: no target, so no assumption on what it holds or on
  the devices that wrote it (the run used config.cpu_devices=2; this process has one)."""
  import orbax.checkpoint as ocp
  step = checkpoint.read_meta(checkpoint.manager(str(workdir), stage, max_to_keep=2))['step']
  path = os.path.join(workdir, 'checkpoints', stage, str(step), 'policy')
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('lora')
  # One CPU device, as the in-process resume below has: equal metrics need the same reduction order.
  proc = subprocess.run(train_command(workdir, *LORA_OVERRIDES, '--config.cpu_devices=0'), cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout


def test_main_command_with_lora_trains_adapters_and_exports_merged_weights(lora_run):
  workdir, stdout = lora_run
  assert 'grpo: LoRA rank 4 on q,k,v,o,gate,up,down: 4,096 trained params' in stdout
  assert json.loads((workdir / 'summary.json').read_text())['rl_steps'] == 4
  assert all('kl' in r for r in read_rows(workdir) if r['stage'] == 'grpo')
  final = checkpoint.read_meta(checkpoint.manager(str(workdir), 'grpo', max_to_keep=2))
  assert final['finished'] and final['lora'] == {'rank': 4, 'alpha': 16.0, 'targets': list(ALL)}
  # No reference tree: the checkpoint holds the policy (base once + adapters + their optimizer state), the KL
  # controller's beta and meta.
  assert sorted(os.listdir(workdir / 'checkpoints' / 'grpo' / '4')) == ['_CHECKPOINT_METADATA', 'commit_success.txt',
                                                                         'kl_controller', 'meta', 'policy']
  state = raw_state(workdir, 'grpo')
  sft = unwrap(raw_state(workdir, 'sft')['params'])
  flat = lambda tree: {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}  # noqa: E731
  params, sft_flat = flat(unwrap(state['params'])), flat(sft)
  adapter_keys = [k for k in params if any(getattr(e, 'key', None) == 'lora' for e in k)]
  assert sum(params[k].size for k in adapter_keys) == 4096
  assert sum(x.size for x in flat(unwrap(state['opt_state'])).values() if x.ndim) == 2 * 4096
  # The frozen base is the SFT policy, bit for bit: the reference (beta = 0.04 in tiny) and the merge's W.
  assert {k: v for k, v in params.items() if k not in adapter_keys}.keys() == sft_flat.keys()
  for k, v in sft_flat.items():
    np.testing.assert_array_equal(params[k], v)
  # The export is W + (16 / 4) A @ B, in transformers' layout: read back into ours by hf.load_params.
  model_cfg = ModelConfig(**final['model'])
  exported = nnx.to_pure_dict(hf.load_params(str(workdir / 'hf_model'), model_cfg))
  want = numpy_merge(unwrap(state['params']), 4.0)
  moved = max(np.abs(want['blocks'][i]['mlp']['down'] - sft['blocks'][i]['mlp']['down']).max() for i in (0, 1))
  assert moved > 1e-3  # the adapters trained, so the merge is not a copy of the base
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), exported, want)
  # Eval from the workdir (evaluate.restore_params) merges the adapters the same way.
  abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)[1]
  where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), abstract)
  restored, stage, step = evaluate.restore_params(str(workdir), abstract, final['model'])
  assert (stage, step) == ('grpo', 4)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), nnx.to_pure_dict(restored),
               exported)


def test_lora_resume_matches_and_uses_the_base_as_reference(lora_run, tmp_path, monkeypatch, capsys):
  """Resume from the mid-GRPO checkpoint (step 2 of 4) in-process; the rollouts' reference params are the
  state's own base arrays, and the rest of the run matches the uninterrupted one."""
  reference, _ = lora_run
  workdir = tmp_path / 'w'
  shutil.copytree(reference, workdir)
  for name in ('checkpoints/grpo/4', 'summary.json', 'hf_model'):
    shutil.rmtree(workdir / name) if (workdir / name).is_dir() else (workdir / name).unlink()
  seen = []

  def spy(sampler, ref_fn, params, ref_params, *args, **kwargs):
    ids = {id(x) for x in jax.tree.leaves(lora.base_params(params))}
    seen.append(ref_fn is not None and all(id(x) in ids for x in jax.tree.leaves(ref_params))
                and sum(x.size for x in jax.tree.leaves(ref_params)) == 26_400)  # the base, no adapters
    return collect_rollout(sampler, ref_fn, params, ref_params, *args, **kwargs)

  collect_rollout = grpo_stage.collect_rollout
  monkeypatch.setattr(grpo_stage, 'collect_rollout', spy)
  cfg = load_config('tiny')
  cfg.lora.rank, cfg.rl.lr, cfg.export_hf, cfg.cpu_devices = 4, 1e-2, True, 0  # lora_run's config
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    runner.run(cfg, str(workdir))
  finally:
    for s, h in handlers.items():
      signal.signal(s, h)
  assert 'grpo: resuming from step 2' in capsys.readouterr().out
  assert seen == [True, True]  # steps 3 and 4
  assert read_rows(workdir) == read_rows(reference)
  ours = nnx.to_pure_dict(hf.load_params(str(workdir / 'hf_model'), setup_lib.tokenizer_and_model_config(cfg)[1]))
  theirs = nnx.to_pure_dict(hf.load_params(str(reference / 'hf_model'), setup_lib.tokenizer_and_model_config(cfg)[1]))
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_checkpoint_of_another_lora_config_is_rejected(lora_run, tiny_config, monkeypatch):
  built_too_early = lambda *a, **k: pytest.fail('built the model before the check')  # noqa: E731
  monkeypatch.setattr(setup_lib, 'Transformer', built_too_early)
  monkeypatch.setattr(lora, 'Transformer', built_too_early)  # what lora.transformer builds on
  tiny_config.lora.rank, tiny_config.cpu_devices = 8, 0  # lora_run's devices; the LoRA rank differs
  # Even when the config change is accepted, the checkpoint's LoRA config refuses it before any model is built.
  with pytest.raises(checkpoint.CheckpointError, match=r"trained with LoRA \{'rank': 4.*config.lora gives"):
    runner.run(tiny_config, str(lora_run[0]), allow_config_change=['lora.rank', 'rl.lr', 'export_hf'])


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize('key, value, match', [
    ('rank', -1, r'config.lora.rank must be an int >= 0'),
    ('targets', 'q,qq,gate', r"config.lora.targets: unknown \['qq'\]; known: \['q', 'k', 'v', 'o', 'gate'"),
    ('stages', 'sft,rl', r"config.lora.stages: unknown \['rl'\]; known: \['sft', 'grpo'\]"),
    ('alpha', 0.0, r'config.lora.alpha must be a positive number'),
    ('targets', ' , ', r'config.lora.rank=4 needs at least one target'),
])
def test_bad_lora_config_values_are_named(tiny_config, key, value, match):
  tiny_config.lora.rank = 4
  tiny_config.lora[key] = value
  with pytest.raises(ValueError, match=match):
    check_config(tiny_config, 1)


def test_lora_config_parsing(tiny_config):
  check_config(tiny_config, 1)  # rank 0: off
  assert setup_lib.stage_lora(tiny_config, 'grpo') is None
  tiny_config.lora.rank, tiny_config.lora.targets = 8, ' q, v'
  assert setup_lib.stage_lora(tiny_config, 'grpo') == lora.LoraConfig(8, 16.0, ('q', 'v'))
  assert setup_lib.stage_lora(tiny_config, 'sft') is None  # default: GRPO only; SFT from scratch trains all
  assert setup_lib.stage_lora(tiny_config, 'grpo').scale == 2.0


# ------------------------------------------------------------------------------ sharded (8 CPU devices)

SHARDED = textwrap.dedent('''
    import functools, json
    import jax, numpy as np
    from flax import nnx
    from ml_collections import ConfigDict
    from grpo_jax.models import lora
    from grpo_jax.parallel import sharding
    from grpo_jax.core.losses import LossConfig, grpo_objective
    from grpo_jax.rollout.rollout import Rollout
    from grpo_jax.models.transformer import ModelConfig
    from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings

    cfg = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4, mlp_dim=64)
    lora_cfg = lora.LoraConfig(4, 8.0, tuple(lora.TARGETS))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: lora.transformer(cfg, nnx.Rngs(0), lora_cfg)), nnx.Param)
    rng = np.random.default_rng(0)
    draw = lambda path, x: ((1.0 if str(path[-1].key) == 'scale' else 0.0) + 0.2 * rng.standard_normal(x.shape)
                            ).astype(np.float32)  # B != 0 too, so A has a gradient
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params)))
    host = jax.tree.map(np.asarray, params)
    n, p, c = 16, 6, 8
    prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, (n, 1))).astype(np.int32)
    completion_mask = (np.arange(c)[None] < rng.integers(1, c + 1, (n, 1))).astype(np.int32)
    tokens = lambda m: np.where(m, rng.integers(1, 40, m.shape), 0).astype(np.int32)
    old = (-3.0 + 0.5 * rng.standard_normal((n, c))).astype(np.float32)
    rollout = Rollout(tokens(prompt_mask), prompt_mask, tokens(completion_mask), completion_mask, old,
                      old - 0.1, rng.standard_normal(n).astype(np.float32))
    loss_fn = functools.partial(grpo_objective, config=LossConfig())
    opt_cfg = ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=1.0,
                              master_dtype='float32'))
    spec = lambda x: [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]
    out = {}
    for name, shape in (('one', (1, 1, 1)), ('all', (2, 2, 2))):
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:1] if name == 'one' else None)
        tx = make_optimizer(opt_cfg, total_steps=10)
        state = init_state(host, tx, mesh, trainable=lora.TRAINABLE)
        step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, mesh), sharding.batch_sharding(mesh),
                               mesh, trainable=lora.TRAINABLE)
        losses, norms = [], []
        for _ in range(2):
            state, m = step(state, rollout, {'beta': np.float32(0.04)})
            losses.append(float(m['loss']))
            norms.append(float(m['grad_norm']))
        wq = state.params['blocks'][0]['attn']
        out[name] = dict(losses=losses, norms=norms, params=jax.tree.map(lambda x: np.asarray(x).tolist(),
                                                                         nnx.to_pure_dict(state.params)),
                         a_spec=spec(wq['lora']['wq']['a'][...]), b_spec=spec(wq['lora']['wq']['b'][...]),
                         mu_spec=spec(state.opt_state[1][0].mu['blocks'][0]['attn']['lora']['wq']['b'][...]))
    print('RESULT ' + json.dumps(out))
''')


def test_sharded_lora_step_matches_one_device(tmp_path):
  script = tmp_path / 'lora_sharded.py'
  script.write_text(SHARDED)
  env = {**ENV, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'PYTHONPATH': os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')])}
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT '))[len('RESULT '):])
  one, many = result['one'], result['all']
  np.testing.assert_allclose(many['losses'], one['losses'], rtol=1e-5)
  np.testing.assert_allclose(many['norms'], one['norms'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), many['params'], one['params'])
  # A [embed, r] splits like wq's input dim (fsdp), B [r, q_heads, head_dim] like its heads (tensor); r whole.
  strip = lambda spec: spec[:-1] if spec and spec[-1] is None else spec  # noqa: E731  (jax may drop a trailing None)
  assert strip(many['a_spec']) == ['fsdp']
  assert strip(many['b_spec']) == [None, 'tensor']
  assert many['mu_spec'] == many['b_spec']  # Adam moments follow their adapter
