"""Metrics sinks: <workdir>/metrics.jsonl (one JSON object per step, with `step` and `stage`) and TensorBoard."""
from __future__ import annotations

import json
import os
from typing import Any

from grpo_jax.pipeline.workdir import write_text


def read_metrics(workdir: str, stage: str | None = None) -> list[dict[str, Any]]:
  """The rows of <workdir>/metrics.jsonl (optionally of one stage), in order.

  A last line cut short (a kill or a full disk mid-write) is left out; a damaged line before it is an error
  naming the file and the line."""
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1 and not line.endswith('\n'):
        break  # the partial last line of an interrupted write: the resumed run writes it again
      raise ValueError(f'{path}:{i + 1}: damaged line ({e.msg}); delete that line or restore the file') from None
  return [r for r in rows if stage is None or r['stage'] == stage]


class MetricWriter:

  def __init__(self, workdir: str, *, active: bool = True):
    # active=False (processes other than 0 on several hosts): every call is a no-op, so one shared workdir gets
    # each line once.
    self.path, self.active = os.path.join(workdir, 'metrics.jsonl'), active
    self.tb = None
    if active:
      from tensorboardX import SummaryWriter  # here, not at the top: it imports torch when installed
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def rewind(self, stage: str, step: int) -> None:
    """Drop the lines logged after a checkpoint of `stage` at `step`: the stage's later lines and everything
    after them (a resumed run rewrites them identically). The file is replaced atomically."""
    if not self.active or not os.path.exists(self.path):
      return
    rows = read_metrics(os.path.dirname(self.path))
    first = next((i for i, r in enumerate(rows) if r['stage'] == stage), len(rows))
    keep = rows[:first] + [r for r in rows[first:] if r['stage'] == stage and r['step'] <= step]
    with open(self.path) as f:
      complete = f.read().endswith('\n')  # else a partial last line, which read_metrics left out: drop it too
    if len(keep) == len(rows) and complete:
      return
    write_text(self.path, ''.join(json.dumps(r) + '\n' for r in keep))

  def write(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    row = {'stage': stage, 'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if isinstance(v, (int, float)) and k != 'step':
        self.tb.add_scalar(f'{stage}/{k}', v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _scalar(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v
