r"""Where a GRPO step's host memory goes: the trainer's own GRPO stage, one phase at a time, with the process's
peak resident memory (RSS) measured per phase and the compiled sizes of each phase's jitted function beside it.

  python benchmarks/memory_phases.py --config configs/smollm2.py --steps 2
  python benchmarks/memory_phases.py --config configs/gsm8k_hf.py --config.model.path=/models/smollm2 \
      --config.rl.group_size=8 --config.rl.num_prompts=4 --config.max_new_tokens=256

The stage is pipeline/grpo.make_stage, run as the trainer runs it; only its sampler, reference forward and train
step are wrapped so each blocks until done and reports the peak since the phase began (VmHWM, reset through
/proc/self/clear_refs before each phase). `before_step` is the resident memory the phases start from (params,
reference, optimizer state, data); the JSON line also has the prediction the trainer checks before its first step
(plan_gib: pipeline/plan.check_memory, the memory in use plus each phase's planned growth) for comparison.
"""
from __future__ import annotations

import json
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from grpo_jax.parallel import distributed
from grpo_jax.pipeline import grpo, host_memory, plan
from grpo_jax.pipeline.config_checks import check_config, parse_flags
from grpo_jax.pipeline.setup import build_setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]), as for grpo_jax.train.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 2, 'GRPO steps to run (the first compiles).')
_PLAN = flags.DEFINE_bool('plan', True, "First the trainer's memory check (pipeline/plan.check_memory: each phase "
                          'compiled ahead of time): its per-phase prediction goes beside the measured peaks.')

GIB = plan.GIB


class PhasePeaks:
  """Wraps a phase's function: each call blocks until its outputs are ready and records the peak RSS since the
  call began (and its wall time)."""

  def __init__(self):
    self.peaks: dict[str, list[float]] = {}
    self.times: dict[str, list[float]] = {}

  def wrap(self, name: str, fn):
    def measured(*args, **kwargs):
      host_memory.reset_peak_rss()
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      self.times.setdefault(name, []).append(time.perf_counter() - start)
      self.peaks.setdefault(name, []).append(host_memory.peak_rss_bytes() / GIB)
      return out
    return measured


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  cfg = _CONFIG.value
  distributed.use_cpu_devices(cfg.cpu_devices)
  check_config(cfg, jax.device_count())
  host_memory.reset_peak_rss()
  setup = build_setup(cfg)
  loaded = host_memory.peak_rss_bytes() / GIB
  checked = plan.check_memory(cfg, setup) if _PLAN.value else None  # what the trainer checks before its first step
  peaks = PhasePeaks()
  make_train_step = grpo.make_packed_train_step
  grpo.make_packed_train_step = lambda *a, **k: peaks.wrap('train_step', make_train_step(*a, **k))
  setup.reference_forward = peaks.wrap('reference_forward', setup.reference_forward)
  setup.policy(grpo.NAME)  # builds and caches the stage's policy, whose sampler is wrapped next
  setup._policies = {k: p._replace(sampler=peaks.wrap('sampler', p.sampler)) for k, p in setup._policies.items()}
  stage = grpo.make_stage(setup, setup.init_params)
  state = stage.state
  before = []
  for i in range(_STEPS.value):
    before.append(host_memory.rss_bytes() / GIB)
    state, metrics = stage.step(state, i)
    jax.block_until_ready(state)
    print(f'step {i}: reward {float(metrics["reward"]):.3f} completion_len {float(metrics["completion_len"]):.1f} '
          f'width {metrics["completion_width"]} ' + ' '.join(f'{k} {v[-1]:.2f} GiB / {peaks.times[k][-1]:.1f} s'
                                                             for k, v in peaks.peaks.items()), flush=True)
  result = {'config': flags.FLAGS['config'].config_filename, 'steps': _STEPS.value, 'loaded_gib': round(loaded, 3),
            'before_step_gib': [round(x, 3) for x in before],
            'phase_peak_gib': {k: [round(x, 3) for x in v] for k, v in peaks.peaks.items()},
            'phase_time_s': {k: [round(x, 2) for x in v] for k, v in peaks.times.items()},
            'process_peak_gib': round(max(max(v) for v in peaks.peaks.values()), 3),
            'model': {k: getattr(setup.model_cfg, k) for k in ('num_layers', 'd_model', 'vocab_size', 'dtype')},
            'step': {'num_prompts': cfg.rl.num_prompts, 'group_size': cfg.rl.group_size,
                     'max_prompt_len': cfg.max_prompt_len, 'max_new_tokens': cfg.max_new_tokens,
                     'remat': cfg.model.remat, 'logprob_chunk': cfg.model.logprob_chunk}}
  if checked is not None:
    result['plan_gib'] = {k: round(v / GIB, 3) for k, v in checked['need'].items()}
    result['plan_in_use_gib'] = round(checked['in_use'] / GIB, 3)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=lambda argv: parse_flags(argv, 'memory_phases')))
