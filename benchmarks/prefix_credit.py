"""Prefix-resampling credit against plain outcome advantages at equal sampled tokens, on the embedded task.

  python benchmarks/prefix_credit.py --seeds 0,1,2 --steps 100
  python benchmarks/prefix_credit.py --table benchmarks/prefix_credit.jsonl

Every run continues from a copy of the seed's finished SFT stage of benchmarks/default_seeds.py (<sft_root>/seed<S>/
default; run that first), so the variants differ only in GRPO:

  prefix            rl.supervision='prefix_resample' for --steps steps (cuts and K: --cuts / --k, else the config's)
  outcome_matched   outcome advantages, given as many sampled tokens: --steps x (rollout + continuation tokens) /
                    rollout tokens, that ratio measured on the seed's prefix run (so prefix runs first)
  outcome_steps     outcome advantages for --steps steps (the same updates, fewer sampled tokens)

Equal tokens are matched with more steps, not more prompts per step: same batch, learning rate and minibatching, so
the outcome run spends the budget as it would if given more time. A continuation counts the tokens it keeps (within
the budget max_new_tokens - cut); the table gives each run's measured total, so the match can be checked. Appends
one JSON line per run to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil

from iterative_rl import ROOT, copy_sft, record, train

VARIANTS = ('prefix', 'outcome_matched', 'outcome_steps')


def sampled_tokens(workdir: str, outputs_per_step: int) -> tuple[float, float]:
  """(rollout tokens, continuation tokens) the GRPO stage of `workdir` sampled, from its metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [r for r in map(json.loads, f) if r.get('stage', '').startswith('grpo')]
  return (sum(r['completion_len'] * outputs_per_step for r in rows),
          sum(r.get('prefix_continuation_tokens', 0) for r in rows))


def run_one(a: argparse.Namespace, variant: str, seed: int, steps: int) -> dict:
  workdir = os.path.join(a.root, f'seed{seed}', variant)
  shutil.rmtree(workdir, ignore_errors=True)
  copy_sft(os.path.join(a.sft_root, f'seed{seed}', 'default'), workdir)
  extra = a.extra.split()
  # GRPO's knobs and those --extra sets may differ from the SFT run's config; 'ppo' is a section the seed runs
  # may predate (it changes nothing in GRPO).
  allowed = ['rl', 'ppo', *(x.split('=')[0].removeprefix('--config.') for x in extra if x.startswith('--config.'))]
  args = [f'--config.seed={seed}', f'--config.rl.num_steps={steps}', f'--allow_config_change={",".join(allowed)}',
          *extra]
  if variant == 'prefix':
    args.append('--config.rl.supervision=prefix_resample')
    args += [f'--config.rl.prefix_cuts=({a.cuts},)'] if a.cuts else []
    args += [f'--config.rl.prefix_continuations={a.k}'] if a.k else []
  status, wall, rss = train(workdir, args, workdir + '.log')
  row = {'variant': variant, 'seed': seed, 'steps': steps, 'status': status, 'wall_s': wall, 'peak_rss_mb': rss,
         'args': args}
  if status == 0:
    with open(os.path.join(workdir, 'summary.json')) as f:
      row.update({k: v for k, v in json.load(f).items() if not k.endswith('_sample')})
    with open(os.path.join(workdir, 'config.json')) as f:
      rl = json.load(f)['rl']
    row['rollout_tokens'], row['continuation_tokens'] = sampled_tokens(workdir, rl['num_prompts'] * rl['group_size'])
  record(a.out, row)
  return row


def table(paths: list[str]) -> str:
  """Markdown: per variant, held-out accuracy after GRPO and its gain over SFT (min / mean / max over seeds), steps and
  sampled tokens (mean)."""
  rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
  runs = list({(r['variant'], r['seed']): r for r in rows if r['status'] == 0}.values())  # a rerun replaces
  spread = lambda v, f='{:.1f}': '/'.join(f.format(x) for x in (min(v), sum(v) / len(v), max(v)))  # noqa: E731
  out = ['| variant | seeds | GRPO steps | sampled tokens (k) | SFT % | after GRPO % | gain (pts) | wall (min) |',
         '|---' * 8 + '|']
  for variant in VARIANTS:
    rs = sorted((r for r in runs if r['variant'] == variant), key=lambda r: r['seed'])
    if not rs:
      continue
    mean = lambda key, rs=rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    tokens = sum(r['rollout_tokens'] + r['continuation_tokens'] for r in rs) / len(rs) / 1e3
    out.append(f'| {variant} | {",".join(str(r["seed"]) for r in rs)} | {mean("steps"):.0f} | {tokens:.0f} | '
               f'{spread([100 * r["sft_accuracy"] for r in rs])} | {spread([100 * r["grpo_accuracy"] for r in rs])} | '
               f'{spread([100 * (r["grpo_accuracy"] - r["sft_accuracy"]) for r in rs], "{:+.1f}")} | '
               f'{mean("wall_s") / 60:.1f} |')
  return '\n'.join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=100, help="the prefix run's GRPO steps")
  parser.add_argument('--cuts', default='', help="rl.prefix_cuts as 'f1,f2,...' ('' = the config's)")
  parser.add_argument('--k', type=int, default=0, help="rl.prefix_continuations (0 = the config's)")
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--sft_root', default='/tmp/default_seeds', help="benchmarks/default_seeds.py's --root")
  parser.add_argument('--root', default='/tmp/prefix_credit')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'prefix_credit.jsonl'))
  parser.add_argument('--extra', default='', help='more overrides for every run, space-separated: '
                      '--extra="--config.task.num_test=100 --config.rl.lr=1e-4"')
  parser.add_argument('--table', nargs='*', help='print the table of these result files and exit')
  a = parser.parse_args()
  if a.table is not None:
    print(table(a.table or [a.out]))
    return
  variants = a.variants.split(',')
  unknown = set(variants) - set(VARIANTS)
  if unknown or ('outcome_matched' in variants and 'prefix' not in variants):
    raise SystemExit(f'--variants: known {VARIANTS}; outcome_matched needs prefix (its token count)')
  for seed in map(int, a.seeds.split(',')):
    prefix = run_one(a, 'prefix', seed, a.steps) if 'prefix' in variants else None
    if 'outcome_matched' in variants:
      if prefix['status'] != 0:
        print(f'seed {seed}: the prefix run failed (see its .log); no matched run')
      else:
        ratio = (prefix['rollout_tokens'] + prefix['continuation_tokens']) / prefix['rollout_tokens']
        run_one(a, 'outcome_matched', seed, math.ceil(a.steps * ratio))
    if 'outcome_steps' in variants:
      run_one(a, 'outcome_steps', seed, a.steps)
  print(table([a.out]))


if __name__ == '__main__':
  main()
