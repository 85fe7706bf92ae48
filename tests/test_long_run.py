"""A long GRPO run keeps its memory and its compiles (benchmarks/long_run.py; numbers in benchmarks/RESULTS.md)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_rss_and_compiles_stay_flat_over_a_long_run(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'long_run.py'), '--grpo-steps', '400',
                         '--workdir', str(tmp_path / 'w')], env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['grpo_steps'] == 400
  assert result['peak_growth_after_step_100'] < 0.05, result
  assert result['compiles_at_step_10'] == result['compiles_at_end'], result  # no recompiles after the first steps
