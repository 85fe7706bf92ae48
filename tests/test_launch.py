"""launch/*.sh with DRY_RUN=1: the commands they would run, the config and overrides passed through intact.

Printed commands are shell-quoted lines; shlex reads them back as bash would for these inputs. The parts that
run elsewhere (a TPU worker's ssh command, each srun task) are then executed here with bash and a stand-in
`python` that reports its argv, so an override with spaces, quotes and `$` is checked through every shell
level it crosses. `gcloud` / `srun` stand-ins record any call (a dry run makes none); `scontrol` answers like
SLURM's. A dry run must not source launch/_env.sh: VENV points at a path that must stay absent.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ['--config.rl.group_size=16', '--config.mesh.fsdp=-1',
             '--config.task.prompt_template=Q: {question} "show work" it\'s $HOME *',
             '--config.task.source_dir=/data/with space']


@pytest.fixture
def shims(tmp_path):
  """A bin directory of stand-ins, and the log they append their argv to."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'calls.log'
  bin_dir.mkdir()

  def shim(name: str, body: str):
    path = bin_dir / name
    path.write_text(f'#!{sys.executable}\nimport json, os, sys\n{body}\n')
    path.chmod(0o755)

  record = f'open({str(log)!r}, "a").write(json.dumps(sys.argv) + "\\n")'
  shim('gcloud', f'{record}\nsys.exit(1)')
  shim('srun', f'{record}\nsys.exit(1)')
  shim('scontrol', f'{record}\nassert sys.argv[1:3] == ["show", "hostnames"]\nprint("gpu-a07\\ngpu-a08")')
  shim('python', 'print("ARGV " + json.dumps({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()'
                 ' if k.startswith(("GRPO_JAX_", "JAX_EXTRA", "XLA_FLAGS"))}}))')
  return bin_dir, log


def base_env(tmp_path, bin_dir, **extra) -> dict[str, str]:
  keep = {k: v for k, v in os.environ.items() if k in ('HOME', 'LANG', 'TMPDIR')}
  return dict(keep, PATH=f'{bin_dir}:/usr/bin:/bin', DRY_RUN='1', VENV=str(tmp_path / 'venv_must_not_exist'),
              PYTHON='false', **extra)


