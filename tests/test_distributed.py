"""Multi-host: launch detection, process-0-only sinks, and global batches built from each host's rows.

The multi-process checks start real jax processes on this machine (CPU devices, jax.distributed over localhost
with gloo collectives): 2 processes x 4 simulated devices = 8 global devices, started through
grpo_jax.parallel.distributed.initialize() and the GRPO_JAX_* variables launch/slurm.sh exports. XLA_FLAGS must be set
before jax initializes, hence subprocesses.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from grpo_jax.parallel import distributed
from grpo_jax.pipeline.metrics import MetricWriter, read_metrics

REPO = Path(__file__).resolve().parents[1]

SLURM = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='gpu[1-2]', SLURM_NTASKS='16', SLURM_PROCID='3', SLURM_LOCALID='3')
EXPLICIT = dict(GRPO_JAX_COORDINATOR='10.0.0.1:1234', GRPO_JAX_NUM_PROCESSES='2', GRPO_JAX_PROCESS_ID='1')


@pytest.mark.parametrize('env, kind', [
    ({}, None),
    (dict(EXPLICIT), 'explicit'),
    (dict(EXPLICIT, GRPO_JAX_NUM_PROCESSES='1'), None),  # one process: nothing to initialize
    (dict(EXPLICIT, **SLURM), 'explicit'),  # explicit wins over jax's SLURM detection (one process per node)
    (dict(EXPLICIT, GRPO_JAX_DISTRIBUTED='0'), None),  # forced off
    (dict(GRPO_JAX_DISTRIBUTED='1'), 'auto'),  # launch/tpu_pod.sh: jax reads the TPU metadata server
    (SLURM, 'slurm'),
    (dict(SLURM, SLURM_NTASKS='1'), None),
    ({k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}, None),  # sbatch shell, not an srun step
    (dict(TPU_WORKER_HOSTNAMES='t1,t2,t3,t4'), 'tpu'),
    (dict(TPU_WORKER_HOSTNAMES='t1'), None),
    (dict(TPU_PROCESS_ADDRESSES='a:1,b:1'), 'tpu'),
    (dict(MEGASCALE_NUM_SLICES='2'), 'tpu'),
    (dict(CLOUD_TPU_TASK_ID='0'), None),  # set on single-host VMs too
])
def test_launch_kind(env, kind):
  assert distributed.launch_kind(env) == kind


def test_partial_explicit_env_is_an_error():
  with pytest.raises(ValueError, match='GRPO_JAX_PROCESS_ID'):
    distributed.launch_kind(dict(GRPO_JAX_COORDINATOR='h:1', GRPO_JAX_NUM_PROCESSES='2'))


def test_initialize_passes_what_the_environment_says(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert distributed.initialize({}) is None and calls == []  # one host: no call at all
  assert distributed.initialize(dict(EXPLICIT, **SLURM, GRPO_JAX_LOCAL_DEVICE_IDS='0,1')) == 'explicit'
  assert calls.pop() == dict(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1,
                             local_device_ids=[0, 1], cluster_detection_method='deactivate')
  assert distributed.initialize(SLURM) == 'slurm'
  assert calls.pop() == {}  # jax's own cluster detection


def test_single_process_helpers():
  x = np.arange(12, dtype=np.float32).reshape(6, 2)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  np.testing.assert_array_equal(np.asarray(distributed.host_local_batch(x, sharding)), x)
  fn = jax.jit(lambda a: a + 1)
  assert distributed.host_io(fn, sharding, batch_argnums=(0,)) is fn  # one host: jit places numpy itself
  assert distributed.is_main_process() and distributed.any_process(True) and not distributed.any_process(False)


CPU_DEVICES_PROBE = """
import json, sys
from grpo_jax.parallel import distributed
applied = distributed.use_cpu_devices(int(sys.argv[1]))
import jax
count = jax.device_count()  # starts the backend
late = distributed.use_cpu_devices(int(sys.argv[2]))
print(json.dumps([applied, count, late, jax.device_count()]))
"""


@pytest.mark.parametrize('xla_flags, first, later, expected', [
    ('', 2, 3, [2, 2, None, 2]),  # applied; a later, different count cannot change a started backend
    ('', 3, 3, [3, 3, 3, 3]),  # asking again for the count in force is fine
    ('', 0, 0, [None, 1, None, 1]),  # 0: jax's default, one CPU device
    ('--xla_force_host_platform_device_count=3', 2, 2, [None, 3, None, 3]),  # an explicit XLA flag wins
])
def test_use_cpu_devices_splits_the_host_before_the_backend_starts(xla_flags, first, later, expected):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  proc = subprocess.run([sys.executable, '-c', CPU_DEVICES_PROBE, str(first), str(later)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
  warned = 'config.cpu_devices=3 not applied' in proc.stderr
  assert warned == ((first, later) == (2, 3))


@pytest.mark.parametrize('bad', [-1, 1.5, True, '2'])
def test_use_cpu_devices_rejects_bad_counts(bad):
  with pytest.raises(ValueError, match=r'config\.cpu_devices must be an int >= 0'):
    distributed.use_cpu_devices(bad)


def test_inactive_metric_writer_writes_nothing(tmp_path):
  main, other = tmp_path / 'main', tmp_path / 'other'
  main.mkdir(), other.mkdir()
  for workdir, active in ((main, True), (other, False)):
    writer = MetricWriter(str(workdir), active=active)
    writer.rewind('sft', 0)
    writer.write('sft', 1, {'loss': 1.5})
    writer.close()
  assert read_metrics(str(main)) == [{'stage': 'sft', 'step': 1, 'loss': 1.5}]
  assert list(other.iterdir()) == []  # no metrics.jsonl, no tensorboard directory


# ------------------------------------------------------------------------------- several simulated processes

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from grpo_jax.parallel import distributed
    kind = distributed.initialize()  # from the GRPO_JAX_* environment, before any other jax call
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from grpo_jax.parallel import sharding

    out = dict(kind=kind, process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
               local_devices=jax.local_device_count(), main=distributed.is_main_process())
    devices = np.asarray(jax.devices())
    interleaved = devices.reshape(2, 4).T.reshape(-1)  # each mesh row mixes both processes' devices
    meshes = {
        'data2_fsdp4': (dict(data=2, fsdp=4, tensor=1), devices),
        'data8': (dict(data=8, fsdp=1, tensor=1), devices),
        'tensor_across_hosts': (dict(data=2, fsdp=1, tensor=4), interleaved),  # rows replicated over hosts too
        'interleaved': (dict(data=-1, fsdp=1, tensor=1), interleaved),  # this host's rows are not contiguous
        'replicated_batch': (dict(data=1, fsdp=1, tensor=8), devices),  # every host holds every row
    }
    rng = np.random.default_rng(0)  # the same global batch on every process, as the trainer's data order is
    x = rng.standard_normal((16, 3)).astype(np.float32)
    tokens = rng.integers(0, 50, (16, 5)).astype(np.int32)
    w = rng.standard_normal((3,)).astype(np.float32)
    for name, (shape, devs) in meshes.items():
        mesh = sharding.make_mesh(shape, devs)
        batch = sharding.batch_sharding(mesh)
        g = distributed.host_local_batch(x, batch)
        ref = jax.device_put(x, batch)  # works across processes too, after checking x is equal on all of them
        shards_ok = all(np.array_equal(np.asarray(s.data), x[s.index]) for s in g.addressable_shards)
        same_as_device_put = all(np.array_equal(np.asarray(a.data), np.asarray(b.data)) and a.index == b.index
                                 for a, b in zip(g.addressable_shards, ref.addressable_shards))
        rows = []  # the global rows this process holds, adjacent device blocks merged
        for a, b in sorted({s.index[0].indices(16)[:2] for s in g.addressable_shards}):
            rows[-1:] = [[rows[-1][0], b]] if rows and rows[-1][1] == a else rows[-1:] + [[a, b]]

        # A jitted step with a batch-sharded input, a replicated scalar and a batch-sharded output, as the
        # sampler and train step have; host_io feeds numpy in and brings numpy back.
        step = jax.jit(lambda w, x, t: (jnp.mean((x @ w) ** 2), x @ w + t.sum(-1)),
                       in_shardings=(sharding.replicated(mesh), batch, batch))
        loss, per_row = distributed.host_io(step, batch, batch_argnums=(1, 2))(w, x, tokens)
        out[name] = dict(
            shape=list(g.shape), fully_addressable=g.is_fully_addressable, rows=rows, shards_ok=shards_ok,
            same_as_device_put=same_as_device_put,
            gathered_ok=bool(np.array_equal(distributed.to_host(g), x)),
            loss_err=abs(float(loss) - float(np.mean((x @ w) ** 2))),
            per_row_is_numpy=type(per_row).__name__ == 'ndarray',
            per_row_err=float(np.abs(per_row - (x @ w + tokens.sum(-1))).max()))
    out['any_signal'] = distributed.any_process(jax.process_index() == 1)  # a signal on process 1 only
    out['no_signal'] = distributed.any_process(False)
    print('RESULT ' + json.dumps(out), flush=True)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_processes(args: list[str], num_processes: int, devices_per_process: int, *, timeout: int = 120,
                  cwd: Path = REPO) -> list[subprocess.CompletedProcess]:
  """Start num_processes copies of `python args` as one jax job on localhost (GRPO_JAX_* as slurm.sh sets)."""
  flags = f'--xla_force_host_platform_device_count={devices_per_process}'
  base = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags,
              PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
              GRPO_JAX_COORDINATOR=f'localhost:{_free_port()}', GRPO_JAX_NUM_PROCESSES=str(num_processes))
  procs = [subprocess.Popen([sys.executable, *args], env=dict(base, GRPO_JAX_PROCESS_ID=str(i)), cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  done = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  finally:
    for p in procs:  # a failed peer leaves the others waiting in a collective
      if p.poll() is None:
        p.kill()
  return done


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  script = tmp_path_factory.mktemp('distributed') / 'worker.py'
  script.write_text(WORKER)
  results = []
  for p in run_processes([str(script)], num_processes=2, devices_per_process=4):
    assert p.returncode == 0, p.stderr[-4000:]
    results.append(json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith('RESULT '))[7:]))
  return results


def test_processes_join_one_job(two_processes):
  for i, r in enumerate(two_processes):
    assert (r['kind'], r['process'], r['processes'], r['devices'], r['local_devices']) == ('explicit', i, 2, 8, 4)
    assert r['main'] == (i == 0)
    assert r['any_signal'] is True and r['no_signal'] is False  # both stop when one was signalled


@pytest.mark.parametrize('mesh, rows', [
    ('data2_fsdp4', [[[0, 8]], [[8, 16]]]),  # devices 0-3 on process 0 hold rows 0-7 (2 each)
    ('data8', [[[0, 8]], [[8, 16]]]),
    ('tensor_across_hosts', [[[0, 16]], [[0, 16]]]),  # each data row of the mesh spans both processes
    ('interleaved', [[[0, 2], [4, 6], [8, 10], [12, 14]], [[2, 4], [6, 8], [10, 12], [14, 16]]]),
    ('replicated_batch', [[[0, 16]], [[0, 16]]]),
])
def test_global_batch_from_host_rows_equals_device_put(two_processes, mesh, rows):
  for r, want_rows in zip(two_processes, rows, strict=True):
    got = r[mesh]
    assert got['shape'] == [16, 3] and not got['fully_addressable']  # one global array over both processes
    assert got['rows'] == want_rows
    assert got['shards_ok'] and got['same_as_device_put'] and got['gathered_ok']
    assert got['loss_err'] < 1e-5 and got['per_row_err'] < 1e-5 and got['per_row_is_numpy']


@pytest.mark.slow
@pytest.mark.parametrize('extra', [(), ('--config.rl.num_iterations=2', '--config.rl.reward_source=mix',
                                        '--config.reward_model.num_steps=2')], ids=['grpo', 'iterative'])
def test_two_process_training_matches_one_process(tmp_path, extra):
  """The tiny job on 2 processes x 2 devices gives the metrics of 1 process x 4 devices (same mesh); only
  process 0 writes metrics, summary and prints. Also with outer iterations and a reward model retrained between
  them (its comparisons are sampled and labelled on every host alike)."""
  cmd = ['-m', 'grpo_jax.train', f'--config={REPO}/configs/default.py:tiny', '--config.rl.num_steps=2', *extra]
  multi = run_processes([*cmd, f'--workdir={tmp_path / "multi"}'], num_processes=2, devices_per_process=2,
                        timeout=300)
  for p in multi:
    assert p.returncode == 0, p.stderr[-4000:]
  printed = [[ln for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith('[Gloo]')] for p in multi]
  assert any('=== grpo' in ln for ln in printed[0]) and printed[1] == []  # gloo's own connection lines aside
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  one = subprocess.run([sys.executable, *cmd, f'--workdir={tmp_path / "one"}'], env=env, cwd=str(REPO),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-4000:]
  rows_multi, rows_one = read_metrics(str(tmp_path / 'multi')), read_metrics(str(tmp_path / 'one'))
  assert [(r['stage'], r['step']) for r in rows_multi] == [(r['stage'], r['step']) for r in rows_one]
  for a, b in zip(rows_multi, rows_one, strict=True):
    for key in ('nll', 'reward', 'completion_len', 'entropy', 'rm_score'):  # sums differ only in float order
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5), (a['stage'], a['step'], key)
  summary = json.loads((tmp_path / 'multi' / 'summary.json').read_text())
  assert summary['rl_sample'] == json.loads((tmp_path / 'one' / 'summary.json').read_text())['rl_sample']


@pytest.mark.slow
def test_two_process_eval_matches_one_process(tmp_path):
  """grpo_jax.eval of a tiny run's workdir on 2 processes x 2 devices gives the results of 1 process x 4
  devices; only process 0 prints and writes the JSON."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  workdir = tmp_path / 'run'
  # 150 SFT steps: enough that greedy completions differ between problems, so a row mix-up would show.
  trained = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={REPO}/configs/default.py:tiny',
                            '--config.sft.max_steps=150', '--config.sft.eval_every=50', '--config.rl.num_steps=1',
                            f'--workdir={workdir}'], env=env, cwd=str(REPO),
                           capture_output=True, text=True, timeout=300)
  assert trained.returncode == 0, trained.stderr[-4000:]
  cmd = ['-m', 'grpo_jax.eval', f'--workdir={workdir}', '--datasets=gsm8k,cmath', '--limit=6', '--batch_size=4',
         '--max_new_tokens=6', '--max_prompt_len=1024', '--prompt_template=qa', '--save_completions']
  multi = run_processes([*cmd, f'--output={tmp_path / "multi.json"}'], num_processes=2, devices_per_process=2,
                        timeout=300)
  for p in multi:
    assert p.returncode == 0, p.stderr[-4000:]
  printed = [[ln for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith('[Gloo]')] for p in multi]
  assert any('GSM8K' in ln for ln in printed[0]) and printed[1] == []
  one = subprocess.run([sys.executable, *cmd, f'--output={tmp_path / "one.json"}'], env=env, cwd=str(REPO),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-4000:]
  results = [json.loads((tmp_path / f'{name}.json').read_text())['results'] for name in ('multi', 'one')]
  for name in ('gsm8k', 'cmath'):
    for r in results:
      r[name].pop('wall_time')
    assert results[0][name] == results[1][name], name
    completions = results[0][name]['greedy']['completions']  # each problem's, in order, from all devices
    assert len(completions) == results[0][name]['n'] == 6 and len(set(completions)) > 1, completions
