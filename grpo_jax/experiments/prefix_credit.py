r"""Prefix-resampling credit against plain outcome advantages at equal sampled tokens, on the embedded task.

  python -m grpo_jax.experiments.prefix_credit --seeds 0,1,2 --steps 100
  python -m grpo_jax.experiments.prefix_credit --table benchmarks/prefix_credit.jsonl
  python -m grpo_jax.experiments.prefix_credit --seeds 0 --steps 50 --config.task.num_test=100 --config.rl.lr=1e-4

Every run continues from a copy of the seed's finished SFT stage of grpo_jax.experiments.default_seeds
(<sft_root>/seed<S>/default; run that first, with the same --config), so the variants differ only in GRPO:

  prefix            rl.supervision='prefix_resample' for --steps steps (cuts and K: --cuts / --k, else the config's)
  outcome_matched   outcome advantages, given as many sampled tokens: --steps x (rollout + continuation tokens) /
                    rollout tokens, that ratio measured on the seed's prefix run (so prefix runs first)
  outcome_steps     outcome advantages for --steps steps (the same updates, fewer sampled tokens)

Equal tokens are matched with more steps, not more prompts per step: same batch, learning rate and minibatching, so
the outcome run spends the budget as it would if given more time. A continuation counts the tokens it keeps (within
the budget max_new_tokens - cut); the table gives each run's measured total, so the match can be checked. Every
--config.<key>=<value> goes to every run (and may differ from the SFT run's config). Appends one JSON line per run
to --out.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from grpo_jax.experiments import runs, sweeps
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.metrics import read_metrics
from grpo_jax.pipeline.workdir import read_json

VARIANTS = ('prefix', 'outcome_matched', 'outcome_steps')


def define_flags(fv: flags.FlagValues) -> None:
  sweeps.define_flags(fv, name='prefix_credit', seeds='0,1,2', variants=VARIANTS)
  flags.DEFINE_integer('steps', 100, "The prefix run's GRPO steps.", flag_values=fv)
  flags.DEFINE_string('cuts', '', "rl.prefix_cuts of the prefix run as 'f1,f2,...' ('' = the config's).",
                      flag_values=fv)
  flags.DEFINE_integer('k', 0, "rl.prefix_continuations of the prefix run (0 = the config's).", flag_values=fv)
  flags.DEFINE_string('sft_root', '/tmp/default_seeds', "grpo_jax.experiments.default_seeds' --root.", flag_values=fv)


def sampled_tokens(workdir: str, outputs_per_step: int) -> tuple[float, float]:
  """(rollout tokens, continuation tokens) the GRPO stage of `workdir` sampled, from its metrics.jsonl."""
  rows = [r for r in read_metrics(workdir) if stages.is_rl(r.get('stage', ''))]
  return (sum(r['completion_len'] * outputs_per_step for r in rows),
          sum(r.get('prefix_continuation_tokens', 0) for r in rows))


def run_one(fv: flags.FlagValues, config: str, overrides: Sequence[str], variant: str, seed: int,
            steps: int) -> dict[str, Any]:
  """Train one variant of one seed for `steps` GRPO steps from a copy of the seed's SFT stage; append its line."""
  workdir = os.path.join(fv.root, f'seed{seed}', variant)
  # GRPO's knobs and those the overrides set may differ from the SFT run's config; 'ppo' is a section the seed runs
  # may predate (it changes nothing in GRPO).
  allowed = ['rl', 'ppo', *(o.split('=', 1)[0].removeprefix('--config.') for o in overrides)]
  args = [*overrides, f'--config.seed={seed}', f'--config.rl.num_steps={steps}',
          f'--allow_config_change={",".join(dict.fromkeys(allowed))}']
  if variant == 'prefix':
    args.append('--config.rl.supervision=prefix_resample')
    args += [f'--config.rl.prefix_cuts=({fv.cuts},)'] if fv.cuts else []
    args += [f'--config.rl.prefix_continuations={fv.k}'] if fv.k else []
  status, wall, rss = sweeps.train_fresh(workdir, config, args,
                                         sft_from=os.path.join(fv.sft_root, f'seed{seed}', 'default'))
  row = {'variant': variant, 'seed': seed, 'steps': steps, 'status': status, 'wall_s': wall, 'peak_rss_mb': rss,
         'args': args}
  if status == 0:
    row.update(sweeps.summary_fields(workdir))
    rl = read_json(os.path.join(workdir, 'config.json'))['rl']
    row['rollout_tokens'], row['continuation_tokens'] = sampled_tokens(workdir, rl['num_prompts'] * rl['group_size'])
  sweeps.record(fv.out, row)
  return row


def table(paths: Sequence[str]) -> str:
  """Markdown: per variant, held-out accuracy after GRPO and its gain over SFT (min / mean / max over seeds), steps and
  sampled tokens (mean)."""
  rows = sweeps.finished_rows(paths)
  spread = lambda v, f='{:.1f}': '/'.join(f.format(x) for x in (min(v), sum(v) / len(v), max(v)))  # noqa: E731
  out = ['| variant | seeds | GRPO steps | sampled tokens (k) | SFT % | after GRPO % | gain (pts) | wall (min) |',
         '|---' * 8 + '|']
  for variant in VARIANTS:
    rs = sorted((r for r in rows if r['variant'] == variant), key=lambda r: r['seed'])
    if not rs:
      continue
    mean = lambda key, rs=rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    tokens = sum(r['rollout_tokens'] + r['continuation_tokens'] for r in rs) / len(rs) / 1e3
    out.append(f'| {variant} | {",".join(str(r["seed"]) for r in rs)} | {mean("steps"):.0f} | {tokens:.0f} | '
               f'{spread([100 * r["sft_accuracy"] for r in rs])} | {spread([100 * r["rl_accuracy"] for r in rs])} | '
               f'{spread([100 * (r["rl_accuracy"] - r["sft_accuracy"]) for r in rs], "{:+.1f}")} | '
               f'{mean("wall_s") / 60:.1f} |')
  return '\n'.join(out)


def main(argv: Sequence[str] | None = None) -> None:
  """Run the variants over the seeds, then print the table (or, with --table, only print it)."""
  program = 'python -m grpo_jax.experiments.prefix_credit'
  fv, _, config, overrides = runs.parse_flags(sys.argv if argv is None else argv, program, define_flags)
  if fv.table is not None:
    print(table(fv.table or [fv.out]))
    return
  variants = list(fv.variants)
  sweeps.check_variants(variants, VARIANTS, program)
  if 'outcome_matched' in variants and 'prefix' not in variants:
    raise SystemExit(f'{program}: outcome_matched needs prefix in --variants (its token count)')
  for seed in sweeps.int_list(fv.seeds, 'seeds', program):
    prefix = run_one(fv, config, overrides, 'prefix', seed, fv.steps) if 'prefix' in variants else None
    if 'outcome_matched' in variants:
      if prefix['status'] != 0:
        print(f'seed {seed}: the prefix run failed (see its .log); no matched run')
      else:
        ratio = (prefix['rollout_tokens'] + prefix['continuation_tokens']) / prefix['rollout_tokens']
        run_one(fv, config, overrides, 'outcome_matched', seed, math.ceil(fv.steps * ratio))
    if 'outcome_steps' in variants:
      run_one(fv, config, overrides, 'outcome_steps', seed, fv.steps)
  print(table([fv.out]))


if __name__ == '__main__':
  main()