def run_launch(script: str, env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
  p = subprocess.run(['bash', str(REPO / 'launch' / script), *args], env=env, capture_output=True, text=True,
                     timeout=30, cwd='/')
  if ok:
    assert p.returncode == 0, p.stderr
    assert not Path(env['VENV']).exists(), 'a dry run sourced launch/_env.sh'
  return p


def dry_runs(stdout: str) -> list[list[str]]:
  """The printed commands, as argv lists."""
  return [shlex.split(ln[len('[dry-run] '):]) for ln in stdout.splitlines()
          if ln.startswith('[dry-run] ') and not ln.startswith('[dry-run] #')]


def reported_argv(stdout: str) -> list[dict]:
  return [json.loads(ln[5:]) for ln in stdout.splitlines() if ln.startswith('ARGV ')]


def train_argv(config: str, workdir: str) -> list[str]:
  return ['-m', 'grpo_jax.train', f'--config={config}', f'--workdir={workdir}', *OVERRIDES]


def test_local_prints_settings_and_the_train_command(tmp_path, shims):
  bin_dir, log = shims
  env = base_env(tmp_path, bin_dir, CONFIG='configs/default.py:tiny', WORKDIR='/tmp/w')
  out = run_launch('local.sh', env, *OVERRIDES).stdout
  assert out.startswith('[launch] config=configs/default.py:tiny workdir=/tmp/w jax=cpu')
  commands = dry_runs(out)
  assert commands[-1] == ['python', *train_argv('configs/default.py:tiny', '/tmp/w')]
  # Without settings: the defaults, and no empty argument after --workdir.
  assert dry_runs(run_launch('local.sh', base_env(tmp_path, bin_dir)).stdout)[-1] == [
      'python', '-m', 'grpo_jax.train', '--config=configs/default.py', '--workdir=runs/default']
  assert not log.exists()


def test_tpu_pod_copies_then_runs_the_same_command_on_every_worker(tmp_path, shims):
  bin_dir, log = shims
  env = base_env(tmp_path, bin_dir, TPU_NAME='dsm-v5p-64', ZONE='us-east5-a', PROJECT='my-proj',
                 CONFIG='configs/deepseekmath_7b.py', WORKDIR='/mnt/shared/runs/dsm7b',
                 WORKER_SETUP='echo setup-ran', LIBTPU_INIT_ARGS='--xla_tpu_example=true')
  out = run_launch('tpu_pod.sh', env, *OVERRIDES).stdout
  assert '[launch] tpu=dsm-v5p-64 zone=us-east5-a project=my-proj config=configs/deepseekmath_7b.py' in out
  scp, ssh = [c for c in dry_runs(out) if c[0] == 'gcloud']
  archive = scp[-4].split(':', 1)[1]
  assert scp[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', scp[5]] and scp[-4] == f'dsm-v5p-64:{archive}'
  assert scp[5].endswith(archive) and scp[-3:] == ['--zone=us-east5-a', '--worker=all', '--project=my-proj']
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'dsm-v5p-64']
  assert ssh[6:9] == ['--zone=us-east5-a', '--worker=all', '--project=my-proj']
  (command,) = [a[len('--command='):] for a in ssh if a.startswith('--command=')]
  words = shlex.split(command)
  assert ['JAX_EXTRA=tpu', 'GRPO_JAX_DISTRIBUTED=1'] == words[words.index('env') + 1:words.index('env') + 3]
  assert not log.exists()  # nothing was copied or run

  # Be a worker: its home holds the copied archive; its login shell runs the command (still a dry run, so
  # launch/local.sh prints the trainer command instead of installing and training).
  home = tmp_path / 'worker_home'
  home.mkdir()
  with tarfile.open(home / archive, 'w:gz') as tar:
    for name in ('local.sh', '_lib.sh', '_env.sh'):
      tar.add(REPO / 'launch' / name, arcname=f'launch/{name}')
  worker = subprocess.run(['bash', '-c', command], env=dict(env, HOME=str(home)), cwd=str(home),
                          capture_output=True, text=True, timeout=30)
  assert worker.returncode == 0, worker.stderr
  assert not Path(env['VENV']).exists()
  assert 'setup-ran' in worker.stdout and 'jax=tpu' in worker.stdout
  assert dry_runs(worker.stdout)[-1] == ['python', *train_argv('configs/deepseekmath_7b.py', '/mnt/shared/runs/dsm7b')]


def test_tpu_pod_packs_the_checkout_without_venv_or_runs(tmp_path, shims):
  """Not a dry run: the archive is really built; gcloud is a stand-in that succeeds."""
  bin_dir, log = shims
  (bin_dir / 'gcloud').write_text(f'#!{sys.executable}\nimport json, sys\n'
                                  f'open({str(log)!r}, "a").write(json.dumps(sys.argv) + "\\n")\n')
  tarball = tmp_path / 'repo.tgz'
  env = dict(base_env(tmp_path, bin_dir, TPU_NAME='pod', ZONE='z', WORKDIR='/shared/w', TARBALL=str(tarball)),
             DRY_RUN='0')
  run_launch('tpu_pod.sh', env, '--config.seed=3')
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {'launch/local.sh', 'launch/_env.sh', 'launch/_lib.sh', 'grpo_jax/train.py', 'setup.py'} <= names
  assert not any(n.startswith(('.venv/', 'runs/', '.git/')) or '__pycache__' in n for n in names)
  calls = [json.loads(ln) for ln in log.read_text().splitlines()]
  assert [c[1:5] for c in calls] == [['compute', 'tpus', 'tpu-vm', 'scp'], ['compute', 'tpus', 'tpu-vm', 'ssh']]
  assert calls[0][5] == str(tarball) and calls[0][6] == 'pod:repo.tgz'


@pytest.mark.parametrize('workdir, match', [('gs://bucket/run', 'gcsfuse'), ('runs/x', 'absolute'),
                                            (None, 'WORKDIR')])
def test_tpu_pod_refuses_a_workdir_the_workers_cannot_share(tmp_path, shims, workdir, match):
  bin_dir, log = shims
  env = base_env(tmp_path, bin_dir, TPU_NAME='pod', ZONE='z', **({'WORKDIR': workdir} if workdir else {}))
  p = run_launch('tpu_pod.sh', env, ok=False)
  assert p.returncode != 0 and match in p.stderr and not log.exists()


def test_slurm_one_process_per_node_with_the_first_host_as_coordinator(tmp_path, shims):
  bin_dir, log = shims
  env = base_env(tmp_path, bin_dir, SLURM_JOB_ID='4242', SLURM_JOB_NUM_NODES='2',
                 SLURM_JOB_NODELIST='gpu-a[07-08]', CONFIG='configs/deepseekmath_7b.py', WORKDIR='/shared/runs/x')
  out = run_launch('slurm.sh', env, *OVERRIDES).stdout
  port = 61440 + 4242 % 4096  # jax's rule for SLURM jobs
  assert f'[launch] nodes=2 (one process per node) coordinator=gpu-a07:{port}' in out
  assert json.loads(log.read_text().splitlines()[0])[1:] == ['show', 'hostnames', 'gpu-a[07-08]']
  commands = dry_runs(out)
  export = next(c for c in commands if c[0] == 'export')
  assert f'GRPO_JAX_COORDINATOR=gpu-a07:{port}' in export and 'GRPO_JAX_NUM_PROCESSES=2' in export
  srun = commands[-1]
  assert srun[:4] == ['srun', '--nodes=2', '--ntasks-per-node=1', '--kill-on-bad-exit=1']
  assert 'JAX_EXTRA=cuda12' in commands[0]
  assert not any(json.loads(ln)[0].endswith('srun') for ln in log.read_text().splitlines())

  # Be SLURM: run the task command once per process, as srun would on each node.
  task = srun[4:]
  for procid in range(2):
    task_env = dict(env, SLURM_PROCID=str(procid), GRPO_JAX_COORDINATOR=f'gpu-a07:{port}',
                    GRPO_JAX_NUM_PROCESSES='2')
    p = subprocess.run(task, env=task_env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    (got,) = reported_argv(p.stdout)
    assert got['argv'] == train_argv('configs/deepseekmath_7b.py', '/shared/runs/x')
    assert got['env']['GRPO_JAX_PROCESS_ID'] == str(procid)


def test_slurm_outside_an_allocation_fails(tmp_path, shims):
  bin_dir, log = shims
  p = run_launch('slurm.sh', base_env(tmp_path, bin_dir), ok=False)
  assert p.returncode != 0 and 'sbatch' in p.stderr and not log.exists()


def test_scripts_are_strict_bash():
  for script in ('local.sh', 'tpu_pod.sh', 'slurm.sh'):
    text = (REPO / 'launch' / script).read_text()
    assert 'set -euo pipefail' in text, script
    assert subprocess.run(['bash', '-n', str(REPO / 'launch' / script)]).returncode == 0, script

