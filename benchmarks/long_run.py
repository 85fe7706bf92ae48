"""Does a long GRPO run keep its memory and its compiles? The `:tiny` preset for many GRPO steps, in one process.

  python benchmarks/long_run.py --grpo-steps 2000 --workdir /tmp/long_run

Samples this process's resident memory (VmRSS) twice a second while the trainer runs and reads the per-step
'compiles' metric (XLA compilations so far). Prints one JSON line: peak and current RSS at GRPO steps 100,
25/50/75% and the end, the growth of the peak after step 100, and the compile count after the first steps
against the end. A leak (host copies of rollouts, metric buffers, a cache that grows) shows as RSS growth; a
recompile as a rising count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024.0
  return float('nan')


def grpo_rows(workdir: str) -> int:
  """GRPO rows logged so far (cheap: counts lines, parses none)."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return sum('"stage": "grpo"' in line for line in f)
  except OSError:
    return 0


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--grpo-steps', type=int, default=2000)
  ap.add_argument('--workdir', default='/tmp/grpo_long_run')
  ap.add_argument('--cpu-devices', type=int, default=2)
  args = ap.parse_args()
  if args.grpo_steps < 200:
    ap.error('--grpo-steps must be >= 200 (growth is measured after step 100)')
  shutil.rmtree(args.workdir, ignore_errors=True)

  sys.path.insert(0, ROOT)
  from configs import default
  from grpo_jax.pipeline.metrics import read_metrics
  from grpo_jax.pipeline.run import run

  cfg = default.get_config('tiny')
  cfg.rl.num_steps, cfg.cpu_devices = args.grpo_steps, args.cpu_devices
  cfg.checkpoint_every = max(args.grpo_steps // 4, 1)  # a few saves, as a long run has
  samples, done = [], threading.Event()

  def sample():
    while not done.is_set():
      samples.append((grpo_rows(args.workdir), rss_mb()))
      time.sleep(0.5)

  sampler = threading.Thread(target=sample, daemon=True)
  start = time.perf_counter()
  sampler.start()
  try:
    run(cfg, args.workdir)
  finally:
    done.set()
    sampler.join()
  rows = read_metrics(args.workdir, 'grpo')
  n = len(rows)
  at = lambda step: max((r for s, r in samples if s <= step), default=float('nan'))  # noqa: E731  (peak so far)
  now = lambda step: next((r for s, r in reversed(samples) if s <= step), float('nan'))  # noqa: E731
  steps = (100, n // 4, n // 2, 3 * n // 4, n)
  marks = {str(s): round(at(s), 1) for s in steps}
  compiles = {r['step']: r['compiles'] for r in rows}
  result = {
      'grpo_steps': n, 'wall_s': round(time.perf_counter() - start, 1), 'peak_rss_mb_at_step': marks,
      'rss_mb_at_step': {str(s): round(now(s), 1) for s in steps},
      'peak_growth_after_step_100': round(at(n) / at(100) - 1, 4),
      'compiles_at_step_10': compiles.get(10), 'compiles_at_end': compiles.get(n),
  }
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
