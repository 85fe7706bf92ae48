"""A run that did not train says so (loop.Health, run.py's summary and table, train.py's exit status).

Two learning rates on the tiny preset, RL straight from the initial model (no SFT stage, to keep them short):
  --config.rl.lr=1e6: one update overflows and is skipped, the rest leave a finite but dead policy (gradient norm
    exactly 0, the entropy of a uniform distribution on every step). The run ends (exit 0) naming the collapse when
    it happens, in the table and in summary.json.
  --config.rl.lr=1e38: every update is non-finite and skipped (fewer in a row than max_nonfinite_steps): the process
    ends non-zero with one line saying why, and writes no summary to be read as a result.
The healthy tiny run (the session's shared one) is flagged by neither.
"""
import json
import os
import subprocess

from conftest import ROOT, train_command

NO_SFT = ('--config.sft.max_steps=0', '--config.task.num_test=16')


def _train(workdir, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *NO_SFT, *overrides), cwd=ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=900)


def test_a_dead_policy_is_named_when_it_collapses(tmp_path):
  proc = _train(tmp_path, '--config.rl.lr=1e6', '--config.rl.num_steps=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  step = summary['rl_collapse_step']
  assert step is not None and 2 <= step <= 4, summary  # two dead steps in a row after the first update
  assert f'WARNING: grpo: collapsed at step {step}' in proc.stdout  # the line when it happens, mid-stage
  table = proc.stdout[proc.stdout.index('held-out acc'):]
  assert table.splitlines()[0].split()[-2:] == ['skipped', 'collapsed']
  row = next(line.split() for line in table.splitlines() if line.startswith('grpo '))
  assert row[-2:] == ['step', str(step)], table
  assert f'WARNING: grpo collapsed at step {step}' in table  # again under the table, beside the numbers
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  grads = [r['grad_norm'] for r in rows if r['stage'] == 'grpo']
  assert grads[step - 1] == grads[step - 2] == 0.0, grads  # what the detector saw: no gradient at all
  # The updates it skipped are counted, as steps and as a fraction of the stage's updates.
  assert summary['rl_nonfinite_steps'] == sum(r['nonfinite'] > 0 for r in rows if r['stage'] == 'grpo')
  assert summary['rl_skipped_update_frac'] == sum(r['nonfinite'] for r in rows if r['stage'] == 'grpo') / 4


def test_a_stage_that_skipped_most_updates_ends_the_run(tmp_path):
  proc = _train(tmp_path, '--config.rl.lr=1e38', '--config.rl.num_steps=2')
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('grpo_jax.train: grpo: 100% of its updates were skipped (2 of 2 steps had a non-finite '
                         'loss, gradient or update), so it did not train'), proc.stderr[-2000:]
  assert not (tmp_path / 'summary.json').exists()  # (a rerun stops the same way: test_loop, without a process)


def test_a_healthy_run_is_not_flagged(tiny_run):
  summary = json.loads((tiny_run.workdir / 'summary.json').read_text())
  for prefix in ('sft', 'rl'):
    assert summary[f'{prefix}_nonfinite_steps'] == 0 and summary[f'{prefix}_skipped_update_frac'] == 0.0
    assert summary[f'{prefix}_collapse_step'] is None
  assert 'collapsed at' not in tiny_run.stdout
  row = next(line.split() for line in tiny_run.stdout.splitlines() if line.startswith('grpo '))
  assert row[-2:] == ['0%', '-']
