"""grpo_jax.plan: per-device bytes equal the arithmetic, the verdict follows --hbm_gib, bad input fails before any
compile, and the 7B config gives sane totals. The tool needs simulated devices set before jax starts, so it runs in
subprocesses (this pytest process already has its jax backend)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import load_config
from flax import nnx
from jax.sharding import AbstractMesh

from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import plan

REPO = Path(__file__).resolve().parents[1]
# The tiny preset (d 32, 2 layers, 4 heads / 2 kv heads of 8, mlp 64, 4 prompts x G=4) on 8 devices: every
# weight matrix has one dim on fsdp=4 and one on tensor=2, so each device holds 1/8 of it.
TINY_MESH = ['--config.mesh.data=1', '--config.mesh.fsdp=4', '--config.mesh.tensor=2']


def run_plan(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'grpo_jax.plan', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=240)


def last_json(out: str) -> dict:
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def tiny_plan() -> tuple[dict, str]:
  proc = run_plan(f'--config={REPO}/configs/default.py:tiny', '--num_devices=8', '--device_kind=H100', '--json',
                  *TINY_MESH)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return last_json(proc.stdout), proc.stdout


def test_param_and_optimizer_bytes_are_the_arithmetic(tiny_plan):
  report, text = tiny_plan
  m = report['model']
  d, layers, vocab, f, n, k, h = m['d_model'], m['num_layers'], m['vocab_size'], 64, 4, 2, 8
  matrices = 2 * vocab * d + layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f)  # embed, head, q o, k v, mlp
  norms = (2 * layers + 1) * d  # replicated ('norm' has no mesh axis)
  assert m['params'] == matrices + norms
  params = (matrices // 8 + norms) * 4  # float32
  assert report['resident']['policy params'] == params
  assert report['resident']['optimizer state'] == 2 * params + 4  # AdamW mu and nu, plus its int32 step count
  assert report['resident']['reference params'] == params
  # The compiled train step takes exactly that state (+ the int32 step), this device's share of the minibatch (8 rows
  # over data x fsdp = 4 -> 2 rows of 4 int32 token / mask arrays, 2 float32 logprob arrays, advantages) and the
  # float32 beta and lr_scale, arguments so that a KL controller can change them without a recompile.
  p, c = report['step']['prompt_len'], report['step']['completion_len']
  batch = 2 * (2 * p + 2 * c) * 4 + 2 * (2 * c) * 4 + 2 * 4
  step = report['phases']['train_step']
  assert step['arguments'] == params + (2 * params + 4) + 4 + batch + 4 + 4
  assert step['aliased'] == params + 2 * params + 4 + 4  # the donated state comes back in place
  assert step['temporaries'] > 0 and report['phases']['sampler']['temporaries'] > 0
  assert report['fits'] and report['peak_bytes'] < 2**30
  assert 'fits' in text and 'DOES NOT FIT' not in text


def tiny_config(**overrides):
  cfg = load_config('tiny')
  for key, value in overrides.items():
    group, name = key.split('__')
    cfg[group][name] = value
  return cfg


@pytest.mark.parametrize('overrides, message', [
    (dict(mesh__data=1, mesh__fsdp=4, mesh__tensor=3), 'needs 12 devices; 8 available'),
    (dict(mesh__data=1, mesh__fsdp=4, mesh__tensor=2, rl__num_prompts=6),
     'rl.num_prompts=6 is not divisible by the data-parallel mesh size 4'),
    # 3 query heads (and 1 kv head) over tensor=2: named per parameter, one line for both layers.
    (dict(mesh__data=1, mesh__fsdp=4, mesh__tensor=2, model__num_heads=3, model__num_kv_heads=1),
     r"blocks/\*/attn/wq \(32, 3, 8\) x2: dim 1 \('q_heads'\) = 3 not divisible by mesh tensor=2"),
    (dict(sharding__rules=(*sharding.LOGICAL_RULES.items(), ('experts', 'fsdp'))), "unknown logical axis 'experts'"),
])
def test_bad_input_fails_before_any_compile(overrides, message):
  # 8 devices planned, this process has 1: the checks run on an AbstractMesh, before the device count matters.
  with pytest.raises(ValueError, match=message):
    plan.make_plan(tiny_config(**overrides), num_devices=8, device_kind='H100')
  with pytest.raises(ValueError, match='give --hbm_gib'):
    plan.make_plan(tiny_config(), num_devices=1, device_kind='TPU v9')


def test_verdict_follows_hbm():
  if jax.device_count() != 1:
    pytest.skip('compiles on this process\'s devices: needs exactly one')
  cfg = tiny_config(mesh__data=1, rl__beta=0.0)
  roomy = plan.make_plan(cfg, num_devices=1, device_kind='H100')
  tiny = plan.make_plan(cfg, num_devices=1, device_kind='H100', hbm_gib=roomy['peak_bytes'] / 2**30 / 2)
  assert roomy['fits'] and not tiny['fits'] and tiny['peak_bytes'] == roomy['peak_bytes']
  assert 'DOES NOT FIT' in plan.format_plan(tiny) and 'DOES NOT FIT' not in plan.format_plan(roomy)


def test_unsharded_dims_and_unknown_logical_axis_without_devices():
  cfg = ModelConfig(vocab_size=30, d_model=16, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=4, mlp_dim=32)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  found = {(d['param'], d['dim']): d for d in plan.unsharded_dims(params, mesh, sharding.DEFAULT_RULES)}
  assert set(found) == {('blocks/*/attn/wq', 1), ('blocks/*/attn/wo', 0), ('blocks/*/attn/wk', 1),
                        ('blocks/*/attn/wv', 1)}
  assert found[('blocks/*/attn/wq', 1)]['count'] == 2 and found[('blocks/*/attn/wq', 1)]['bytes'] == 2 * 16 * 3 * 4 * 4
  rules = sharding.Rules({k: v for k, v in sharding.LOGICAL_RULES.items() if k != 'mlp'})
  with pytest.raises(ValueError, match="logical axis 'mlp' has no sharding rule"):
    plan.unsharded_dims(params, mesh, rules)


def test_deepseekmath_7b_totals():
  # Compiled with 1 and 2 layers, extrapolated to 30. The reference forward runs also at beta 0 (the KL to the
  # reference is measured every step), so it is a phase of its own.
  proc = run_plan(f'--config={REPO}/configs/deepseekmath_7b.py', '--num_devices=8', '--device_kind=TPU v5p',
                  '--num_layers=1', '--config.rl.beta=0', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = last_json(proc.stdout)
  params = 2 * 102400 * 4096 + 30 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096
  assert report['model']['params'] == params  # 6.91B
  assert '6.910B params' in proc.stdout and 'extrapolated linearly to 30 layers' in proc.stdout
  norms = 61 * 4096
  assert report['resident']['policy params'] == ((params - norms) // 8 + norms) * 4  # fsdp=8, float32
  assert set(report['phases']) == {'sampler', 'reference_forward', 'train_step'}
  for name in ('sampler', 'train_step'):
    phase = report['phases'][name]
    assert phase['temporaries_per_layer'] > 0 and phase['total'] > report['resident']['policy params']
  # 1024 rows x 1536 tokens, no remat or minibatches: the train step's activations cannot fit 95 GiB.
  assert not report['fits'] and report['peak_phase'] == 'train_step'
  assert report['flops']['total'] == pytest.approx(7.73e16, rel=0.01)  # policy fwd+bwd + sampling


def _real_shaped_model_dir(path: Path, *, vocab: int, num_layers: int) -> None:
  """A random Llama-shaped Hugging Face directory: many layers, a large vocabulary (the embedded tokenizer plus
  made-up tokens), so the plan is checked where real models spend memory (LM head, depth) at a CI-sized cost."""
  import numpy as np  # noqa: PLC0415

  from grpo_jax.data.tokenizer import build_tokenizer  # noqa: PLC0415
  from grpo_jax.models import hf  # noqa: PLC0415

  tokenizer = build_tokenizer()
  tokenizer.add_tokens([f'<made_up_{i}>' for i in range(vocab - len(tokenizer))])
  cfg = ModelConfig(vocab_size=len(tokenizer), d_model=64, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=192, tie_embeddings=True)
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  graphdef, params = nnx.split(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                                                nnx.to_pure_dict(params)))
  hf.save_model(nnx.merge(graphdef, params), cfg, str(path))
  tokenizer.save_pretrained(str(path))


def _real_shaped_overrides(model_dir: Path, num_layers: int) -> list[str]:
  return [f'--config.model.path={model_dir}', '--config.sft.max_steps=0', '--config.rl.num_prompts=2',
          '--config.rl.group_size=4', '--config.max_new_tokens=128', '--config.cpu_devices=0',
          '--config.task.num_test=4', '--config.eval.batch_size=4', '--config.max_prompt_len=112',
          # config.model must agree with the checkpoint's config.json (the embedded default's fields are set)
          '--config.model.d_model=64', '--config.model.head_dim=16', '--config.model.mlp_dim=192',
          f'--config.model.num_layers={num_layers}', '--config.model.tie_embeddings=True']


def test_trainer_memory_check_predicts_each_phase_peak(tmp_path):
  # The prediction the trainer checks before its first step (plan.check_memory: the memory in use after compiling
  # the phases, the trees the stage adds, the largest planned phase growth) against each phase's measured peak RSS
  # in the trainer's own GRPO stage (benchmarks/memory_phases.py), on a 12-layer model with a 16k vocabulary.
  model_dir = tmp_path / 'model'
  _real_shaped_model_dir(model_dir, vocab=16384, num_layers=12)
  # One completion width and no packing: each phase is one program, as the plan compiles it (a new width or packed
  # row count is a new program, whose code and pool the plan does not count).
  overrides = [*_real_shaped_overrides(model_dir, 12), '--config.model.remat=full', '--config.model.logprob_chunk=32',
               '--config.rl.length_buckets=1', '--config.rl.pack_buckets=0']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, 'benchmarks/memory_phases.py', f'--config={REPO}/configs/default.py',
                         '--steps=2', *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = last_json(proc.stdout)
  print(json.dumps(result))
  # Each phase of the first step against its prediction. Later steps run on the allocator's pool, which keeps freed
  # buffers: there each phase peaks at the largest phase's level, so the process peak is checked against that.
  for phase, predicted in result['plan_gib'].items():
    measured = result['phase_peak_gib'][phase][0]
    assert abs(predicted - measured) <= 0.25 * measured, (phase, predicted, measured, result)
  predicted, measured = max(result['plan_gib'].values()), result['process_peak_gib']
  assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured, result)


def test_trainer_stops_with_one_line_when_the_plan_does_not_fit(tmp_path):
  model_dir = tmp_path / 'model'
  _real_shaped_model_dir(model_dir, vocab=4096, num_layers=2)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={REPO}/configs/default.py',
                         f'--workdir={workdir}', *_real_shaped_overrides(model_dir, 2),
                         '--config.memory_limit_gib=0.25'], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('grpo_jax.train: memory plan: the GRPO train_step needs'), proc.stderr[-2000:]
  assert 'of host RAM' in last and 'this process has 0.2 GiB' in last
  # remat and the chunked head are off in the embedded default: both are named, with the knobs that shrink the step
  assert '--config.model.remat=full --config.model.logprob_chunk=64 --config.rl.grad_accum_steps=2' in last
  assert 'Traceback' not in proc.stderr
  assert not (workdir / 'metrics.jsonl').exists() and not (workdir / 'init_eval.json').exists()  # nothing ran


def test_knob_hints_leave_out_knobs_already_at_their_smallest():
  cfg = load_config()
  cfg.model.remat, cfg.model.logprob_chunk, cfg.rl.grad_accum_steps = 'full', 32, 2
  assert plan._knob_hints(cfg, 'train_step') == '--config.rl.grad_accum_steps=4 --config.rl.num_minibatches=2'
  assert plan._knob_hints(cfg, 'sampler') == ('--config.rl.num_prompts=8 --config.rl.group_size=4 '
                                              '--config.max_new_tokens=20 --config.max_prompt_len=28')
