r"""The paper's whole algorithm on the embedded tasks: which of its parts change the result, over seeds.

  python -m grpo_jax.experiments.iterative_rl --seeds 0,1,2 --root /tmp/iterative_rl
  python -m grpo_jax.experiments.iterative_rl \
      --table benchmarks/iterative_rl_arithmetic.jsonl,benchmarks/iterative_rl_numbers.jsonl
  python -m grpo_jax.experiments.iterative_rl --config configs/default.py:tiny --seeds 0 --variants I1,I3 \
      --config.sft.max_steps=6 --config.rl.num_steps=6 --out /tmp/iterative_rl.jsonl   # a smoke run (minutes)

Each seed trains SFT once (the 'I1' variant's run); every other arithmetic variant starts from a copy of that
finished SFT stage (the stage loop skips a finished stage), so variants differ only in what they change. The
variants (config overrides on --config, GRPO shortened to REPORT's steps):

  I1          one iteration, verifier reward, beta 0.04 (the baseline)
  I3          three outer iterations at the same total steps, reference reset each iteration (the paper)
  I3_noreset  three iterations, the SFT reference throughout
  rm          the learned reward model alone (trained on verifier-labelled comparisons), I = 1
  mix         0.5 verifier + 0.5 sigmoid(reward model)
  process     process supervision with the arithmetic step verifier
  kl_adapt    beta moved toward rl.kl_target by the controller
  numbers_I1 / numbers_I3   the non-verifiable task (the config file's :numbers preset): GRPO on the reward model
                            alone, the hidden rater's win rate over SFT on held-out prompts (one paired sample each)

Every --config.<key>=<value> goes to every run, after the variant's own (so it wins). Appends one JSON line per run
to --out: the summary's numbers, the GRPO stages' traces, wall time and the run's peak RSS.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from grpo_jax.experiments import runs, sweeps
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.metrics import read_metrics

# The embedded default as it was when these results were recorded (benchmarks/RESULTS.md): an exact teacher, SFT
# stopped at 35% validation accuracy.
OLD_DEFAULT = ['--config.task.teacher_slip=0', '--config.sft.target_accuracy=0.35', '--config.sft.eval_every=10',
               '--config.sft.max_steps=2000']
REPORT = [*OLD_DEFAULT, '--config.rl.num_steps=45', '--config.rl.beta=0.04', '--config.task.num_test=300']
VARIANTS = {
    'I1': [],
    'I3': ['--config.rl.num_iterations=3'],
    'I3_noreset': ['--config.rl.num_iterations=3', '--config.rl.reset_reference=False'],
    'rm': ['--config.rl.reward_source=reward_model'],
    'mix': ['--config.rl.reward_source=mix'],
    'process': ['--config.rl.supervision=process'],
    'kl_adapt': ['--config.rl.kl_target=0.0005'],
}
NUMBERS = ['--config.rl.num_steps=60', '--config.rl.beta=0.04', '--config.task.num_test=300']  # on the :numbers preset
NUMBERS_VARIANTS = {'numbers_I1': [], 'numbers_I3': ['--config.rl.num_iterations=3']}
TRACES = ('kl', 'kl_exact', 'beta', 'lr', 'reward', 'rm_agreement')  # per GRPO step, kept in each run's line


def define_flags(fv: flags.FlagValues) -> None:
  sweeps.define_flags(fv, name='iterative_rl', seeds='0,1,2', variants=[*VARIANTS, *NUMBERS_VARIANTS])


def run_one(root: str, out: str, variant: str, seed: int, config: str, args: Sequence[str],
            sft_from: str | None) -> str:
  """Train one variant from scratch (from a copy of sft_from's SFT stage when given), append its line; returns its
  workdir."""
  workdir = os.path.join(root, f'seed{seed}', variant)
  args = [*args, f'--config.seed={seed}']
  if sft_from:
    args.append('--allow_config_change=rl,reward_model')
  status, wall, rss = sweeps.train_fresh(workdir, config, args, sft_from=sft_from)
  row = {'variant': variant, 'seed': seed, 'status': status, 'wall_s': wall, 'peak_rss_mb': rss}
  summary = sweeps.summary_fields(workdir) if status == 0 else {}
  if summary:
    row.update(summary)
    grpo_rows = [r for r in read_metrics(workdir) if stages.is_rl(r['stage'])]
    row['traces'] = {k: [r.get(k) for r in grpo_rows] for k in TRACES}
  sweeps.record(out, row)
  return workdir


def table(paths: Sequence[str]) -> str:
  """A markdown table of the runs in the JSON-lines files: per variant, min / mean / max over seeds."""
  rows = sweeps.finished_rows(paths)

  def stats(values, scale=1.0, fmt='{:.1f}'):
    values = [v * scale for v in values if v is not None]
    if not values:
      return '-'
    return '/'.join(fmt.format(x) for x in (min(values), sum(values) / len(values), max(values)))

  head = ('| variant | seeds | SFT acc % | GRPO acc % | gain (pts) | win rate vs SFT % | reward-model held-out acc % | '
          'rm agreement % | held-out reward, SFT -> GRPO | wall (s) | peak RSS (MB) |\n' + '|---' * 11 + '|')
  lines, three, whole = [head], '{:.3f}', '{:.0f}'
  for variant in dict.fromkeys(r['variant'] for r in rows):
    rs = [r for r in rows if r['variant'] == variant]
    rm = [r['reward_model'][-1]['heldout_accuracy'] for r in rs if r.get('reward_model')]
    agree = [sum(x for x in r['traces']['rm_agreement'] if x is not None and x == x) /
             max(1, sum(1 for x in r['traces']['rm_agreement'] if x is not None and x == x)) for r in rs
             if any(x is not None and x == x for x in r['traces']['rm_agreement'])]
    lines.append(f"| {variant} | {','.join(str(r['seed']) for r in rs)} | "
                 f"{stats([r['sft_accuracy'] for r in rs], 100)} | {stats([r['rl_accuracy'] for r in rs], 100)} | "
                 f"{stats([r['rl_accuracy'] - r['sft_accuracy'] for r in rs], 100)} | "
                 f"{stats([r['rl_win_rate_vs_sft'] for r in rs], 100)} | {stats(rm, 100)} | {stats(agree, 100)} | "
                 f"{stats([r['sft_reward'] for r in rs], fmt=three)} -> "
                 f"{stats([r['rl_reward'] for r in rs], fmt=three)} | "
                 f"{stats([r['wall_s'] for r in rs], fmt=whole)} | "
                 f"{stats([r['peak_rss_mb'] for r in rs], fmt=whole)} |")
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """Run the variants over the seeds (or, with --table, print the table and exit)."""
  program = 'python -m grpo_jax.experiments.iterative_rl'
  fv, _, config, overrides = runs.parse_flags(sys.argv if argv is None else argv, program, define_flags)
  if fv.table is not None:
    print(table(fv.table or [fv.out]))
    return
  wanted = list(fv.variants)
  sweeps.check_variants(wanted, [*VARIANTS, *NUMBERS_VARIANTS], program)
  numbers = sweeps.with_preset(config, 'numbers')
  for seed in sweeps.int_list(fv.seeds, 'seeds', program):
    base = None
    if set(VARIANTS) & set(wanted):
      base = run_one(fv.root, fv.out, 'I1', seed, config, [*REPORT, *overrides], None)
    for name, args in VARIANTS.items():
      if name != 'I1' and name in wanted:
        run_one(fv.root, fv.out, name, seed, config, [*REPORT, *args, *overrides], base)
    numbers_base = None
    for name, args in NUMBERS_VARIANTS.items():
      if name in wanted:
        workdir = run_one(fv.root, fv.out, name, seed, numbers, [*NUMBERS, *args, *overrides], numbers_base)
        numbers_base = numbers_base or workdir


if __name__ == '__main__':
  main()
