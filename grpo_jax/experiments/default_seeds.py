r"""The embedded default over seeds: what a newcomer sees, and the compute-matched SFT control.

  python -m grpo_jax.experiments.default_seeds --seeds 0,1,2,3,4 --variants default,sft_matched
  python -m grpo_jax.experiments.default_seeds --table benchmarks/default_seeds.jsonl
  python -m grpo_jax.experiments.default_seeds --config configs/default.py:tiny --seeds 0 --variants default,lr_1e-4 \
      --out /tmp/default_seeds.jsonl   # a smoke run (minutes)

Variants: 'default' (--config, configs/default.py as `bash launch/local.sh` runs it), 'sft_matched' (the config
file's :sft_matched preset, SFT alone for the default's SFT + GRPO wall time), 'one_device' (the default on one XLA
device, --config.cpu_devices=0), and GRPO_VARIANTS (one GRPO knob changed, from a copy of the seed's 'default' SFT
stage: run 'default' first). Each run is a fresh process in <root>/seed<S>/<variant>; every --config.<key>=<value>
goes to every run. One JSON line per run is appended to --out: the summary's numbers, wall time, peak RSS and the
GRPO diagnostics (first-step entropy, mean fraction of groups with no reward variance, mean pass@G, the SFT step where
validation accuracy first passed 30%).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from grpo_jax.experiments import runs, sweeps
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.metrics import read_metrics

# variant -> (the config file's preset, '' = --config as given; its overrides)
VARIANTS = {'default': ('', []), 'sft_matched': ('sft_matched', []), 'one_device': ('', ['--config.cpu_devices=0'])}
# GRPO knobs around the default, each continuing from a copy of the seed's 'default' SFT checkpoint (run that first).
GRPO_VARIANTS = {'lr_1e-4': ['--config.rl.lr=1e-4'], 'lr_2.5e-5': ['--config.rl.lr=2.5e-5'],
                 'beta_0.04': ['--config.rl.beta=0.04'], 'steps_100': ['--config.rl.num_steps=100'],
                 # issue 17's switches: do they move the result beyond seed noise?
                 'token_mean': ['--config.rl.loss_aggregation=token_mean'],
                 'clip_higher': ['--config.rl.clip_eps_high=0.28'],
                 'dynamic_sampling': ['--config.rl.dynamic_sampling=True'],
                 'dr_grpo': ['--config.rl.loss_aggregation=constant', '--config.rl.advantage=group_mean']}


def define_flags(fv: flags.FlagValues) -> None:
  sweeps.define_flags(fv, name='default_seeds', seeds='0,1,2,3,4', variants=['default', 'sft_matched'])


def diagnostics(workdir: str) -> dict[str, Any]:
  """SFT's validation curve and the step it first passed 30%; GRPO's entropy, no-signal groups, pass@G, rewards."""
  rows = read_metrics(workdir)
  val = [(r['step'], r['val_accuracy']) for r in rows if r['stage'] == stages.SFT.name and 'val_accuracy' in r]
  out = {'sft_val_curve': val, 'sft_step_val_30': next((step for step, acc in val if acc >= 0.3), None)}
  grpo = [r for r in rows if stages.is_rl(r['stage'])]
  if grpo:
    mean = lambda key: sum(r[key] for r in grpo) / len(grpo)  # noqa: E731
    out.update(entropy_first=grpo[0]['entropy'], entropy_last=grpo[-1]['entropy'],
               mean_frac_groups_no_signal=mean('frac_groups_no_signal'), mean_pass_at_g=mean('pass_at_g'),
               reward_trace=[r['reward'] for r in grpo])
  return out


def run_one(root: str, out: str, variant: str, seed: int, config: str, overrides: Sequence[str]) -> None:
  """Train one variant of one seed from scratch (a GRPO variant from the seed's 'default' SFT), append its line."""
  preset, args = VARIANTS.get(variant, ('', GRPO_VARIANTS.get(variant)))
  workdir = os.path.join(root, f'seed{seed}', variant)
  sft_from = os.path.join(root, f'seed{seed}', 'default') if variant in GRPO_VARIANTS else None
  args = [*args, *overrides, f'--config.seed={seed}']
  if sft_from:
    args.append('--allow_config_change=rl,ppo')  # ppo: SFT stages saved before the section existed
  status, wall, rss = sweeps.train_fresh(workdir, sweeps.with_preset(config, preset), args, sft_from=sft_from)
  row = {'variant': variant, 'seed': seed, 'status': status, 'wall_s': wall, 'peak_rss_mb': rss}
  if status == 0:
    row.update(sweeps.summary_fields(workdir))
    row.update(diagnostics(workdir))
  sweeps.record(out, row)


def table(paths: Sequence[str]) -> str:
  """Markdown: per seed, SFT -> GRPO held-out accuracy and the compute-matched SFT control; then min / mean / max.
  One table for the default (with sft_matched joined by seed), one for one_device and each GRPO variant, where run."""
  runs_by_key = {(r['variant'], r['seed']): r for r in sweeps.finished_rows(paths)}
  pct = lambda v: '-' if v is None else f'{100 * v:.1f}'  # noqa: E731
  signed = lambda v: '-' if v is None else f'{100 * v:+.1f}'  # noqa: E731
  out = []
  for variant in ('default', 'one_device', *GRPO_VARIANTS):
    seeds = sorted(seed for v, seed in runs_by_key if v == variant)
    if not seeds:
      continue
    cols = {'SFT %': [], 'SFT + GRPO %': [], 'gain (pts)': [], 'compute-matched SFT %': [],
            'GRPO - matched (pts)': [], 'no-signal groups %': [], 'pass@G %': [], 'wall (min)': []}
    for seed in seeds:
      r = runs_by_key[variant, seed]
      m = runs_by_key.get(('sft_matched', seed)) if variant == 'default' else None
      matched = None if m is None else m['sft_accuracy']
      values = [r['sft_accuracy'], r['rl_accuracy'], r['rl_accuracy'] - r['sft_accuracy'], matched,
                None if matched is None else r['rl_accuracy'] - matched, r.get('mean_frac_groups_no_signal'),
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


def main(argv: Sequence[str] | None = None) -> None:
  """Run the variants over the seeds (or, with --table, print the table and exit)."""
  program = 'python -m grpo_jax.experiments.default_seeds'
  fv, _, config, overrides = runs.parse_flags(sys.argv if argv is None else argv, program, define_flags)
  if fv.table is not None:
    print(table(fv.table or [fv.out]))
    return
  sweeps.check_variants(fv.variants, [*VARIANTS, *GRPO_VARIANTS], program)
  seeds = sweeps.int_list(fv.seeds, 'seeds', program)
  for variant in fv.variants:
    for seed in seeds:
      run_one(fv.root, fv.out, variant, seed, config, overrides)


if __name__ == '__main__':
  main()
