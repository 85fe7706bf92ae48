import importlib.util
import os
import sys

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
