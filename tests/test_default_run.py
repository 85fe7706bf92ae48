"""The full embedded default (about 5 minutes on 2 CPU cores). Marked slow: CI skips it.

  bash launch/test.sh -m slow -k default
"""
import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_default_job_grpo_beats_sft_by_ten_points(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={ROOT}/configs/default.py',
                         f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['grpo_accuracy'] - summary['sft_accuracy'] >= 0.10, summary
  assert summary['sft_wall_time'] + summary['grpo_wall_time'] < 15 * 60, summary
