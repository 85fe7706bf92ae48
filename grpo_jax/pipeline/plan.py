"""Will a GRPO config fit? Per-device memory and FLOPs of one step, compiled ahead of time on a simulated mesh
(the library behind `python -m grpo_jax.plan`, whose docstring explains the numbers).

No weights and no accelerator. The model is built abstractly (nnx.eval_shape); the trainer's own jitted sampler,
reference forward and train step, built through pipeline/setup.py and pipeline/grpo.py, are lowered on
ShapeDtypeStructs and compiled for `num_devices` fake CPU devices (jax_num_cpu_devices, set before jax starts a
backend). A jax.sharding.AbstractMesh would need no devices, but in jax 0.10 it only lowers (to StableHLO for a
named platform); memory_analysis needs a compiled executable. Compiled SPMD programs are per device, so their
memory analysis is per device.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from grpo_jax.models import flops
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import host_memory
from grpo_jax.pipeline.config_checks import check_batch_layout
from grpo_jax.pipeline.grpo import loss_hparams, make_grpo_train_step
from grpo_jax.pipeline.setup import build_setup, layout_rules, tokenizer_and_model_config
from grpo_jax.pipeline.train_state import TrainState, make_optimizer
from grpo_jax.rollout.rollout import Rollout

GIB = 2**30
MEMORY_KEYS = ('arguments', 'outputs', 'aliased', 'temporaries')
# (config, --num_layers, mesh) -> compiled sizes: planning again for another HBM size or device kind reuses them.
_COMPILED: dict[tuple, dict] = {}


def simulate_devices(num_devices: int) -> None:
  """num_devices fake CPU devices. XLA reads the count when it starts its backend, so call this before any
  jax computation or device query."""
  try:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', num_devices)
  except RuntimeError as e:
    raise RuntimeError(f'simulate_devices({num_devices}) must run before jax initializes a backend: {e}') from e
  if jax.device_count() != num_devices:
    raise RuntimeError(f'asked for {num_devices} simulated devices, jax has {jax.device_count()}')


def _name(path) -> str:
  """'blocks/3/attn/wq' -> 'blocks/*/attn/wq': one entry for a tensor that every layer has."""
  keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
  return '/'.join('*' if k.isdigit() else k for k in keys)


def unsharded_dims(params, mesh, rules: sharding.Rules) -> list[dict]:
  """Parameter dims that a mesh axis should split but does not divide, grouped over layers, biggest first."""
  found: dict[tuple, dict] = {}
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, x in leaves:
    axes = getattr(x, 'logical_axes', None)
    spec = rules.spec(axes)  # raises on a logical axis without a rule
    fitted = sharding.fit_spec(spec, x.shape, mesh)
    for i, (want, got) in enumerate(zip(spec, fitted, strict=False)):  # P() (no logical axes) is shorter
      if want is not None and got is None:
        mesh_axes = (want,) if isinstance(want, str) else tuple(want)
        entry = found.setdefault((_name(path), i), dict(
            param=_name(path), shape=list(x.shape), dim=i, logical=axes[i], mesh_axes=list(mesh_axes),
            mesh_size=math.prod(mesh.shape[a] for a in mesh_axes), count=0, bytes=0))
        entry['count'] += 1
        entry['bytes'] += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  return sorted(found.values(), key=lambda e: -e['bytes'])


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of an abstract tree laid out by `shardings` (a tree of the same structure)."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings)
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(leaves, shards, strict=True))


def abstract_model(model_cfg: ModelConfig):
  """(graphdef, abstract params): shapes and logical axes only, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)


def _lower(fn, args: tuple, in_shardings):
  """Lower one of the trainer's functions: its own jit, or (a wrapper around one, like the sampler's reshard to
  its layout) an outer jit taking the arguments in the shardings the trainer passes them in."""
  if hasattr(fn, 'lower'):
    return fn.lower(*args)
  return jax.jit(fn, in_shardings=in_shardings).lower(*args)


