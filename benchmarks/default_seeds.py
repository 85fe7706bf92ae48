"""The embedded default over seeds: what a newcomer sees, and the compute-matched SFT control.

  python benchmarks/default_seeds.py --seeds 0,1,2,3,4 --variants default,sft_matched
  python benchmarks/default_seeds.py --table benchmarks/default_seeds.jsonl

Variants: 'default' (configs/default.py as `bash launch/local.sh` runs it), 'sft_matched' (configs/default.py:
sft_matched, SFT alone for the default's SFT + GRPO wall time), 'one_device' (the default on one XLA device,
--config.cpu_devices=0), and GRPO_VARIANTS (one GRPO knob changed, from a copy of the seed's default SFT stage).
Each run is a fresh process in <root>/seed<S>/<variant>; one JSON line per run is appended to --out: the
summary's numbers, wall time, peak RSS and the GRPO diagnostics (first-step entropy, mean fraction of groups with
no reward variance, mean pass@G, the SFT step where validation accuracy first passed 30%).
"""
from __future__ import annotations

import json
import os
import shutil

from iterative_rl import record, sweep_args, train

from grpo_jax.experiments.runs import copy_sft

VARIANTS = {'default': ('', []), 'sft_matched': ('sft_matched', []), 'one_device': ('', ['--config.cpu_devices=0'])}
# GRPO knobs around the default, each continuing from a copy of the seed's 'default' SFT checkpoint (run that first).
GRPO_VARIANTS = {'lr_1e-4': ['--config.rl.lr=1e-4'], 'lr_2.5e-5': ['--config.rl.lr=2.5e-5'],
                 'beta_0.04': ['--config.rl.beta=0.04'], 'steps_100': ['--config.rl.num_steps=100'],
                 # issue 17's switches: do they move the result beyond seed noise?
                 'token_mean': ['--config.rl.loss_aggregation=token_mean'],
                 'clip_higher': ['--config.rl.clip_eps_high=0.28'],
                 'dynamic_sampling': ['--config.rl.dynamic_sampling=True'],
                 'dr_grpo': ['--config.rl.loss_aggregation=constant', '--config.rl.advantage=group_mean']}


def run_one(root: str, out: str, variant: str, seed: int) -> None:
  preset, args = VARIANTS.get(variant, ('', GRPO_VARIANTS.get(variant)))
  workdir = os.path.join(root, f'seed{seed}', variant)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  if variant in GRPO_VARIANTS:
    copy_sft(os.path.join(root, f'seed{seed}', 'default'), workdir)
    args = [*args, '--allow_config_change=rl,ppo']  # ppo: SFT stages saved before the section existed
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
  """Markdown: per seed, SFT -> GRPO held-out accuracy and the compute-matched SFT control; then min / mean / max.
  One table for the default (with sft_matched joined by seed) and one for one_device, where run."""
  rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
  runs = {(r['variant'], r['seed']): r for r in rows if r['status'] == 0}  # a rerun replaces
  pct = lambda v: '-' if v is None else f'{100 * v:.1f}'  # noqa: E731
  signed = lambda v: '-' if v is None else f'{100 * v:+.1f}'  # noqa: E731
  out = []
  for variant in ('default', 'one_device', *GRPO_VARIANTS):
    seeds = sorted(seed for v, seed in runs if v == variant)
    if not seeds:
      continue
    cols = {'SFT %': [], 'SFT + GRPO %': [], 'gain (pts)': [], 'compute-matched SFT %': [],
            'GRPO - matched (pts)': [], 'no-signal groups %': [], 'pass@G %': [], 'wall (min)': []}
    for seed in seeds:
      r, m = runs[variant, seed], runs.get(('sft_matched', seed)) if variant == 'default' else None
      matched = None if m is None else m['sft_accuracy']
      values = [r['sft_accuracy'], r['grpo_accuracy'], r['grpo_accuracy'] - r['sft_accuracy'], matched,
                None if matched is None else r['grpo_accuracy'] - matched, r.get('mean_frac_groups_no_signal'),
                r.get('mean_pass_at_g'), r['wall_s'] / 60]
      for col, v in zip(cols.values(), values, strict=True):
        col.append(v)
    fmt = [pct, pct, signed, pct, signed, pct, pct, lambda v: '-' if v is None else f'{v:.1f}']
    out += [f'{variant} (seeds {",".join(map(str, seeds))})', '',
            '| seed | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
    for i, seed in enumerate(seeds):
      out.append(f'| {seed} | ' + ' | '.join(f(c[i]) for f, c in zip(fmt, cols.values(), strict=True)) + ' |')
    for name, pick in (('min', min), ('mean', lambda v: sum(v) / len(v)), ('max', max)):
      cells = [f(pick(vs)) if vs else '-' for f, vs in
               zip(fmt, ([v for v in c if v is not None] for c in cols.values()), strict=True)]
      out.append(f'| **{name}** | ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)


def main() -> None:
  a = sweep_args(__doc__, seeds='0,1,2,3,4', name='default_seeds', variants='default,sft_matched')
  if a.table is not None:
    print(table(a.table or [a.out]))
    return
  for variant in a.variants.split(','):
    if variant not in VARIANTS and variant not in GRPO_VARIANTS:
      raise SystemExit(f'unknown variant {variant!r}; known: {sorted(VARIANTS) + sorted(GRPO_VARIANTS)}')
  for variant in a.variants.split(','):
    for seed in map(int, a.seeds.split(',')):
      run_one(a.root, a.out, variant, seed)


if __name__ == '__main__':
  main()
