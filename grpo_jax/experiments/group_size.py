r"""Held-out accuracy against the group size G, at equal steps and at equal sampled tokens, from one SFT per seed.

  python -m grpo_jax.experiments.group_size --seeds 0,1,2 --root /tmp/group_size
  python -m grpo_jax.experiments.group_size --config configs/default.py:tiny --seeds 0 --group_sizes 2,4

Per seed, in <root>/seed<S>/, each a fresh `python -m grpo_jax.train` process (experiments/runs.py; rerun to resume):
the config's SFT stage alone ('sft'), then for each G a GRPO run from a copy of it ('G<G>_P<P>'):
  equal steps   rl.num_prompts = the config's P (16 in the default), so a larger G samples more per step;
  equal tokens  rl.num_prompts = P * G0 / G (the default's 16 * 8 = 128 completions per step), rounded to the
                nearest integer (at least 1) when G does not divide P * G0: the JSONL's 'exact' is then false and its
                'completions_per_step' says what ran. Equal completions per step is equal sampled tokens to within
                the completions' lengths (the JSONL has the tokens each run sampled).
Both settings run rl.num_steps steps; a (G, P) both settings share runs once. Every --config.<key>=<value> goes to
every run. Writes --out (JSONL: one line per setting and G, each seed's numbers) and beside it a PNG: accuracy
against G, one line per setting, error bars min / max over seeds, the SFT mean dashed.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from grpo_jax.experiments import plots, runs
from grpo_jax.pipeline.metrics import read_metrics
from grpo_jax.pipeline.stats import wilson_counts, wilson_interval
from grpo_jax.pipeline.workdir import read_json

EQUAL_STEPS, EQUAL_TOKENS = 'equal steps', 'equal sampled tokens'


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (config.seed).', flag_values=fv)
  flags.DEFINE_string('root', '/tmp/group_size', 'Where the runs go: <root>/seed<S>/...', flag_values=fv)
  flags.DEFINE_list('group_sizes', ['2', '4', '8', '16', '32'], 'The G values.', flag_values=fv)
  flags.DEFINE_string('out', None, 'JSONL of the results (default <root>/group_size.jsonl); the PNG beside it.',
                      flag_values=fv)


def sweep_plan(num_prompts: int, group_size: int, group_sizes: Sequence[int]) -> list[dict[str, Any]]:
  """Each G's two runs: {'setting', 'group_size', 'num_prompts', 'exact'}. Equal steps keeps num_prompts; equal
  tokens keeps num_prompts * group_size completions per step: num_prompts' = round(num_prompts * group_size / G),
  halves up, at least 1 ('exact' says whether G divides the budget)."""
  budget = num_prompts * group_size
  plan = []
  for g in group_sizes:
    p = max(1, math.floor(budget / g + 0.5))
    plan += [{'setting': EQUAL_STEPS, 'group_size': g, 'num_prompts': num_prompts, 'exact': True},
             {'setting': EQUAL_TOKENS, 'group_size': g, 'num_prompts': p, 'exact': p * g == budget}]
  return plan


def collect(workdir: str, run: dict) -> dict[str, Any]:
  """A GRPO run's held-out accuracy and interval, steps and what it sampled (completions; tokens, from the logged
  mean completion length of each step)."""
  summary = runs.read_summary(workdir) if run['status'] == 0 else None
  if summary is None:
    return {'accuracy': None, 'note': runs.failure(workdir, run['status'])}
  stages = runs.rl_stages(workdir)
  correct = runs.stage_correct(workdir, stages[-1]) if stages else None
  rows = [r for s in stages for r in read_metrics(workdir, s)]
  cfg = read_json(os.path.join(workdir, 'config.json'))
  rows_per_step = cfg['rl']['num_prompts'] * cfg['rl']['group_size']
  lens = [r['completion_len'] for r in rows if isinstance(r.get('completion_len'), (int, float))]
  return {'accuracy': summary['rl_accuracy'], 'ci95': None if correct is None else list(wilson_interval(correct)),
          'solved': None if correct is None else int(correct.sum()),
          'problems': None if correct is None else int(correct.size),
          'sft_accuracy': summary['sft_accuracy'], 'steps': summary['rl_steps'],
          'sampled_tokens': float(np.mean(lens)) * rows_per_step * summary['rl_steps'] if lens else None,
          'wall_s': run['wall_s'], 'peak_rss_mb': run['peak_rss_mb'], 'note': ''}


def summarize(plan: Sequence[dict[str, Any]], results: dict[tuple[int, int, int], dict[str, Any]],
              seeds: Sequence[int]) -> list[dict[str, Any]]:
  """One row per planned (setting, G): accuracy mean / min / max over the seeds that finished, each seed's result.
  results[(seed, G, P)] is collect's record."""
  out = []
  for item in plan:
    g, p = item['group_size'], item['num_prompts']
    per_seed = [{'seed': s, **results[s, g, p]} for s in seeds if (s, g, p) in results]
    done = [r for r in per_seed if r['accuracy'] is not None]
    accs = [r['accuracy'] for r in done]
    scored = [r for r in done if r.get('problems')]
    k, n = sum(r['solved'] for r in scored), sum(r['problems'] for r in scored)
    out.append({**item, 'completions_per_step': g * p, 'seeds': [r['seed'] for r in done],
                'accuracy_mean': sum(accs) / len(accs) if accs else None, 'accuracy_min': min(accs, default=None),
                'accuracy_max': max(accs, default=None), 'pooled_ci95': list(wilson_counts(k, n)) if n else None,
                'per_seed': per_seed})
  return out


