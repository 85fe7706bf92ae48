"""The embedded default over seeds: what a newcomer sees, and the compute-matched SFT control.

  python benchmarks/default_seeds.py --seeds 0,1,2,3,4 --variants default,sft_matched
  python benchmarks/default_seeds.py --table benchmarks/default_seeds.jsonl

Variants: 'default' (configs/default.py as `bash launch/local.sh` runs it), 'sft_matched' (configs/default.py:
sft_matched, SFT alone for the default's SFT + GRPO wall time), 'one_device' (the default on one XLA device,
--config.cpu_devices=0). Each run is a fresh process in <root>/seed<S>/<variant>; one JSON line per run is appended
to --out: the summary's numbers, wall time, peak RSS and the GRPO diagnostics (first-step entropy, mean fraction of
groups with no reward variance, mean pass@G, the SFT step where validation accuracy first passed 30%).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from iterative_rl import ROOT, record, train

VARIANTS = {'default': ('', []), 'sft_matched': ('sft_matched', []), 'one_device': ('', ['--config.cpu_devices=0'])}


def run_one(root: str, out: str, variant: str, seed: int) -> None:
  preset, args = VARIANTS[variant]
  workdir = os.path.join(root, f'seed{seed}', variant)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  status, wall, rss = train(workdir, [f'--config.seed={seed}', *args], workdir + '.log', preset)
  row = {'variant': variant, 'seed': seed, 'status': status, 'wall_s': wall, 'peak_rss_mb': rss}
  if status == 0:
    with open(os.path.join(workdir, 'summary.json')) as f:
      row.update({k: v for k, v in json.load(f).items() if not k.endswith('_sample')})
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    val = [(r['step'], r['val_accuracy']) for r in rows if r['stage'] == 'sft' and 'val_accuracy' in r]
    row['sft_val_curve'] = val
    row['sft_step_val_30'] = next((step for step, acc in val if acc >= 0.3), None)
    grpo = [r for r in rows if r['stage'].startswith('grpo')]
    if grpo:
      mean = lambda key: sum(r[key] for r in grpo) / len(grpo)  # noqa: E731
      row.update(entropy_first=grpo[0]['entropy'], entropy_last=grpo[-1]['entropy'],
                 mean_frac_groups_no_signal=mean('frac_groups_no_signal'), mean_pass_at_g=mean('pass_at_g'),
                 reward_trace=[r['reward'] for r in grpo])
  record(out, row)


def table(paths: list[str]) -> str:
  """A markdown table: per variant, each seed's held-out accuracies, then min / mean / max."""
  rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
  rows = list({(r['variant'], r['seed']): r for r in rows if r['status'] == 0}.values())  # a rerun replaces
  pct = lambda v: '-' if v is None else f'{100 * v:.1f}'  # noqa: E731
  lines = ['| variant | seed | SFT acc % | after GRPO % | gain (pts) | no-signal groups | pass@G | wall (min) |',
           '|---' * 8 + '|']
  for variant in dict.fromkeys(r['variant'] for r in rows):
    rs = sorted((r for r in rows if r['variant'] == variant), key=lambda r: r['seed'])
    for r in rs:
      gain = None if r['grpo_accuracy'] is None else r['grpo_accuracy'] - r['sft_accuracy']
      lines.append(f"| {variant} | {r['seed']} | {pct(r['sft_accuracy'])} | {pct(r['grpo_accuracy'])} | "
                   f"{'-' if gain is None else f'{100 * gain:+.1f}'} | {pct(r.get('mean_frac_groups_no_signal'))} | "
                   f"{pct(r.get('mean_pass_at_g'))} | {r['wall_s'] / 60:.1f} |")
    for name, pick in (('min', min), ('mean', lambda v: sum(v) / len(v)), ('max', max)):
      cells = []
      for key in ('sft_accuracy', 'grpo_accuracy', 'gain'):
        values = [r['grpo_accuracy'] - r['sft_accuracy'] if key == 'gain' and r['grpo_accuracy'] is not None
                  else r.get(key) for r in rs]
        values = [v for v in values if v is not None]
        cells.append('-' if not values else (f'{100 * pick(values):+.1f}' if key == 'gain' else pct(pick(values))))
      lines.append(f"| {variant} | **{name}** | {' | '.join(cells)} | | | {pick([r['wall_s'] for r in rs]) / 60:.1f} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seeds', default='0,1,2,3,4')
  parser.add_argument('--root', default='/tmp/default_seeds')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'default_seeds.jsonl'))
  parser.add_argument('--variants', default='default,sft_matched')
  parser.add_argument('--table', nargs='*', help='print the table of these result files and exit')
  a = parser.parse_args()
  if a.table is not None:
    print(table(a.table or [a.out]))
    return
  for variant in a.variants.split(','):
    if variant not in VARIANTS:
      raise SystemExit(f'unknown variant {variant!r}; known: {sorted(VARIANTS)}')
  for variant in a.variants.split(','):
    for seed in map(int, a.seeds.split(',')):
      run_one(a.root, a.out, variant, seed)


if __name__ == '__main__':
  main()