def compile_phases(cfg, tokenizer, model_cfg: ModelConfig, mesh) -> dict[str, dict[str, float]]:
  """Per-device compiled memory (bytes) and compile time of the trainer's jitted GRPO functions on abstract inputs:
  the sampler, the reference forward (run also at beta 0) and one train step on a minibatch. Built through the trainer's
  own setup (pipeline/setup.py) and GRPO stage (pipeline/grpo.py), so the plan compiles what the run would."""
  rl = cfg.rl
  p, c, rows = cfg.max_prompt_len, cfg.max_new_tokens, rl.num_prompts * rl.group_size
  setup = build_setup(cfg, mesh=mesh, tokenizer=tokenizer, model_cfg=model_cfg, data=False, abstract=True)
  params, policy = setup.init_params, setup.policy()
  batch_sharding, replicated = setup.batch_sharding, sharding.replicated(mesh)
  arr = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731

  prompts = arr(rl.num_prompts, p)
  key = jax.eval_shape(lambda: jax.random.key(0))
  lowered = {'sampler': lambda: _lower(policy.sampler, (params, prompts, prompts, key),
                                       (setup.param_shardings, batch_sharding, batch_sharding, replicated))}
  ref_args = (params, arr(rows, p), arr(rows, p), arr(rows, c), arr(rows, c))
  lowered['reference_forward'] = lambda: _lower(setup.reference_forward, ref_args,
                                                (setup.param_shardings, *[batch_sharding] * 4))
  tx = make_optimizer(rl, rl.num_steps, param_dtype=model_cfg.param_dtype)
  state = TrainState(arr(dtype=jnp.int32), params, jax.eval_shape(tx.init, params))
  mb = rows // rl.num_minibatches
  batch = Rollout(arr(mb, p), arr(mb, p), arr(mb, c), arr(mb, c), arr(mb, c, dtype=jnp.float32),
                  arr(mb, c, dtype=jnp.float32), arr(mb, dtype=jnp.float32))
  step = make_grpo_train_step(setup, policy, state, tx)
  hparams = jax.eval_shape(lambda: loss_hparams(cfg))
  lowered['train_step'] = lambda: step.lower(state, batch, hparams)

  out = {}
  for name, lower in lowered.items():
    start = time.perf_counter()
    memory = lower().compile(sharding.KEEP_REMAT).memory_analysis()  # as the trainer's jits compile
    out[name] = dict(arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                     aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                     compile_s=time.perf_counter() - start)
  return out


def _extrapolate(at_k: dict, at_k1: dict, k: int, layers: int) -> dict:
  """Each compiled size linear in depth through the k- and (k+1)-layer points, taken to `layers`; adds the
  per-layer growth of the temporaries."""
  out = {}
  for phase, a in at_k.items():
    b = at_k1[phase]
    out[phase] = {key: a[key] + (layers - k) * (b[key] - a[key]) for key in MEMORY_KEYS}
    out[phase].update(compile_s=a['compile_s'] + b['compile_s'], temporaries_per_layer=b['temporaries'] -
                      a['temporaries'])
  return out


def resident_trees(cfg, params, mesh, rules: sharding.Rules, param_dtype: str) -> dict[str, int]:
  """Bytes per device of the trees a GRPO stage keeps for its whole length: the policy, AdamW's state, the frozen
  reference (kept whatever beta is) and, when an SFT stage runs first, the initial params it outlives."""
  rl = cfg.rl
  opt_state = jax.eval_shape(make_optimizer(rl, rl.num_steps, param_dtype=param_dtype).init, params)
  policy = shard_bytes(params, sharding.tree_shardings(params, mesh, rules))
  resident = {'policy params': policy,
              'optimizer state': shard_bytes(opt_state, sharding.tree_shardings(opt_state, mesh, rules)),
              'reference params': policy}
  if cfg.sft.max_steps > 0:
    resident['initial params'] = policy
  return resident


