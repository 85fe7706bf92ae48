"""Training runs as fresh processes, and what an experiment reads back from their workdirs.

Each run is `python -m grpo_jax.train --config <file[:preset]> --workdir <dir> <overrides>` in a process of its own, so
its wall time and peak RSS (os.wait4's ru_maxrss: the process's peak resident host memory) are its own, compiles and
evaluations included. A finished run leaves <workdir>/run.json (exit status 0, wall time, peak RSS) beside its
summary.json; launching it again reads them instead of training, so an interrupted experiment resumes when rerun with
the same flags. An unfinished run starts again from scratch, so that its wall time and peak memory are one process's.
A run continuing from an SFT stage starts from a copy of that stage (copy_sft); the stage loop skips a finished stage.
Stage names come from the stage table (pipeline/stages.py); summaries are read through `read_summary`, which renames
the RL stage's keys of results written before they were rl_* (stages.upgrade_summary).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags
from ml_collections import config_flags

from grpo_jax.models import flops
from grpo_jax.pipeline import checkpoint, stages
from grpo_jax.pipeline.config_checks import HELP_FLAGS
from grpo_jax.pipeline.metrics import read_metrics
from grpo_jax.pipeline.setup import tokenizer_and_model_config
from grpo_jax.pipeline.workdir import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: configs/ is here
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'default.py')
RUN_FILE = 'run.json'


def train_process(config: str, workdir: str, args: Sequence[str], log: str) -> tuple[int, float, float]:
  """(exit status, wall seconds, peak RSS in MB) of one `python -m grpo_jax.train` process; its output goes to log."""
  cmd = [sys.executable, '-m', 'grpo_jax.train', '--config', config, '--workdir', workdir, *args]
  start = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
  return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def copy_sft(src: str, dst: str) -> None:
  """A workdir holding only src's finished SFT stage (and its initial evaluation, config record and metrics)."""
  os.makedirs(os.path.join(dst, 'checkpoints'), exist_ok=True)
  sft = stages.SFT.name
  shutil.copytree(os.path.join(src, 'checkpoints', sft), os.path.join(dst, 'checkpoints', sft))
  for name in ('init_eval.json', 'config.json', 'config_history.jsonl'):
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), dst)
  with open(os.path.join(dst, 'metrics.jsonl'), 'w') as g:
    g.writelines(json.dumps(r) + '\n' for r in read_metrics(src, sft))


def finished(workdir: str) -> dict | None:
  """The run.json of a run that finished (status 0, summary.json written), else None."""
  run = read_json(os.path.join(workdir, RUN_FILE))
  if run is None or run.get('status') != 0 or not os.path.exists(os.path.join(workdir, 'summary.json')):
    return None
  return run


def launch(workdir: str, config: str, args: Sequence[str], *, sft_from: str | None = None) -> dict:
  """Train in `workdir` (from a copy of sft_from's SFT stage when given) unless a finished run is there.

  Returns run.json: {'status', 'wall_s', 'peak_rss_mb', 'args', 'reused'}; the log is <workdir>.log."""
  done = finished(workdir)
  if done is not None:
    return {**done, 'reused': True}
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  if sft_from:
    copy_sft(sft_from, workdir)
  print(f'--- {workdir}: training ({" ".join(args)})', flush=True)
  status, wall, rss = train_process(config, workdir, args, workdir + '.log')
  run = {'status': status, 'wall_s': wall, 'peak_rss_mb': rss, 'args': list(args)}
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, RUN_FILE), run, indent=2)
  if status != 0:
    print(f'--- {workdir}: exit status {status}; see {workdir}.log', flush=True)
  return {**run, 'reused': False}


def failure(workdir: str, status: int) -> str:
  """A failed run's note: its exit status and the last line of its log (the trainer's one-line error)."""
  try:
    with open(workdir + '.log', errors='replace') as f:
      last = next((line.strip() for line in reversed(f.readlines()) if line.strip()), '')
  except OSError:
    last = ''
  return f'failed (exit status {status}, {workdir}.log){": " + last[-300:] if last else ""}'


def read_summary(workdir: str) -> dict[str, Any] | None:
  """<workdir>/summary.json (None when absent), its RL results under rl_* keys whenever it was written."""
  summary = read_json(os.path.join(workdir, 'summary.json'))
  return None if summary is None else stages.upgrade_summary(summary)


def rl_stages(workdir: str) -> list[str]:
  """The RL stages with checkpoints ('grpo', 'ppo', or 'grpo_1', 'grpo_2', ...), outer iterations in order."""
  return stages.rl_folders(checkpoint.stage_folders(workdir))


