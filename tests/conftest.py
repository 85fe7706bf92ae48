import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(preset: str | None = None):
  spec = importlib.util.spec_from_file_location('default_config', os.path.join(ROOT, 'configs', 'default.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def train_command(workdir, *overrides: str) -> list[str]:
  return [sys.executable, '-m', 'grpo_jax.train', f'--config={ROOT}/configs/default.py:tiny',
          f'--workdir={workdir}', *overrides]


@pytest.fixture
def tiny_config():
  return load_config('tiny')


# The session's shared finished run: the tiny preset with 12 GRPO steps, long enough that test_train's kill lands
# mid-GRPO (the preset has 4), and a checkpoint every 3 steps to resume from. Tests that only read a finished run's
# outputs share it; a test that writes to a workdir, resumes one or needs another config starts its own run.
TINY_RUN_OVERRIDES = ('--config.rl.num_steps=12', '--config.checkpoint_every=3')
# Outputs the readers may not change (checked when the session ends).
TINY_RUN_OUTPUTS = ('summary.json', 'metrics.jsonl', 'config.json', 'config_history.jsonl')


class TinyRun(NamedTuple):
  workdir: Path
  stdout: str


def _digests(workdir: Path) -> dict[str, str]:
  return {name: hashlib.sha256((workdir / name).read_bytes()).hexdigest() for name in TINY_RUN_OUTPUTS}


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """`python -m grpo_jax.train --config configs/default.py:tiny` with TINY_RUN_OVERRIDES, run once per session:
  (workdir, stdout). Read it, never write to it: its outputs must be unchanged when the session ends."""
  workdir = tmp_path_factory.mktemp('tiny_run')
  proc = subprocess.run(train_command(workdir, *TINY_RUN_OVERRIDES), cwd=ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = _digests(workdir)
  yield TinyRun(workdir, proc.stdout)
  assert _digests(workdir) == before, 'a test changed the shared tiny run: give it a run (or a copy) of its own'


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long runs (the full default job, benchmarks); CI skips them')


BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


def count_compiles(fn):
  """fn() -> (its result, the number of XLA compilations it triggered)."""
  compiles = []
  listener = lambda name, *args, **kwargs: compiles.append(name) if name == BACKEND_COMPILE else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return out, len(compiles)


def grpo_steps(cfg, num_steps: int = 3):
  """Run the first `num_steps` GRPO steps of `cfg` in process, from its initial params; returns (XLA compilations
  per step, metrics per step as floats, the final stage state)."""
  from grpo_jax.pipeline import grpo
  from grpo_jax.pipeline.setup import build_setup
  setup = build_setup(cfg)
  stage = grpo.make_stage(setup, setup.init_params)
  state, compiles, rows = stage.state, [], []
  for i in range(num_steps):
    (state, metrics), n = count_compiles(lambda: stage.step(state, i))  # noqa: B023
    compiles.append(n)
    rows.append({k: float(v) for k, v in metrics.items()})
  return compiles, rows, state