def phase_totals(compiled: dict[str, dict], resident: dict[str, int]) -> dict[str, dict]:
  """Each phase's compiled sizes plus the resident trees that are not among its arguments: its peak per device
  ('total'), and 'working_set', what the phase adds on top of the memory in use when it starts (outputs - aliased
  + temporaries: its arguments already exist)."""
  # The sampler's arguments are the policy params (a copy resharded to its layout is among its temporaries).
  others = {'sampler': ['optimizer state', 'reference params'],
            'reference_forward': ['policy params', 'optimizer state'],
            'train_step': ['reference params']}
  phases = {}
  for name, m in compiled.items():
    rest = sum(resident[k] for k in others[name] + (['initial params'] if 'initial params' in resident else []))
    working = m['outputs'] - m['aliased'] + m['temporaries']
    phases[name] = {**{k: int(m[k]) for k in MEMORY_KEYS}, 'resident': rest,
                    'total': int(m['arguments'] + working + rest), 'working_set': int(working),
                    'compile_s': m['compile_s'], 'temporaries_per_layer': m.get('temporaries_per_layer')}
  return phases


# What makes each phase smaller, for the trainer's "does not fit" line (knobs already at their smallest are left out).
_KNOBS = {
    'train_step': (('model.remat', 'full'), ('model.logprob_chunk', 64), ('rl.grad_accum_steps', None),
                   ('rl.num_minibatches', None)),
    'reference_forward': (('model.logprob_chunk', 64), ('rl.grad_accum_steps', None)),
    'sampler': (('rl.num_prompts', None), ('rl.group_size', None), ('max_new_tokens', None), ('max_prompt_len', None)),
}


def _knob_hints(cfg, phase: str) -> str:
  hints = []
  for knob, want in _KNOBS[phase]:
    section, _, name = knob.rpartition('.')
    value = (cfg[section] if section else cfg)[name]
    if want is None:
      grow = knob in ('rl.grad_accum_steps', 'rl.num_minibatches')
      hints.append(f'--config.{knob}={value * 2 if grow else max(1, value // 2)}')
    elif value != want and not (knob == 'model.logprob_chunk' and 0 < value <= want):
      hints.append(f'--config.{knob}={want}')
  return ' '.join(hints)


def memory_in_use_and_limit(devices) -> tuple[int | None, int | None, str]:
  """(bytes in use, bytes this process may use, what they are of): device memory on an accelerator (the fullest of
  `devices`), host RAM and this process's resident memory on CPU."""
  if devices[0].platform == 'cpu':
    return host_memory.rss_bytes(), host_memory.host_memory_bytes(), 'host RAM'
  stats = [d.memory_stats() or {} for d in devices]
  in_use = [s.get('bytes_in_use') for s in stats]
  limit = [s.get('bytes_limit') for s in stats]
  if None in in_use or None in limit:
    return None, None, 'device memory'
  return max(in_use), min(limit), 'device memory'


