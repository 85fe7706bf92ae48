r"""Will a GRPO config fit? Per-device memory and FLOPs of one step, compiled ahead of time on a simulated mesh.

  python -m grpo_jax.plan --config configs/deepseekmath_7b.py --num_devices 64 --device_kind 'TPU v5p' \
      --config.mesh.fsdp=16 --config.mesh.tensor=4 --num_layers 1
  python -m grpo_jax.plan --config configs/default.py:tiny --num_devices 8 --device_kind H100 --hbm_gib 0.001 \
      --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2 --json

No weights and no accelerator. The model is built abstractly (nnx.eval_shape); the trainer's own jitted sampler,
reference forward and train step are lowered on ShapeDtypeStructs and compiled for `--num_devices` fake CPU
devices (jax_num_cpu_devices, set before jax starts a backend). A jax.sharding.AbstractMesh would need no devices,
but in jax 0.10 it only lowers (to StableHLO for a named platform); memory_analysis needs a compiled executable.
Compiled SPMD programs are per device, so their memory analysis is per device.

  resident   policy params, AdamW state (2 moments + step count), the frozen reference the trainer always keeps
             (plus the initial params when an SFT stage runs first): exact, from each leaf's shard shape.
  phase      compiled arguments + outputs - donated (aliased) buffers + temporaries (activations, KV cache,
             logits), plus the resident trees that are not the phase's arguments.
  fits       the largest phase <= HBM per device.

The CPU compiler's fusion and buffer assignment differ from TPU / GPU (layouts, no rematerialization to meet a
memory limit, bf16 math sometimes widened to f32), so temporaries are an estimate; resident trees are exact. On
GPUs also mind XLA_PYTHON_CLIENT_MEM_FRACTION (jax preallocates 75% of HBM by default).

--num_layers k compiles the model with k and k + 1 layers and extrapolates every compiled size linearly to the
config's depth (the layers are identical); parameter, optimizer and FLOP numbers always use the full depth. It
is faster for big models; how close the extrapolation comes to a full compile is in benchmarks/RESULTS.md (the
sampler's while-loop buffers are not quite linear in depth).

Bad input fails before any compile, naming the culprit: a mesh that does not match --num_devices, a batch that
does not split over the data-parallel axes, a parameter dim its mesh axes do not divide (all of them, grouped
over layers; with config.sharding.allow_replication_fallback they are listed as a warning instead, as the
trainer then replicates them), a logical axis without a sharding rule.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from grpo_jax.pipeline.config_checks import parse_flags
from grpo_jax.pipeline.plan import format_plan, make_plan, simulate_devices

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when the command runs, not on import: train.py defines --config too, and one process may import
  both (a notebook)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]), as for grpo_jax.train.',
                                  lock_config=True)
  flags.DEFINE_integer('num_devices', None, 'Devices of the simulated mesh (config.mesh must fit).')
  flags.DEFINE_string('device_kind', 'TPU v5p', "jax device_kind or a short name: 'TPU v5 lite', 'v5p', 'v6e', "
                      "'H100', 'H200', 'A100 80GB' (peak FLOP/s and default HBM).")
  flags.DEFINE_float('hbm_gib', None, "Memory per device in GiB (default: the device kind's HBM).")
  flags.DEFINE_integer('num_layers', None, 'Compile with this many layers (and one more), then extrapolate to the '
                       "config's depth: faster for big models.")
  flags.DEFINE_bool('json', False, 'Also print the plan as one JSON line.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if FLAGS.config is None or FLAGS.num_devices is None:
    raise app.UsageError('--config and --num_devices are required')
  simulate_devices(FLAGS.num_devices)
  try:
    plan = make_plan(FLAGS.config, num_devices=FLAGS.num_devices, device_kind=FLAGS.device_kind,
                     hbm_gib=FLAGS.hbm_gib, num_layers=FLAGS.num_layers)
  except ValueError as e:
    sys.exit(f'plan: {e}')
  print(format_plan(plan, FLAGS['config'].config_filename))
  if FLAGS.json:
    print(json.dumps(plan))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'grpo_jax.plan'))
