import importlib.util
import os
import sys

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
