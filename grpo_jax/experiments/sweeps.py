"""Seed sweeps of config variants (iterative_rl, default_seeds, prefix_credit): their common flags, fresh runs and
the JSON lines they append.

Unlike paper_table and group_size (runs.launch: a rerun reuses finished runs), a sweep's run starts from scratch in
<root>/seed<S>/<variant> every time and appends one JSON line to --out; its table keeps the last line of each
(variant, seed), so rerunning a variant replaces it.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from absl import flags

from grpo_jax.experiments import runs
from grpo_jax.pipeline import stages

# Printed for each run as it finishes: enough to follow a sweep without opening --out.
SHOWN = ('variant', 'seed', 'status', 'sft_accuracy', 'rl_accuracy', 'rl_win_rate_vs_sft', 'wall_s', 'peak_rss_mb')


def define_flags(fv: flags.FlagValues, *, name: str, seeds: str, variants: Sequence[str]) -> None:
  """--seeds, --root (/tmp/<name>), --out (benchmarks/<name>.jsonl in the checkout), --variants and --table."""
  flags.DEFINE_list('seeds', seeds.split(','), 'Seeds (config.seed); every variant runs on each.', flag_values=fv)
  flags.DEFINE_string('root', f'/tmp/{name}', 'Where the runs go: <root>/seed<S>/<variant>.', flag_values=fv)
  flags.DEFINE_string('out', os.path.join(runs.ROOT, 'benchmarks', f'{name}.jsonl'),
                      'JSONL each run appends its line to.', flag_values=fv)
  flags.DEFINE_list('variants', list(variants), 'The variants to run, in this order.', flag_values=fv)
  flags.DEFINE_list('table', None, "Print the markdown table of these JSONL files and exit (--table='' : of --out).",
                    flag_values=fv)


def int_list(values: Iterable[str], flag: str, program: str) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise SystemExit(f'{program}: --{flag} takes integers') from None


def check_variants(wanted: Sequence[str], known: Iterable[str], program: str) -> None:
  unknown = [v for v in wanted if v not in known]
  if unknown:
    raise SystemExit(f'{program}: unknown variants {unknown}; known: {sorted(known)}')


def with_preset(config: str, preset: str) -> str:
  """The config file of `config` (path[:preset]) with another preset; '' keeps `config` as it is."""
  return f'{config.partition(":")[0]}:{preset}' if preset else config


def train_fresh(workdir: str, config: str, args: Sequence[str], *,
                sft_from: str | None = None) -> tuple[int, float, float]:
  """(exit status, wall seconds, peak RSS in MB) of a run from scratch in `workdir` (from a copy of sft_from's
  finished SFT stage when given); its log is <workdir>.log."""
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  if sft_from:
    runs.copy_sft(sft_from, workdir)
  return runs.train_process(config, workdir, args, workdir + '.log')


def summary_fields(workdir: str) -> dict[str, Any]:
  """The run's summary.json (RL results under rl_* keys) without its sample completions ({} when it wrote none)."""
  summary = runs.read_summary(workdir) or {}
  return {k: v for k, v in summary.items() if not k.endswith('_sample')}


def record(out: str, row: dict[str, Any]) -> None:
  """Append the run's line to `out` and print its headline numbers."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'a') as f:
    f.write(json.dumps(row) + '\n')
  print(json.dumps({k: row[k] for k in SHOWN if k in row}), flush=True)


def finished_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
  """The lines of runs that finished (status 0), the last one of each (variant, seed): a rerun replaces. Lines
  written before the RL results were named rl_* read as if they were."""
  rows = [stages.upgrade_summary(json.loads(line)) for p in paths for line in open(p) if line.strip()]
  return list({(r['variant'], r['seed']): r for r in rows if r['status'] == 0}.values())
