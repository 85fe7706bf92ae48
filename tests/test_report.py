"""Tests for `python -m grpo_jax.report`: PNG plots from synthetic metrics.jsonl files, and clear errors."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from matplotlib import image
from matplotlib.figure import Figure

from grpo_jax import report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
GRPO_FILES = {f'grpo_{k}.png' for k in report.GRPO_METRICS} | {'grpo_overview.png'}
SFT_FILES = {f'sft_{k}.png' for k in report.SFT_METRICS}


def write_metrics(workdir, rows):
  """rows as metrics.MetricWriter writes them: one JSON object per line, each with 'stage' and 'step'."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def grpo_row(stage, step, skip=()):
  values = {'reward': 0.1 * step, 'accuracy': 0.05 * step, 'kl': 0.001 * step, 'entropy': 1.0 / step,
            'completion_len': 20.0 + step, 'clip_frac': 0.01, 'loss': -0.1, 'step_time': 1.0}
  return {'stage': stage, 'step': step, **{k: v for k, v in values.items() if k not in skip}}


def sft_rows(steps=20, eval_every=5):
  return [{'stage': 'sft', 'step': s, 'loss': 3.0 / s, 'nll': 3.0 / s,
           **({'val_accuracy': s / steps} if s % eval_every == 0 else {})} for s in range(1, steps + 1)]


def assert_pngs(directory, names):
  assert set(os.listdir(directory)) == set(names)
  for name in names:
    path = os.path.join(directory, name)
    with open(path, 'rb') as f:
      assert f.read(8) == PNG_MAGIC, name
    pixels = image.imread(path)  # decodes the whole file: a truncated or corrupt PNG fails here
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, name


def test_one_workdir_writes_every_plot_in_its_plots_dir(tmp_path, capsys):
  write_metrics(tmp_path, sft_rows() + [grpo_row('grpo', s) for s in range(1, 11)])
  assert report.main([str(tmp_path)]) == 0
  assert_pngs(tmp_path / 'plots', GRPO_FILES | SFT_FILES)
  assert f"{len(GRPO_FILES | SFT_FILES)} plots in {tmp_path / 'plots'}" in capsys.readouterr().out


def test_several_workdirs_overlaid_in_the_out_dir(tmp_path):
  single, iterative = tmp_path / 'runs' / 'single', tmp_path / 'runs' / 'iterative'
  write_metrics(single, sft_rows() + [grpo_row('grpo', s) for s in range(1, 11)])
  # Iterative RL without a clip_frac column: its stages grpo_1, grpo_2 each count steps from 1.
  write_metrics(iterative, sft_rows(12, 4) + [grpo_row(f'grpo_{k}', s, skip=('clip_frac',))
                                              for k in (1, 2) for s in range(1, 6)])
  out = tmp_path / 'compare'
  assert report.main([str(single), str(iterative), '--out', str(out)]) == 0
  assert_pngs(out, GRPO_FILES | SFT_FILES)
  assert not (single / 'plots').exists()
  assert report.labels([str(single), str(iterative)]) == ['single', 'iterative']


def test_iterations_are_laid_end_to_end(tmp_path):
  # Rows out of stage order in the file (as a resumed reward-model stage may leave them): ordered by iteration.
  rows = [grpo_row('grpo_2', s) for s in range(1, 4)] + [grpo_row('grpo_1', s) for s in range(1, 6)]
  write_metrics(tmp_path, [*rows, {'stage': 'reward_model_1', 'step': 1, 'loss': 0.5}])
  run = report.load_run(str(tmp_path), 'x')
  assert run.grpo_x == [1, 2, 3, 4, 5, 6, 7, 8] and run.boundaries == [5]
  assert [r['stage'] for r in run.grpo] == ['grpo_1'] * 5 + ['grpo_2'] * 3
  assert run.sft == []


def test_metrics_nobody_logged_are_left_out(tmp_path):
  write_metrics(tmp_path, [grpo_row('grpo', s, skip=('clip_frac', 'entropy')) for s in range(1, 4)])
  assert report.main([str(tmp_path)]) == 0
  assert_pngs(tmp_path / 'plots', GRPO_FILES - {'grpo_clip_frac.png', 'grpo_entropy.png'})


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'grpo_jax.report', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize('case', ['missing', 'no_metrics', 'no_stage_rows', 'damaged'])
def test_bad_workdir_is_a_one_line_error(case, tmp_path):
  workdir = tmp_path / 'run'
  if case != 'missing':
    workdir.mkdir()
  if case == 'no_stage_rows':
    write_metrics(workdir, [{'stage': 'reward_model', 'step': 1, 'loss': 0.5}])
  if case == 'damaged':
    (workdir / 'metrics.jsonl').write_text('{"stage": "sft", "step": 1}\n{"stage": \n{"stage": "sft", "step": 2}\n')
  good = tmp_path / 'good'
  write_metrics(good, sft_rows())
  proc = _cli(str(good), str(workdir))  # a bad one among good ones fails the whole command
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('report: ') and str(workdir) in lines[0], proc.stderr
  want = {'missing': 'no such directory', 'no_metrics': 'has no metrics.jsonl', 'no_stage_rows': 'no SFT or GRPO rows',
          'damaged': 'metrics.jsonl:2: damaged line'}[case]
  assert want in lines[0]
  assert not (good / 'plots').exists()  # nothing written before every workdir was read


def test_overlay_draws_each_run_with_its_own_steps_and_values(tmp_path):
  write_metrics(tmp_path / 'a', [grpo_row('grpo', s) for s in range(1, 11)])
  write_metrics(tmp_path / 'b', [grpo_row(f'grpo_{k}', s) for k in (1, 2) for s in range(1, 4)])
  runs = [report.load_run(str(tmp_path / w), w) for w in ('a', 'b')]
  ax = Figure().add_subplot()
  assert report._draw(ax, runs, 'grpo', 'kl')
  data = [line for line in ax.get_lines() if not line.get_label().startswith('_')]  # the boundaries are unlabelled
  assert [line.get_label() for line in data] == ['a', 'b']
  assert list(data[0].get_xdata()) == list(range(1, 11))
  assert list(data[0].get_ydata()) == pytest.approx([0.001 * s for s in range(1, 11)])
  assert list(data[1].get_xdata()) == list(range(1, 7))
  assert list(data[1].get_ydata()) == pytest.approx([0.001 * s for s in (1, 2, 3, 1, 2, 3)])
  boundaries = [line for line in ax.get_lines() if line.get_label().startswith('_')]
  assert [line.get_xdata()[0] for line in boundaries] == [3.5]  # b's second iteration starts after its step 3
  assert not report._draw(Figure().add_subplot(), runs, 'sft', 'nll')  # neither logged SFT