def check_memory(cfg, setup, limit_bytes: int | None = None) -> dict | None:
  """Before a GRPO stage's first step: the plan of its phases (compiled here, on the run's own mesh) against the
  memory this process has (or limit_bytes). Raises MemoryError with one line naming the phase and the knobs that
  would shrink it; returns the numbers checked (None where the backend does not report its memory)."""
  if memory_in_use_and_limit(setup.mesh.devices.flat)[0] is None:
    return None
  model_cfg = setup.model_cfg
  resident = resident_trees(cfg, abstract_model(model_cfg)[1], setup.mesh, setup.rules, model_cfg.param_dtype)
  phases = phase_totals(compile_phases(cfg, setup.tokenizer, model_cfg, setup.mesh), resident)
  # In use now, read after those compiles: the policy params, and on CPU also the runtime, data, mapped weight files,
  # compiled programs and the compiler's leftover heap, which the run's own compiles leave the same. Still to come:
  # the resident trees the stage adds, then the phase's working set. Freed buffers stay in the process's pool and
  # are reused, so the phases' working sets do not add up: the largest one counts.
  in_use, limit, what = memory_in_use_and_limit(setup.mesh.devices.flat)
  limit = limit_bytes or limit
  to_come = resident['optimizer state'] + resident['reference params']
  need = {name: in_use + to_come + ph['working_set'] for name, ph in phases.items()}
  worst = max(need, key=need.get)
  result = {'in_use': in_use, 'limit': limit, 'need': need, 'peak_phase': worst, 'of': what}
  if need[worst] > limit:
    raise MemoryError(
        f'memory plan: the GRPO {worst} needs {need[worst] / GIB:.1f} GiB of {what} ({in_use / GIB:.1f} in use, '
        f'{to_come / GIB:.1f} for the optimizer state and reference, {phases[worst]["working_set"] / GIB:.1f} for '
        f'the phase) and this process has {limit / GIB:.1f} GiB; to fit, try {_knob_hints(cfg, worst)} '
        '(or --config.memory_check=off to run anyway)')
  return result


def make_plan(cfg, *, num_devices: int, device_kind: str, hbm_gib: float | None = None,
              num_layers: int | None = None) -> dict:
  """The plan as a JSON-able dict (sizes in bytes per device). Bad input raises ValueError before any compile."""
  spec = flops.device_spec(device_kind)
  if hbm_gib is None:
    if spec is None:
      raise ValueError(f'unknown --device_kind {device_kind!r}: give --hbm_gib (known kinds: '
                       f'{[name for name, *_ in flops.DEVICE_SPECS]})')
    hbm_gib = spec[1].hbm_gib
  check_batch_layout(cfg, num_devices)  # the mesh fits the devices and every batch splits evenly
  rules, sampler_rules = layout_rules(cfg)
  sizes = sharding.mesh_shape({a: cfg.mesh[a] for a in sharding.MESH_AXES}, num_devices)
  abstract_mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))  # the checks below need no devices
  tokenizer, model_cfg = tokenizer_and_model_config(cfg)
  if num_layers is not None and not 0 < num_layers < model_cfg.num_layers:
    raise ValueError(f'--num_layers={num_layers} must be in [1, {model_cfg.num_layers}) (the config\'s depth)')

  _, params = abstract_model(model_cfg)
  for layout, these_rules in (('training', rules), ('sampler', sampler_rules)):
    bad = unsharded_dims(params, abstract_mesh, these_rules)
    if bad and not these_rules.allow_replication_fallback:
      raise ValueError(f'{layout} layout: mesh axes that do not divide the parameter dims they shard (or set config.'
                       'sharding.allow_replication_fallback=True to replicate those dims):\n' + _format_dims(bad))
  replicated = unsharded_dims(params, abstract_mesh, rules)
  if jax.device_count() != num_devices:
    raise ValueError(f'jax has {jax.device_count()} devices, the plan is for {num_devices}: call '
                     'simulate_devices(num_devices) before jax starts')
  mesh = sharding.make_mesh(sizes)
  rl = cfg.rl
  resident = resident_trees(cfg, params, mesh, rules, model_cfg.param_dtype)

  start = time.perf_counter()
  key = (cfg.to_json_best_effort(sort_keys=True), num_layers, tuple(sizes.items()))
  if key not in _COMPILED:
    if num_layers is None:
      _COMPILED[key] = compile_phases(cfg, tokenizer, model_cfg, mesh)
    else:
      at = [compile_phases(cfg, tokenizer, dataclasses.replace(model_cfg, num_layers=k), mesh)
            for k in (num_layers, num_layers + 1)]
      _COMPILED[key] = _extrapolate(*at, num_layers, model_cfg.num_layers)
  compiled = _COMPILED[key]
  compile_s = time.perf_counter() - start

  phases = phase_totals(compiled, resident)
  peak_phase = max(phases, key=lambda k: phases[k]['total'])
  peak = phases[peak_phase]['total']

  p, c, rows = cfg.max_prompt_len, cfg.max_new_tokens, rl.num_prompts * rl.group_size
  step_flops = flops.grpo_step_flops(model_cfg, num_prompts=rl.num_prompts, group_size=rl.group_size,
                                     prompt_len=p, completion_len=c, reference=rl.beta > 0,
                                     num_epochs=rl.num_epochs)
  peak_flops = flops.peak_flops(device_kind, model_cfg.dtype)
  # The two biggest activations as the rules would lay them out (the compiler may do worse: compare temporaries).
  mb = rows // rl.num_minibatches
  kv_cache = (rows * (p + c) * model_cfg.num_layers * 2 * model_cfg.num_kv_heads * model_cfg.head_dim
              * jnp.dtype(model_cfg.dtype).itemsize / _shards(mesh, sampler_rules, 'batch', rows)
              / _shards(mesh, sampler_rules, 'kv_heads', model_cfg.num_kv_heads))
  logits = (mb * (p + c) * model_cfg.vocab_size * 4 / _shards(mesh, rules, 'batch', mb)
            / _shards(mesh, rules, 'vocab', model_cfg.vocab_size))
  return {
      'num_devices': num_devices, 'device_kind': device_kind, 'device': spec[0] if spec else None,
      'hbm_bytes': int(hbm_gib * GIB), 'mesh': dict(mesh.shape),
      'model': {**{k: getattr(model_cfg, k) for k in ('model_type', 'num_layers', 'd_model', 'vocab_size',
                                                      'param_dtype', 'dtype')},
                'params': sum(math.prod(x.shape) for x in jax.tree.leaves(params))},
      'step': {'num_prompts': rl.num_prompts, 'group_size': rl.group_size, 'rows': rows, 'prompt_len': p,
               'completion_len': c, 'num_epochs': rl.num_epochs, 'num_minibatches': rl.num_minibatches,
               'beta': rl.beta},
      'compiled_layers': None if num_layers is None else [num_layers, num_layers + 1], 'compile_s': compile_s,
      'resident': resident, 'phases': phases, 'peak_phase': peak_phase, 'peak_bytes': peak,
      'fits': peak <= hbm_gib * GIB, 'replicated': replicated,
      'arithmetic': {'kv_cache': kv_cache, 'train_logits': logits},
      'flops': step_flops, 'peak_flops_per_device': peak_flops,
      'seconds_at_full_mfu': None if peak_flops is None else step_flops['total'] / (num_devices * peak_flops),
  }


