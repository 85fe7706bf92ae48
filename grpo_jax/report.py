r"""Plots of training workdirs' metrics, as PNG files.

  python -m grpo_jax.report /tmp/grpo_tiny                       # -> /tmp/grpo_tiny/plots/*.png
  python -m grpo_jax.report /tmp/g4 /tmp/g16 --out /tmp/g_plots   # several runs overlaid, one colour each

Reads <workdir>/metrics.jsonl (grpo_jax/pipeline/metrics.py) and writes, against step:
  grpo_<metric>.png for reward, accuracy, kl, entropy, completion_len, clip_frac of the RL stage(s) (GRPO's, or PPO's
  with rl.algorithm='ppo': the stage table's RL stages, pipeline/stages.py), and grpo_overview.png with all of them;
  the outer iterations of iterative RL ('grpo_1', 'grpo_2', ...) are laid end to end, their boundaries dotted;
  sft_nll.png and sft_val_accuracy.png of the SFT stage.
A metric no run logged is left out. With several workdirs the plots go to the first one's plots/ unless --out says
otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure  # no pyplot: a Figure saves through the Agg canvas, no display or global state

from grpo_jax.pipeline import stages
from grpo_jax.pipeline.metrics import read_metrics

GRPO_METRICS = ('reward', 'accuracy', 'kl', 'entropy', 'completion_len', 'clip_frac')
SFT_METRICS = ('nll', 'val_accuracy')
LABELS = {'reward': 'mean reward', 'accuracy': 'train accuracy (sampled)', 'kl': 'KL to the reference',
          'entropy': 'token entropy', 'completion_len': 'completion length (tokens)', 'clip_frac': 'clip fraction',
          'nll': 'SFT loss (token NLL)', 'val_accuracy': 'validation accuracy (greedy)'}


class ReportError(Exception):
  """A workdir that cannot be plotted; the message says which and why."""


@dataclass
class Run:
  label: str
  sft: list[dict[str, Any]]  # the SFT stage's rows, in order
  grpo: list[dict[str, Any]]  # the RL stages' rows (GRPO's or PPO's), iteration after iteration
  grpo_x: list[int]  # each RL row's step counted from the first RL stage's start
  boundaries: list[int]  # where each RL stage after the first starts, on grpo_x


def load_run(workdir: str, label: str) -> Run:
  """The SFT and RL rows of <workdir>/metrics.jsonl; ReportError when there is nothing to plot."""
  if not os.path.isdir(workdir):
    raise ReportError(f'{workdir}: no such directory')
  if not os.path.isfile(os.path.join(workdir, 'metrics.jsonl')):
    raise ReportError(f'{workdir} has no metrics.jsonl: not a training workdir, or nothing logged yet')
  try:
    rows = read_metrics(workdir)
  except ValueError as e:
    raise ReportError(str(e)) from None
  sft = [r for r in rows if r.get('stage') == stages.SFT.name]
  grpo_stages: dict[int, list[dict[str, Any]]] = {}
  for r in rows:
    parsed = stages.parse_folder(str(r.get('stage')))
    if parsed is not None and parsed[0].rl:  # outer iteration k, or 1 for a plain 'grpo' / 'ppo'
      grpo_stages.setdefault(parsed[1] or 1, []).append(r)
  if not sft and not grpo_stages:
    raise ReportError(f'{workdir}/metrics.jsonl has no SFT or GRPO rows to plot')
  grpo, grpo_x, boundaries, offset = [], [], [], 0
  for k in sorted(grpo_stages):  # each outer iteration's steps start again at 1
    if grpo:
      boundaries.append(offset)
    stage_rows = grpo_stages[k]
    grpo += stage_rows
    grpo_x += [offset + int(r['step']) for r in stage_rows]
    offset += max(int(r['step']) for r in stage_rows)
  return Run(label, sft, grpo, grpo_x, boundaries)


def labels(workdirs: Sequence[str]) -> list[str]:
  """Short names telling the workdirs apart: their paths below the common parent (the basename for one)."""
  paths = [os.path.abspath(w) for w in workdirs]
  if len(paths) == 1:
    return [os.path.basename(paths[0]) or paths[0]]
  common = os.path.commonpath(paths)
  return [os.path.relpath(p, common) if p != common else os.path.basename(p) for p in paths]


def _series(rows: list[dict[str, Any]], xs: list[int], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that logged `key` as a finite number (val_accuracy only on eval steps)."""
  pairs = [(x, float(r[key])) for x, r in zip(xs, rows, strict=True)
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw(ax, runs: list[Run], stage: str, key: str) -> bool:
  """One metric of every run on `ax`, one colour per run; False when no run logged it."""
  drawn = False
  for i, run in enumerate(runs):
    colour = f'C{i % 10}'
    if stage == 'grpo':
      xs, ys = _series(run.grpo, run.grpo_x, key)
    else:
      xs, ys = _series(run.sft, [int(r['step']) for r in run.sft], key)
    if not xs:
      continue
    sparse = len(xs) < 30  # e.g. val_accuracy every eval_every steps: markers show where the points are
    ax.plot(xs, ys, color=colour, label=run.label, linewidth=1.2, marker='o' if sparse else None, markersize=3)
    if stage == 'grpo':
      for b in run.boundaries:
        ax.axvline(b + 0.5, color=colour, linestyle=':', linewidth=0.8)
    drawn = True
  if drawn:
    ax.set_xlabel(f"{stage.upper()} step{' (iterations end to end)' if stage == 'grpo' else ''}")
    ax.set_ylabel(LABELS.get(key, key))
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize='small')
  return drawn


def write_plots(runs: list[Run], out_dir: str) -> list[str]:
  """One PNG per metric that some run logged (and the GRPO overview) in out_dir (created). Returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for stage, keys in (('grpo', GRPO_METRICS), ('sft', SFT_METRICS)):
    for key in keys:
      fig = Figure(figsize=(6.4, 4.0), layout='constrained')
      if _draw(fig.add_subplot(), runs, stage, key):
        fig.axes[0].set_title(f'{stage.upper()}: {LABELS.get(key, key)}')
        path = os.path.join(out_dir, f'{stage}_{key}.png')
        fig.savefig(path, dpi=100)
        written.append(path)
  fig = Figure(figsize=(15, 8), layout='constrained')
  drawn = [_draw(ax, runs, 'grpo', key) for ax, key in zip(fig.subplots(2, 3).flat, GRPO_METRICS, strict=True)]
  if any(drawn):
    for ax, key, d in zip(fig.axes, GRPO_METRICS, drawn, strict=True):
      if d:
        ax.set_title(LABELS.get(key, key))
      else:
        ax.set_axis_off()
    path = os.path.join(out_dir, 'grpo_overview.png')
    fig.savefig(path, dpi=80)
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m grpo_jax.report', description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', help='training workdirs (each with a metrics.jsonl)')
  parser.add_argument('--out', help="where to write the PNGs (default: the first workdir's plots/)")
  args = parser.parse_args(argv)
  try:
    runs = [load_run(w, label) for w, label in zip(args.workdirs, labels(args.workdirs), strict=True)]
    out_dir = args.out or os.path.join(args.workdirs[0], 'plots')
    written = write_plots(runs, out_dir)
  except (ReportError, OSError) as e:
    print(f'report: {e}', file=sys.stderr)
    return 1
  if not written:
    print(f"report: none of {', '.join(GRPO_METRICS + SFT_METRICS)} was logged; nothing to plot", file=sys.stderr)
    return 1
  print(f'{len(written)} plots in {out_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
