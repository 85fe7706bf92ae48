"""The paper's whole algorithm on the embedded tasks: which of its parts change the result, over seeds.

  python benchmarks/iterative_rl.py --seeds 0,1,2 --root /tmp/iterative_rl --out benchmarks/iterative_rl.jsonl

Each seed trains SFT once (the 'I1' variant's run); every other arithmetic variant starts from a copy of that
finished SFT stage (the stage loop skips a finished stage), so variants differ only in what they change. The
variants (config overrides on configs/default.py, GRPO shortened to REPORT's steps):

  I1          one iteration, verifier reward, beta 0.04 (the baseline)
  I3          three outer iterations at the same total steps, reference reset each iteration (the paper)
  I3_noreset  three iterations, the SFT reference throughout
  rm          the learned reward model alone (trained on verifier-labelled comparisons), I = 1
  mix         0.5 verifier + 0.5 sigmoid(reward model)
  process     process supervision with the arithmetic step verifier
  kl_adapt    beta moved toward rl.kl_target by the controller
  numbers_I1 / numbers_I3   the non-verifiable task (configs/default.py:numbers): GRPO on the reward model alone,
                            the hidden rater's win rate over SFT on held-out prompts (one paired sample each)

Appends one JSON line per run to --out: the summary's numbers, wall time and the run's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from grpo_jax.experiments.runs import copy_sft, train_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def train(workdir: str, args: list[str], log: str, preset: str = '') -> tuple[int, float, float]:
  """(exit status, wall seconds, peak RSS in MB) of one training process on configs/default.py[:preset]."""
  config = os.path.join(ROOT, 'configs/default.py') + (f':{preset}' if preset else '')
  return train_process(config, workdir, args, log)


def record(out: str, row: dict) -> None:
  with open(out, 'a') as f:
    f.write(json.dumps(row) + '\n')
  print(json.dumps({k: row[k] for k in ('variant', 'seed', 'status', 'sft_accuracy', 'grpo_accuracy',
                                         'grpo_win_rate_vs_sft', 'wall_s', 'peak_rss_mb') if k in row}), flush=True)


def run_one(root: str, out: str, variant: str, seed: int, args: list[str], sft_from: str | None,
            preset: str = '') -> str:
  workdir = os.path.join(root, f'seed{seed}', variant)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  if sft_from:
    copy_sft(sft_from, workdir)
    args = [*args, '--allow_config_change=rl,reward_model']
  status, wall, rss = train(workdir, [f'--config.seed={seed}', *args], workdir + '.log', preset)
  row = {'variant': variant, 'seed': seed, 'status': status, 'wall_s': wall, 'peak_rss_mb': rss}
  summary_path = os.path.join(workdir, 'summary.json')
  if status == 0 and os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    row.update({k: v for k, v in summary.items() if not k.endswith('_sample')})
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    grpo_rows = [r for r in rows if r['stage'].startswith('grpo')]
    row['traces'] = {k: [r.get(k) for r in grpo_rows] for k in ('kl', 'kl_exact', 'beta', 'lr', 'reward',
                                                               'rm_agreement')}
  record(out, row)
  return workdir


def table(paths: list[str]) -> str:
  """A markdown table of the runs in the JSON-lines files: per variant, min / mean / max over seeds."""
  rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
  rows = list({(r['variant'], r['seed']): r for r in rows if r['status'] == 0}.values())  # a rerun replaces

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
                 f"{stats([r['sft_accuracy'] for r in rs], 100)} | {stats([r['grpo_accuracy'] for r in rs], 100)} | "
                 f"{stats([r['grpo_accuracy'] - r['sft_accuracy'] for r in rs], 100)} | "
                 f"{stats([r['grpo_win_rate_vs_sft'] for r in rs], 100)} | {stats(rm, 100)} | {stats(agree, 100)} | "
                 f"{stats([r['sft_reward'] for r in rs], fmt=three)} -> "
                 f"{stats([r['grpo_reward'] for r in rs], fmt=three)} | "
                 f"{stats([r['wall_s'] for r in rs], fmt=whole)} | "
                 f"{stats([r['peak_rss_mb'] for r in rs], fmt=whole)} |")
  return '\n'.join(lines)


def sweep_args(doc: str, *, seeds: str, name: str, variants: str) -> argparse.Namespace:
  """The flags of a seed sweep: --seeds, --root (/tmp/<name>), --out (benchmarks/<name>.jsonl), --variants,
  --table."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seeds', default=seeds)
  parser.add_argument('--root', default=f'/tmp/{name}')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', f'{name}.jsonl'))
  parser.add_argument('--variants', default=variants)
  parser.add_argument('--table', nargs='*', help='print the table of these result files and exit')
  return parser.parse_args()


def main() -> None:
  a = sweep_args(__doc__, seeds='0,1,2', name='iterative_rl', variants=','.join([*VARIANTS, *NUMBERS_VARIANTS]))
  if a.table is not None:
    print(table(a.table or [a.out]))
    return
  wanted = a.variants.split(',')
  for seed in map(int, a.seeds.split(',')):
    base = run_one(a.root, a.out, 'I1', seed, REPORT, None) if set(VARIANTS) & set(wanted) else None
    for name, args in VARIANTS.items():
      if name != 'I1' and name in wanted:
        run_one(a.root, a.out, name, seed, [*REPORT, *args], base)
    numbers_base = None
    for name, args in NUMBERS_VARIANTS.items():
      if name in wanted:
        workdir = run_one(a.root, a.out, name, seed, [*NUMBERS, *args], numbers_base, 'numbers')
        numbers_base = numbers_base or workdir


if __name__ == '__main__':
  main()
