"""Several hosts: one process per host runs the same program; process 0 logs and writes the files.

  initialize()         # first thing in main, before any other jax call (no-op on one host)
  is_main_process()    # jax.process_index() == 0: metrics, progress bar, prints, summary.json
  host_local_batch(x, sharding)  # a global jax.Array from this host's rows of the numpy batch x
  host_io(jitted_fn, batch_sharding, batch_argnums=...)  # numpy in -> global arrays; outputs back to numpy
  use_cpu_devices(count)   # before any jax call on a CPU host: one XLA device per core, not one in all
  use_compile_cache(path)  # reruns and restarts load compiled executables from path (shared storage on a pod)

How a multi-host start is recognised (`launch_kind`), first match wins:
  GRPO_JAX_DISTRIBUTED=0                   never initialize (one process, whatever else is set)
  GRPO_JAX_COORDINATOR, GRPO_JAX_NUM_PROCESSES, GRPO_JAX_PROCESS_ID (and optional GRPO_JAX_LOCAL_DEVICE_IDS)
                                           explicit, e.g. launch/slurm.sh; jax's cluster detection is off,
                                           so every local device stays visible (one process per node)
  GRPO_JAX_DISTRIBUTED=1                   jax's own detection, e.g. launch/tpu_pod.sh: a GCE TPU VM keeps its
                                           worker list in the metadata server, not in the environment
  SLURM_NTASKS > 1 inside an srun step     jax's SLURM detection: one process per GPU (local_device_ids =
                                           [SLURM_LOCALID]), i.e. a plain `srun --ntasks-per-node=8 python ...`
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with several hosts, or MEGASCALE_NUM_SLICES > 1
                                           jax's TPU detection (GKE, multislice)
CLOUD_TPU_TASK_ID alone is not used: launchers set it on single-host VMs too, so it does not mean "several".
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Sharding

EXPLICIT = ('GRPO_JAX_COORDINATOR', 'GRPO_JAX_NUM_PROCESSES', 'GRPO_JAX_PROCESS_ID')
# What jax's SlurmCluster needs to be detected (jax/_src/clusters/slurm_cluster.py); outside an srun step some are
# missing and jax would fail with an unhelpful "coordinator_address should be defined".
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')


def _count(value: str | None) -> int:
  return len([h for h in (value or '').split(',') if h.strip()])


def launch_kind(env: Mapping[str, str] | None = None) -> str | None:
  """'explicit' | 'auto' | 'slurm' | 'tpu' for a start on several processes, None for one (see module doc)."""
  env = os.environ if env is None else env
  if env.get('GRPO_JAX_DISTRIBUTED') == '0':
    return None
  given = [k for k in EXPLICIT if env.get(k)]
  if given:
    if len(given) < len(EXPLICIT):
      missing = sorted(set(EXPLICIT) - set(given))
      raise ValueError(f'{", ".join(given)} set but not {", ".join(missing)}: set all three or none')
    return 'explicit' if int(env['GRPO_JAX_NUM_PROCESSES']) > 1 else None
  if env.get('GRPO_JAX_DISTRIBUTED') == '1':
    return 'auto'
  if all(k in env for k in SLURM_VARS) and int(env['SLURM_NTASKS']) > 1:
    return 'slurm'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  if _count(hosts) > 1 or int(env.get('MEGASCALE_NUM_SLICES') or 1) > 1:
    return 'tpu'
  return None


def initialize(env: Mapping[str, str] | None = None) -> str | None:
  """jax.distributed.initialize() when started on several processes; returns launch_kind (None: no-op).

  Must run before anything touches a jax backend (jax.devices(), an array, a jit): it fixes the global
  device list.
  """
  env = os.environ if env is None else env
  kind = launch_kind(env)
  if kind == 'explicit':
    local = env.get('GRPO_JAX_LOCAL_DEVICE_IDS')
    # 'deactivate': with SLURM in the environment jax would otherwise fill local_device_ids=[SLURM_LOCALID] and
    # hide all but one GPU of a one-process-per-node launch.
    jax.distributed.initialize(coordinator_address=env['GRPO_JAX_COORDINATOR'],
                               num_processes=int(env['GRPO_JAX_NUM_PROCESSES']),
                               process_id=int(env['GRPO_JAX_PROCESS_ID']),
                               local_device_ids=[int(i) for i in local.split(',')] if local else None,
                               cluster_detection_method='deactivate')
  elif kind is not None:
    jax.distributed.initialize()  # jax's cluster detection: SLURM, GCE / GKE TPU metadata
  return kind


def use_cpu_devices(count: int) -> int | None:
  """Split this host's CPU into `count` XLA devices (0: jax's default, one); returns the count applied, or None.

  Why: XLA:CPU runs each small op (a decode step's [32, 256] x [256, 688] matmul, every elementwise fusion) on one
  core, so with one CPU device the other cores idle through sampling. With `count` devices the mesh's batch axes
  spread each batch over them and `count` cores work at once (the speed-up: benchmarks/RESULTS.md). Must run
  before jax starts its CPU backend. An explicit
  XLA_FLAGS=--xla_force_host_platform_device_count=N wins (the tests' simulated meshes), and on a process whose
  backend is already up (a notebook, a test calling pipeline.run.run) the count stays as it is, with a warning.
  """
  if not isinstance(count, int) or isinstance(count, bool) or count < 0:
    raise ValueError(f"config.cpu_devices must be an int >= 0 (0 = jax's default: one CPU device), got {count!r}")
  if count == 0 or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return None
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # the backend already started
    started_with = len(jax.devices('cpu'))
    if started_with == count:
      return count
    logging.warning('config.cpu_devices=%d not applied: jax already started with %d CPU device(s)', count,
                    started_with)
    return None
  return count


def use_compile_cache(path: str) -> None:
  """Keep compiled XLA executables in `path` (off when empty): a rerun or a resumed run loads them instead of
  compiling again, which takes minutes for a 7B step on a pod and most of the start-up of a small CPU run."""
  if path:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)  # a CPU run's compiles are each < 1 s
    compilation_cache.reset_cache()  # the cache is set up at the first compile; this one may have happened already


def is_main_process() -> bool:
  """Process 0 alone logs, prints and writes non-checkpoint files (Orbax saves stay collective)."""
  return jax.process_index() == 0


def print0(*args, **kwargs) -> None:
  if is_main_process():
    print(*args, **kwargs)


def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process (collective: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _local_ranges(sharding: Sharding, shape: tuple[int, ...]) -> list[np.ndarray]:
  """Per dimension, the global indices this process's devices hold, in increasing order (blocks concatenated)."""
  out = []
  for dim, size in enumerate(shape):
    blocks = {index[dim].indices(size)[:2] for index in sharding.addressable_devices_indices_map(shape).values()}
    out.append(np.concatenate([np.arange(a, b) for a, b in sorted(blocks)]))
  return out


def host_local_batch(global_batch: np.ndarray, sharding: Sharding) -> jax.Array:
  """The global jax.Array of `global_batch` [N, ...] built from this process's rows only.

  Every process passes the same global numpy batch (the data order is a pure function of (seed, step), see
  data.batch_indices); each keeps the rows its devices hold and jax.make_array_from_process_local_data
  assembles the global array without any cross-host transfer or equality check (which device_put of a numpy
  array to a multi-host sharding would run). On one process this is device_put(global_batch, sharding).
  """
  if isinstance(global_batch, jax.Array) and not global_batch.is_fully_addressable:
    return global_batch  # already global (e.g. a device output fed back): nothing to assemble
  global_batch = np.asarray(global_batch)
  if jax.process_count() == 1:
    return jax.device_put(global_batch, sharding)
  local = global_batch[np.ix_(*_local_ranges(sharding, global_batch.shape))]
  return jax.make_array_from_process_local_data(sharding, local, global_batch.shape)


def to_host(tree: Any) -> Any:
  """Every jax.Array leaf as numpy on every process (an all-gather where a leaf spans other hosts)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x) if isinstance(x, jax.Array) else x
  return jax.tree.map(one, tree)


def host_io(fn: Callable, batch_sharding: Sharding, *, batch_argnums: Sequence[int], gather: bool = True) -> Callable:
  """Wrap a jitted fn for several hosts: numpy batch args (pytrees of [N, ...]) become global arrays via
  host_local_batch, and with `gather` the outputs come back as numpy on every process.

  jit refuses numpy args with a non-replicated sharding on several processes, and fetching an output that
  spans other hosts fails; the host-side code (rewards, decoding, minibatching) wants full numpy batches.
  On one process fn itself is returned: jit's in_shardings already place numpy batches.
  """
  if jax.process_count() == 1:
    return fn

  def wrapped(*args):
    args = [jax.tree.map(lambda x: host_local_batch(x, batch_sharding), a) if i in batch_argnums else a
            for i, a in enumerate(args)]
    out = fn(*args)
    return to_host(out) if gather else out

  return wrapped