def _shards(mesh, rules: sharding.Rules, logical: str, dim: int) -> int:
  """How many ways `rules` split a dim of size `dim` named `logical` (1 when its mesh axes do not divide it)."""
  size = math.prod(mesh.shape[a] for a in rules.mesh_axes(logical))
  return size if dim % size == 0 else 1


def _format_dims(dims: list[dict]) -> str:
  return '\n'.join(f"  {d['param']} {tuple(d['shape'])} x{d['count']}: dim {d['dim']} ({d['logical']!r}) = "
                   f"{d['shape'][d['dim']]} not divisible by mesh {'x'.join(d['mesh_axes'])}={d['mesh_size']}; "
                   f"{d['bytes'] / GIB:.3g} GiB replicated on every device" for d in dims)


def _unit(num_bytes: float) -> tuple[str, int]:
  return next((name, size) for name, size in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10), ('B', 1))
              if num_bytes >= size or size == 1)


def format_plan(plan: dict, config_name: str = '') -> str:
  """The plan as the table the command prints."""
  m, s, f = plan['model'], plan['step'], plan['flops']
  unit, size = _unit(max(plan['peak_bytes'], 1))
  num = lambda b, width=10: f'{b / size:{width}.2f}'  # noqa: E731
  lines = [
      f"GRPO plan {config_name}: {plan['num_devices']} x {plan['device_kind']} ({plan['device'] or 'unknown'}), "
      f"{plan['hbm_bytes'] / GIB:.4g} GiB each; mesh {' '.join(f'{k}={v}' for k, v in plan['mesh'].items())}",
      f"model: {m['model_type']}, {m['params'] / 1e9:.3f}B params, {m['num_layers']} layers, d_model "
      f"{m['d_model']}, vocab {m['vocab_size']}; params {m['param_dtype']}, compute {m['dtype']}",
      f"step: {s['num_prompts']} prompts x G={s['group_size']} = {s['rows']} rows of {s['prompt_len']} prompt + "
      f"{s['completion_len']} completion tokens; {s['num_epochs']} epoch(s) x {s['num_minibatches']} "
      f"minibatch(es) of {s['rows'] // s['num_minibatches']} rows; beta {s['beta']}",
  ]
  if plan['compiled_layers']:
    k = plan['compiled_layers']
    lines.append(f"compiled on {plan['num_devices']} simulated CPU devices with {k[0]} and {k[1]} layers "
                 f"({plan['compile_s']:.0f} s); compiled sizes extrapolated linearly to {m['num_layers']} layers")
  else:
    lines.append(f"compiled on {plan['num_devices']} simulated CPU devices ({plan['compile_s']:.0f} s)")
  if plan['replicated']:
    lines.append('WARNING: these dims are replicated, not sharded (config.sharding.allow_replication_fallback):')
    lines.append(_format_dims(plan['replicated']))
  lines.append(f'\nper device, {unit}')
  lines += [f'  {k:<20}{num(v)}' for k, v in plan['resident'].items()]
  header = ['arguments', 'outputs', '-aliased', 'temporaries', '+resident', '=total']
  per_layer = plan['compiled_layers'] is not None
  lines.append(f"  {'phase':<20}" + ''.join(f'{h:>12}' for h in header) + (f"{'temp/layer':>12}" if per_layer
                                                                          else ''))
  for name, ph in plan['phases'].items():
    row = [ph['arguments'], ph['outputs'], -ph['aliased'], ph['temporaries'], ph['resident'], ph['total']]
    lines.append(f'  {name:<20}' + ''.join(num(v, 12) for v in row) +
                 (num(ph['temporaries_per_layer'], 12) if per_layer else ''))
  a = plan['arithmetic']
  lines.append(f"  as the rules lay them out: sampler KV cache {num(a['kv_cache'], 0)}, train-step logits "
               f"[minibatch, p+c, vocab] f32 {num(a['train_logits'], 0)}")
  peak, hbm = plan['peak_bytes'], plan['hbm_bytes']
  ph = plan['phases'][plan['peak_phase']]
  parts = {'temporaries': ph['temporaries'], 'arguments + outputs': ph['arguments'] + ph['outputs'] - ph['aliased'],
           'resident trees': ph['resident']}
  verdict = (f'fits, {(hbm - peak) / size:.2f} {unit} spare' if plan['fits']
             else f'DOES NOT FIT: over by {(peak - hbm) / size:.2f} {unit}')
  lines.append(f"peak: {plan['peak_phase']} {num(peak, 0)} {unit} of {hbm / GIB:.4g} GiB -> {verdict} "
               f"(largest part: {max(parts, key=parts.get)})")
  lines.append(f"\nmodel FLOPs per step: {f['total']:.3g} = prefill {f['prefill']:.3g} + decode {f['decode']:.3g} + "
               f"reference {f['reference_forward']:.3g} + policy fwd+bwd {f['policy_forward_backward']:.3g}; "
               f"{f['total'] / plan['num_devices']:.3g} per device")
  if plan['seconds_at_full_mfu'] is not None:
    lines.append(f"at 100% MFU ({plan['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device in {m['dtype']}): "
                 f"{plan['seconds_at_full_mfu']:.3g} s per step; decode is memory-bound, so expect far more")
  return '\n'.join(lines)
