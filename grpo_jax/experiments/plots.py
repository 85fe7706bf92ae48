"""Plots of experiments' results as PNG files (matplotlib's Agg canvas through a Figure, as grpo_jax/report.py: no
pyplot, no display, no global state)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure


def plot_sweep(lines: Mapping[str, Sequence[tuple[float, float, float, float]]], path: str, *, xlabel: str,
               ylabel: str, title: str, baseline: tuple[str, float] | None = None, log2_x: bool = True) -> str:
  """One line per entry of `lines`, each point (x, mean, low, high) drawn at its mean with an error bar from low to
  high (e.g. min / max over seeds); `baseline` (label, y) is a dashed horizontal line. Writes the PNG; returns path."""
  fig = Figure(figsize=(6.4, 4.2), layout='constrained')
  ax = fig.add_subplot()
  for i, (label, points) in enumerate(lines.items()):
    points = sorted(points)
    if not points:
      continue
    xs, mean, low, high = (list(v) for v in zip(*points, strict=True))
    ax.errorbar(xs, mean, yerr=[[m - lo for m, lo in zip(mean, low, strict=True)],
                                [hi - m for m, hi in zip(mean, high, strict=True)]],
                color=f'C{i % 10}', label=label, marker='o', markersize=4, capsize=3, linewidth=1.2)
  if baseline is not None:
    ax.axhline(baseline[1], color='grey', linestyle='--', linewidth=1, label=baseline[0])
  if log2_x:
    ax.set_xscale('log', base=2)
    ticks = sorted({x for points in lines.values() for x, *_ in points})
    ax.set_xticks(ticks, [f'{x:g}' for x in ticks])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize='medium')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.savefig(path, dpi=100)
  return path