def plot(rows: Sequence[dict[str, Any]], path: str, *, sft_accuracy: float | None, num_steps: int) -> str:
  lines = {}
  for setting in (EQUAL_STEPS, EQUAL_TOKENS):
    pts = [(r['group_size'], 100 * r['accuracy_mean'], 100 * r['accuracy_min'], 100 * r['accuracy_max'])
           for r in rows if r['setting'] == setting and r['accuracy_mean'] is not None]
    budget = {r['completions_per_step'] for r in rows if r['setting'] == setting}
    lines[f'{setting} ({"P fixed" if setting == EQUAL_STEPS else "P x G ~ " + str(max(budget))})'] = pts
  return plots.plot_sweep(lines, path, xlabel='group size G', ylabel='held-out accuracy (%)',
                          title=f'GRPO, {num_steps} steps from one SFT checkpoint per seed (bars: min / max, seeds)',
                          baseline=None if sft_accuracy is None else ('SFT (mean over seeds)', 100 * sft_accuracy))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Run (or resume) the sweep, write the JSONL and the plot; returns the rows."""
  program = 'python -m grpo_jax.experiments.group_size'
  fv, cfg, config, overrides = runs.parse_flags(sys.argv if argv is None else argv, program, define_flags)
  try:
    seeds, group_sizes = [int(s) for s in fv.seeds], [int(g) for g in fv.group_sizes]
  except ValueError:
    raise SystemExit(f'{program}: --seeds and --group_sizes take integers') from None
  if min(group_sizes) < 2 or cfg.rl.num_steps <= 0:
    raise SystemExit(f'{program}: need every G >= 2 (a group of one has no advantage) and rl.num_steps > 0')
  plan = sweep_plan(cfg.rl.num_prompts, cfg.rl.group_size, group_sizes)
  for item in plan:
    if not item['exact']:
      print(f"{EQUAL_TOKENS}: G={item['group_size']} does not divide {cfg.rl.num_prompts * cfg.rl.group_size}: "
            f"{item['num_prompts']} prompts per step ({item['num_prompts'] * item['group_size']} completions)")
  keep = [o for o in overrides if o.split('=', 1)[0] not in
          ('--config.seed', '--config.rl.group_size', '--config.rl.num_prompts')]
  results, sft_accs = {}, []
  for seed in seeds:
    base = os.path.join(fv.root, f'seed{seed}')
    common = [*keep, f'--config.seed={seed}']
    sft_dir = os.path.join(base, 'sft')
    sft_args = [*[o for o in common if not o.startswith('--config.rl.num_steps=')], '--config.rl.num_steps=0']
    sft = runs.launch(sft_dir, config, sft_args)
    if sft['status'] != 0:
      print(f'seed {seed}: the SFT run failed (see {sft_dir}.log); its GRPO runs are skipped')
      continue
    sft_accs.append(runs.read_summary(sft_dir)['sft_accuracy'])
    for g, p in dict.fromkeys((item['group_size'], item['num_prompts']) for item in plan):
      workdir = os.path.join(base, f'G{g}_P{p}')
      args = [*common, f'--config.rl.group_size={g}', f'--config.rl.num_prompts={p}', '--allow_config_change=rl']
      run = runs.launch(workdir, config, args, sft_from=sft_dir if cfg.sft.max_steps > 0 else None)
      results[seed, g, p] = collect(workdir, run)
  rows = summarize(plan, results, seeds)
  out = fv.out or os.path.join(fv.root, 'group_size.jsonl')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  png = plot(rows, os.path.splitext(out)[0] + '.png', sft_accuracy=sum(sft_accs) / len(sft_accs) if sft_accs else None,
             num_steps=cfg.rl.num_steps)
  for r in rows:
    acc = '-' if r['accuracy_mean'] is None else (
        f"{100 * r['accuracy_mean']:.1f} [{100 * r['accuracy_min']:.1f}, {100 * r['accuracy_max']:.1f}]")
    ci = '' if r['pooled_ci95'] is None else (
        f" (95% CI, seeds pooled: {100 * r['pooled_ci95'][0]:.1f}-{100 * r['pooled_ci95'][1]:.1f})")
    print(f"{r['setting']:<22} G={r['group_size']:<3} P={r['num_prompts']:<4} acc % mean [min, max] {acc}{ci}")
  print(f'rows: {out}\nplot: {png}')
  return rows


if __name__ == '__main__':
  main()
