"""The stage loop, algorithm-free: resume, step, log, checkpoint, stop on a signal or when the stage says so.

A stage is data (`Stage`): a name, a step count, its state as trees named by role ('policy', 'reference', ...)
and a plain `step(state, i) -> (state, metrics)`. Its module (sft.py, grpo.py) builds it; run.py runs stages in
sequence through `run_stage`, which knows nothing of what they train.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from grpo_jax.models import flops
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import checkpoint
from grpo_jax.pipeline.metrics import MetricWriter

PROGRESS_KEYS = ('nll', 'val_accuracy', 'reward', 'kl', 'clip_frac')  # shown on the progress bar


class Interrupt:
  """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step and exits."""

  def __init__(self):
    self.signal = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal is not None:  # a second signal: stop now, without the checkpoint
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __bool__(self):
    return self.signal is not None


def never(metrics: dict[str, Any]) -> bool:
  return False


class Stage(NamedTuple):
  """One stage of a run.

  name: its checkpoint folder (<workdir>/checkpoints/<name>) and the 'stage' of its metric rows; unique in a run.
  num_steps: steps to run (fewer if `should_stop` says so).
  state: role -> pytree (e.g. {'policy': TrainState, 'reference': params}): the checkpointed items, each a
    container of arrays (Orbax saves no bare array as an item); on resume their shapes, dtypes and shardings are
    the restore targets.
  step: (state, i) -> (state, metrics) for step i (0-based); metrics is a flat dict of scalars.
  finish: state -> summary dict, after the last step (e.g. the held-out evaluation); saved with the checkpoint.
  should_stop: metrics of a step -> stop early (after saving).
  meta: JSON written with every checkpoint (model config, LoRA, RNG), compared by the caller before resuming.
  """
  name: str
  num_steps: int
  state: dict[str, Any]
  step: Callable[[dict[str, Any], int], tuple[dict[str, Any], dict[str, Any]]]
  finish: Callable[[dict[str, Any]], dict[str, Any]]
  should_stop: Callable[[dict[str, Any]], bool] = never
  meta: dict[str, Any] = {}


class Sinks(NamedTuple):
  """Where the loop writes: checkpoints, metrics, and how often."""
  workdir: str
  writer: MetricWriter
  interrupt: Interrupt
  log_every: int
  checkpoint_every: int
  checkpoint_keep: int
  compute_dtype: str = 'float32'  # for the FLOP rates of stages that report 'model_flops'


def run_stage(stage: Stage, sinks: Sinks) -> tuple[dict[str, Any], dict[str, Any]]:
  """Run `stage` to its end, resuming from its latest checkpoint. Returns (final state, summary).

  A finished stage is not run again: its state is restored and its saved summary returned. On SIGTERM / SIGINT
  the state is saved after the current step and the process exits (rerun the same command to resume).
  """
  mngr = checkpoint.manager(sinks.workdir, stage.name, max_to_keep=sinks.checkpoint_keep)
  state = stage.state
  meta = checkpoint.read_meta(mngr)
  step, wall, stop = 0, 0.0, False
  if meta is not None:
    state = checkpoint.restore(mngr, meta['step'], state)
    step, wall, stop = meta['step'], meta['wall_time'], meta['stopped']
    if meta['finished']:
      return state, meta['summary']
    distributed.print0(f'{stage.name}: resuming from step {step}')
  sinks.writer.rewind(stage.name, step)

  def save(finished=False, summary=None):
    meta = {'stage': stage.name, 'step': step, 'wall_time': wall + time.perf_counter() - start,
            'finished': finished, 'stopped': stop, 'summary': summary, 'data_position': step, **stage.meta}
    checkpoint.save(mngr, step, state, meta)

  distributed.print0(f'\n=== {stage.name}: steps {step} -> {stage.num_steps} ===')
  start = time.perf_counter()
  bar = tqdm(total=stage.num_steps, initial=step, desc=stage.name, dynamic_ncols=True,
             disable=not distributed.is_main_process())
  while step < stage.num_steps and not stop:
    t0 = time.perf_counter()
    state, metrics = stage.step(state, step)
    step += 1
    stop = stage.should_stop(metrics)
    if step % sinks.log_every == 0 or stop or step == stage.num_steps:
      metrics = {k: float(v) if np.ndim(v) == 0 else v for k, v in jax.device_get(metrics).items()}
      metrics['step_time'] = time.perf_counter() - t0
      if 'model_flops' in metrics:  # a stage that reports its work gets rates; they need the step time taken here
        metrics.update(flops.throughput(metrics, metrics['step_time'], num_devices=jax.device_count(),
                                        device_kind=jax.devices()[0].device_kind, dtype=sinks.compute_dtype))
      sinks.writer.write(stage.name, step, metrics)
      bar.set_postfix({k: f'{v:.3g}' for k, v in metrics.items() if k in PROGRESS_KEYS})
    bar.update(1)
    if distributed.any_process(bool(sinks.interrupt)):  # the save is collective: all hosts stop together
      save()
      bar.close()
      raise SystemExit(f'{sinks.interrupt.signal or "signal on another host"}: saved {stage.name} checkpoint at '
                       f'step {step}; rerun the same command to resume.')
    if step % sinks.checkpoint_every == 0:
      save()
  bar.close()
  summary = {**stage.finish(state), 'steps': step, 'wall_time': wall + time.perf_counter() - start}
  save(finished=True, summary=summary)
  return state, summary