def stage_correct(workdir: str, stage: str) -> np.ndarray | None:
  """[n] bool: which held-out problems the stage's final policy solved (verifier score >= 1), from the checkpoint
  meta the stage loop saves with its summary; None when the stage did not finish or kept no scores."""
  meta = checkpoint.read_meta(checkpoint.manager(workdir, stage, max_to_keep=1_000_000))
  scores = ((meta or {}).get('summary') or {}).get('test_scores')
  return None if scores is None else np.asarray(scores) >= 1


def logged_flops(workdir: str, stages: Sequence[str]) -> float | None:
  """Model FLOPs the stages logged ('model_flops', one value per logged step): each stage's mean over its logged
  steps times its steps (the sum when every step is logged); None when none was logged."""
  total, found = 0.0, False
  for stage in stages:
    rows = read_metrics(workdir, stage)
    values = [r['model_flops'] for r in rows if isinstance(r.get('model_flops'), (int, float))]
    if values:
      total += float(np.mean(values)) * max(int(r['step']) for r in rows)
      found = True
  return total if found else None


def sft_step_flops(model_cfg: flops.ModelConfig, *, batch_size: int, prompt_len: int, completion_len: int) -> float:
  """Model FLOPs of one SFT step: forward and backward (3 forwards) over [batch_size, prompt_len + completion_len]
  tokens, padding included as in GRPO's logged count (its policy update runs over the padded widths too)."""
  return 3.0 * flops.forward_flops(model_cfg, batch=batch_size, new_tokens=prompt_len + completion_len)


def matched_sft_steps(rl_flops: float, step_flops: float) -> int:
  """Extra SFT steps whose model FLOPs equal the RL stage's: rl_flops / step_flops rounded to the nearest step,
  at least 1. Evaluation (SFT's validation, both stages' held-out decoding) counts on neither side."""
  if step_flops <= 0 or not math.isfinite(rl_flops) or rl_flops < 0:
    raise ValueError(f'need step_flops > 0 and a finite rl_flops >= 0, got {step_flops}, {rl_flops}')
  return max(1, math.floor(rl_flops / step_flops + 0.5))


def config_sft_step_flops(cfg) -> float:
  """sft_step_flops for the run config's model (built from its tokenizer or model.path's config.json, no
  weights), SFT batch and sequence widths."""
  _, model_cfg = tokenizer_and_model_config(cfg)
  return sft_step_flops(model_cfg, batch_size=cfg.sft.batch_size, prompt_len=cfg.max_prompt_len,
                        completion_len=cfg.max_new_tokens)


def format_value(value: Any) -> str:
  """A config value as a --config.<key>=<value> override spells it."""
  return str(value) if isinstance(value, (bool, int, float, str)) else repr(value)


def _flat(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def preset_overrides(config: str) -> list[str] | None:
  """What a preset ('configs/default.py:ppo') changes against its file's plain config, as --config overrides to put
  on top of any other config (e.g. the tiny preset); None when the file has no such preset."""
  path, _, preset = config.partition(':')
  spec = importlib.util.spec_from_file_location('_experiment_preset', path)
  if not preset or spec is None or not os.path.exists(path):
    return None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    changed = _flat(module.get_config(preset).to_dict())
  except ValueError:  # the file's "unknown preset" error
    return None
  base = _flat(module.get_config().to_dict())
  return [f'--config.{k}={format_value(v)}' for k, v in changed.items() if base.get(k, object()) != v]


def parse_flags(argv: Sequence[str], program: str, define: Callable[[flags.FlagValues], None]):
  """An experiment's flags: --config (path[:preset], default configs/default.py) with its --config.<key>=<value>
  overrides, and those `define` adds. Returns (flag values, the resolved config, the config argument with an
  absolute path, the overrides as arguments for every run). A bad flag or override exits naming `program`."""
  fv = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Config file (path[:preset]); --config.<key>=<value> '
                                    'overrides go to every run.', flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    define(fv)
    if HELP_FLAGS.intersection(argv[1:]):  # absl's own help flags print absl.FLAGS', not fv's
      print(f'{sys.modules[define.__module__].__doc__ or program}\nflags:\n{fv.get_help(include_special_flags=False)}')
      raise SystemExit(0)
    rest = fv(list(argv))
    cfg = fv.config
  except (flags.Error, KeyError, AttributeError, ValueError, FileNotFoundError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    raise SystemExit(f'{program}: {str(e.args[0] if e.args else e).splitlines()[0]}') from None
  if len(rest) > 1:
    raise SystemExit(f'{program}: unexpected arguments {rest[1:]}')
  path, sep, preset = fv['config'].config_filename.partition(':')
  config = os.path.abspath(path) + sep + preset
  overrides = [f'--config.{k}={format_value(v)}'
               for k, v in config_flags.get_override_values(fv['config']).items()]
  return fv, cfg, config, overrides
