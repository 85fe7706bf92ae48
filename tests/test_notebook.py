"""The notebooks: committed without outputs, and executed (nbclient, kernel 'python3') on tiny settings.

walkthrough.ipynb runs with GRPO_NOTEBOOK_TINY=1 (the tiny preset: an in-process run, then the paper table's four
training processes); inspect_run.ipynb then reads that run's workdir (GRPO_INSPECT_WORKDIR)."""
import base64
import os

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(ROOT, 'notebooks')
CELL_TIMEOUT_S = 600  # per cell; the whole walkthrough takes a few minutes on 2 cores


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


@pytest.mark.parametrize('name', ['walkthrough.ipynb', 'inspect_run.ipynb'])
def test_committed_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, f'{name}: a cell was committed with its outputs'


def _execute(nb):
  NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  return nb


def _outputs(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]


def _text(nb):
  parts = []
  for o in _outputs(nb):
    parts.append(o.get('text', ''))
    parts += [str(v) for k, v in o.get('data', {}).items() if k.startswith('text/')]
  return '\n'.join(parts)


def test_notebooks_run_on_tiny_settings(tmp_path, monkeypatch):
  monkeypatch.setenv('GRPO_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('GRPO_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = _execute(_read('walkthrough.ipynb'))
  pngs = [o['data']['image/png'] for o in _outputs(nb) if 'image/png' in o.get('data', {})]
  assert len(pngs) == 4  # reward, KL, accuracy, completion length
  assert all(base64.b64decode(p).startswith(b'\x89PNG') for p in pngs)
  text = _text(nb)
  assert 'tiny settings' in text and 'held-out accuracy' in text and 'McNemar p' in text
  for row in ('| SFT |', '| GRPO |', '| PPO |', '| SFT compute-matched |'):
    assert row in text
  assert (tmp_path / 'paper_table' / 'paper_table.jsonl').exists()

  monkeypatch.setenv('GRPO_INSPECT_WORKDIR', str(tmp_path / 'run'))
  nb = _execute(_read('inspect_run.ipynb'))
  assert any('image/png' in o.get('data', {}) for o in _outputs(nb))
