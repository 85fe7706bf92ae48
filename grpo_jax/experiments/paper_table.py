r"""The paper's comparison in one command: SFT, SFT -> GRPO, SFT -> PPO, and SFT continued for the RL stage's FLOPs.

  python -m grpo_jax.experiments.paper_table --seeds 0,1,2 --root /tmp/paper_table       # the embedded task
  python -m grpo_jax.experiments.paper_table --config configs/default.py:tiny --seeds 0   # a smoke run (minutes)
  python -m grpo_jax.experiments.paper_table --config configs/gsm8k_hf.py --config.model.path=/models/x --seeds 0

Per seed, in <root>/seed<S>/, each a fresh `python -m grpo_jax.train` process (runs.py; rerun to resume):
  sft          the config with rl.num_steps=0: the SFT stage alone, shared by the rows below
  grpo         the config, from a copy of sft's SFT checkpoint
  ppo          the same with what --ppo_preset changes (configs/default.py:ppo), from the same copy; the row says
               'skipped' when the config file has no such preset
  sft_matched  the compute-matched control: SFT with E more steps, where E = round(F_rl / F_sft) (at least 1),
               F_rl the model FLOPs the GRPO stage logged (metrics.jsonl 'model_flops', summed over its steps) and
               F_sft one SFT step's model FLOPs (runs.sft_step_flops: 3 forwards over the SFT batch's padded
               [batch, prompt + completion] tokens, the convention of GRPO's count). Evaluation counts on neither side.
               --control=continue (default) resumes sft's checkpoint with sft.max_steps = S + E: the same starting
               point as GRPO; its cosine schedule is re-read over S + E steps, so the learning rate restarts from
               lr * (1 + cos(pi S / (S + E))) / 2. --control=scratch trains S + E SFT steps from the start
               (configs/default.py:sft_matched's kind of control: the same total compute as SFT + GRPO).
Every --config.<key>=<value> goes to every run (a later one wins: the PPO preset's changes come first).

The table: per row, held-out accuracy mean [min, max] over seeds, the Wilson 95% interval pooled over all seeds'
problems, each run's own interval, the exact McNemar p-value against the same seed's SFT on the same problems, steps,
wall time (the whole process: compiles and evaluations included; for the continuing rows, not the shared SFT),
model FLOPs (for the continuing rows, beyond the shared SFT checkpoint) and peak RSS of the process. Written to
--out (JSONL, one line per row with each seed's numbers) and beside it as markdown (.md).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from grpo_jax.experiments import runs
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.stats import mcnemar, wilson_counts, wilson_interval
from grpo_jax.pipeline.workdir import read_json

SFT, GRPO, PPO, CONTROL = 'SFT', 'GRPO', 'PPO', 'SFT compute-matched'
ROWS = (SFT, GRPO, PPO, CONTROL)
WORKDIRS = {SFT: 'sft', GRPO: 'grpo', PPO: 'ppo', CONTROL: 'sft_matched'}
PPO_PRESET = runs.DEFAULT_CONFIG + ':ppo'


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (config.seed); every row runs on each.', flag_values=fv)
  flags.DEFINE_string('root', '/tmp/paper_table', 'Where the runs go: <root>/seed<S>/<row>.', flag_values=fv)
  flags.DEFINE_string('ppo_preset', PPO_PRESET, "The preset whose changes make the PPO run ('' = no PPO row).",
                      flag_values=fv)
  flags.DEFINE_enum('control', 'continue', ['continue', 'scratch'], "The compute-matched SFT: 'continue' from the "
                    "SFT checkpoint, or 'scratch' (S + E steps from the start).", flag_values=fv)
  flags.DEFINE_string('out', None, 'JSONL of the rows (default <root>/paper_table.jsonl); the markdown beside it.',
                      flag_values=fv)


def _without(overrides: Sequence[str], *keys: str) -> list[str]:
  return [o for o in overrides if o.split('=', 1)[0].removeprefix('--config.') not in keys]


def _sections(overrides: Sequence[str]) -> list[str]:
  """The config sections a run's overrides change: what it may change against the copied SFT stage's config."""
  return sorted({'rl', *(o.removeprefix('--config.').split('.')[0] for o in overrides)})


def collect(name: str, seed: int, workdir: str, run: dict | None, *, sft_step_flops: float,
            sft_steps: int | None = None, note: str = '') -> dict[str, Any]:
  """One run's record: accuracy, per-problem correctness, steps, model FLOPs, wall time and peak RSS.

  SFT-only runs (SFT, the control) report sft_accuracy; their FLOPs are steps * sft_step_flops, counted from
  sft_steps (the shared SFT's steps) for the control. The RL rows report rl_accuracy and the FLOPs they logged."""
  rec = {'row': name, 'seed': seed, 'workdir': workdir, 'status': None if run is None else run['status'],
         'wall_s': None, 'peak_rss_mb': None, 'accuracy': None, 'correct': None, 'steps': None, 'flops': None,
         'note': note}
  if run is None:
    return rec
  rec.update(wall_s=run['wall_s'], peak_rss_mb=run['peak_rss_mb'])
  summary = runs.read_summary(workdir) if run['status'] == 0 else None
  if summary is None:
    rec['note'] = note or runs.failure(workdir, run['status'])
    return rec
  if name in (SFT, CONTROL):
    steps = summary['sft_steps']
    correct = runs.stage_correct(workdir, stages.SFT.name) if steps else None
    if correct is None:  # no SFT stage (sft.max_steps=0): the loaded model's evaluation
      scores = (read_json(os.path.join(workdir, 'init_eval.json')) or {}).get('scores')
      correct = None if scores is None else np.asarray(scores) >= 1
    rec.update(accuracy=summary['sft_accuracy'], steps=steps, flops=(steps - (sft_steps or 0)) * sft_step_flops)
    if name == CONTROL and sft_steps is not None and steps <= sft_steps:
      rec['note'] = note or 'SFT did not continue: its stage had stopped early (sft.target_accuracy)'
  else:
    rl = runs.rl_stages(workdir)
    correct = runs.stage_correct(workdir, rl[-1]) if rl else None
    rec.update(accuracy=summary['rl_accuracy'], steps=summary['rl_steps'], flops=runs.logged_flops(workdir, rl))
    if rec['flops'] is None:
      rec['note'] = note or f"its stage ({', '.join(rl)}) logged no model_flops"
  rec['correct'] = None if correct is None else correct.astype(int).tolist()
  return rec


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The table's rows from the runs' records (collect), in ROWS order; a row no record names is left out.

  Per row: accuracy mean / min / max over the seeds that finished; the Wilson 95% interval of all their problems
  pooled; per seed its accuracy, own interval, McNemar p against that seed's SFT (same problems), steps, FLOPs, wall
  and peak RSS; means of wall and FLOPs, the largest peak RSS; notes of the runs that did not finish."""
  sft = {r['seed']: r for r in records if r['row'] == SFT and r['correct'] is not None}
  out = []
  for name in ROWS:
    recs = [r for r in records if r['row'] == name]
    if not recs:
      continue
    ok = [r for r in recs if r['accuracy'] is not None]
    per_seed = []
    for r in ok:
      c, base = r['correct'], sft.get(r['seed'])
      paired = name != SFT and c is not None and base is not None and len(base['correct']) == len(c)
      per_seed.append({'seed': r['seed'], 'accuracy': r['accuracy'],
                       'ci95': None if not c else list(wilson_interval(np.asarray(c))),
                       'mcnemar_p_vs_sft': mcnemar(np.asarray(c), np.asarray(base['correct']))['p_value'] if paired
                       else None,
                       **{k: r[k] for k in ('steps', 'flops', 'wall_s', 'peak_rss_mb')}})
    accs = [r['accuracy'] for r in ok]
    scored = [r['correct'] for r in ok if r['correct']]
    k, n = sum(sum(c) for c in scored), sum(len(c) for c in scored)
    known = {key: [s[key] for s in per_seed if s[key] is not None] for key in ('wall_s', 'flops', 'peak_rss_mb')}
    out.append({'row': name, 'seeds': [r['seed'] for r in ok],
                'accuracy_mean': _mean(accs),
                'accuracy_min': min(accs, default=None), 'accuracy_max': max(accs, default=None),
                'pooled_ci95': list(wilson_counts(k, n)) if n else None, 'per_seed': per_seed,
                'wall_s_mean': _mean(known['wall_s']), 'flops_mean': _mean(known['flops']),
                'peak_rss_mb_max': max(known['peak_rss_mb'], default=None),
                'notes': sorted({f"seed {r['seed']}: {r['note']}" for r in recs if r['note']})})
  return out


def _pct(v: float | None) -> str:
  return '-' if v is None else f'{100 * v:.1f}'


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The table in markdown: one line per row, then its notes."""
  head = ('| | held-out acc % mean [min, max] | 95% CI (pooled) | 95% CI per seed | McNemar p vs SFT per seed | '
          'steps | wall (s) | FLOPs | peak RSS (MB) |')
  lines = [head, '|---' * 9 + '|']
  for r in rows:
    s = r['per_seed']
    acc = '-' if r['accuracy_mean'] is None else (f"{_pct(r['accuracy_mean'])} [{_pct(r['accuracy_min'])}, "
                                                  f"{_pct(r['accuracy_max'])}]")
    pooled = '-' if r['pooled_ci95'] is None else f"{_pct(r['pooled_ci95'][0])}-{_pct(r['pooled_ci95'][1])}"
    each = ', '.join(f"{_pct(x['ci95'][0])}-{_pct(x['ci95'][1])}" if x['ci95'] else '-' for x in s) or '-'
    p = ', '.join('-' if x['mcnemar_p_vs_sft'] is None else f"{x['mcnemar_p_vs_sft']:.3g}" for x in s) or '-'
    steps = ', '.join('-' if x['steps'] is None else str(x['steps']) for x in s) or '-'
    wall = '-' if r['wall_s_mean'] is None else f"{r['wall_s_mean']:.0f}"
    fl = '-' if r['flops_mean'] is None else f"{r['flops_mean']:.3g}"
    rss = '-' if r['peak_rss_mb_max'] is None else f"{r['peak_rss_mb_max']:.0f}"
    lines.append(f"| {r['row']} | {acc} | {pooled} | {each} | {p} | {steps} | {wall} | {fl} | {rss} |")
  notes = [f"{r['row']}, {n}" for r in rows for n in r['notes']]
  return '\n'.join(lines + ([''] + [f'- {n}' for n in notes] if notes else []))


def run_seed(seed: int, cfg, config: str, overrides: Sequence[str], *, root: str, ppo: list[str] | None,
             ppo_missing: str, control: str, sft_step_flops: float) -> list[dict[str, Any]]:
  """The four rows' runs of one seed (each launched unless finished); their records."""
  base = os.path.join(root, f'seed{seed}')
  wd = {name: os.path.join(base, d) for name, d in WORKDIRS.items()}
  seed_arg = f'--config.seed={seed}'
  common = [*_without(overrides, 'seed'), seed_arg]
  sft_only = [*_without(common, 'rl.num_steps'), '--config.rl.num_steps=0']
  has_sft = cfg.sft.max_steps > 0
  records = [collect(SFT, seed, wd[SFT], runs.launch(wd[SFT], config, sft_only), sft_step_flops=sft_step_flops)]
  sft_rec = records[0]
  if sft_rec['accuracy'] is None:
    return records + [collect(n, seed, wd[n], None, sft_step_flops=0, note='not run: the SFT run failed')
                      for n in (GRPO, PPO, CONTROL)]
  sft_from = wd[SFT] if has_sft else None
  grpo = runs.launch(wd[GRPO], config, [*common, '--allow_config_change=rl'], sft_from=sft_from)
  records.append(collect(GRPO, seed, wd[GRPO], grpo, sft_step_flops=sft_step_flops))
  if ppo is None:
    records.append(collect(PPO, seed, wd[PPO], None, sft_step_flops=0, note=ppo_missing))
  else:
    args = [*ppo, *common, f'--allow_config_change={",".join(_sections(ppo))}']
    records.append(collect(PPO, seed, wd[PPO], runs.launch(wd[PPO], config, args, sft_from=sft_from),
                           sft_step_flops=sft_step_flops))
  rl_flops = records[1]['flops']
  if not has_sft:
    note = 'not run: no SFT stage to continue (sft.max_steps=0)'
  elif rl_flops is None:
    note = 'not run: the GRPO run logged no FLOPs (it failed?)'
  else:
    note = ''
  if note:
    records.append(collect(CONTROL, seed, wd[CONTROL], None, sft_step_flops=0, note=note))
    return records
  steps = sft_rec['steps'] + runs.matched_sft_steps(rl_flops, sft_step_flops)
  args = [*_without(sft_only, 'sft.max_steps'), f'--config.sft.max_steps={steps}']
  if control == 'continue':
    run = runs.launch(wd[CONTROL], config, [*args, '--allow_config_change=sft.max_steps'], sft_from=wd[SFT])
  else:
    run = runs.launch(wd[CONTROL], config, args)
  records.append(collect(CONTROL, seed, wd[CONTROL], run, sft_step_flops=sft_step_flops,
                         sft_steps=sft_rec['steps']))
  return records


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Run (or resume) every seed's runs, print the table and write it; returns the rows."""
  program = 'python -m grpo_jax.experiments.paper_table'
  fv, cfg, config, overrides = runs.parse_flags(sys.argv if argv is None else argv, program, define_flags)
  if cfg.rl.num_steps <= 0:
    raise SystemExit(f'{program}: the config has no RL stage (rl.num_steps={cfg.rl.num_steps}); GRPO and PPO need one')
  try:
    seeds = [int(s) for s in fv.seeds]
  except ValueError:
    raise SystemExit(f'{program}: --seeds takes integers, got {",".join(fv.seeds)}') from None
  ppo = runs.preset_overrides(fv.ppo_preset) if fv.ppo_preset else None
  ppo_missing = ('skipped: --ppo_preset is empty' if not fv.ppo_preset else
                 f'skipped: {fv.ppo_preset} is not a preset of its config file (no PPO in this checkout?)')
  step_flops = runs.config_sft_step_flops(cfg)
  records = []
  for seed in seeds:
    records += run_seed(seed, cfg, config, overrides, root=fv.root, ppo=ppo, ppo_missing=ppo_missing,
                        control=fv.control, sft_step_flops=step_flops)
  rows = summarize(records)
  table = markdown(rows)
  out = fv.out or os.path.join(fv.root, 'paper_table.jsonl')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(table + '\n')
  print(f'\n{table}\n\nrows: {out}')
  return rows


if __name__ == '__main__':
  main()
