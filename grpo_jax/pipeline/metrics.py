"""Metrics sinks: <workdir>/metrics.jsonl (one JSON object per step, with `step` and `stage`) and TensorBoard."""
from __future__ import annotations

import json
import os
from typing import Any


def read_metrics(workdir: str, stage: str | None = None) -> list[dict[str, Any]]:
  """The rows of <workdir>/metrics.jsonl (optionally of one stage), in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
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
    if len(keep) == len(rows):
      return
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in keep)
    os.replace(self.path + '.tmp', self.path)

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
