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
from absl import logging
from tqdm import tqdm

from grpo_jax.models import flops
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import checkpoint
from grpo_jax.pipeline.metrics import MetricWriter

# metrics.jsonl key -> its label on the progress bar. The last three say why a GRPO run is weak: groups with no
# reward variance, a policy that no longer explores, batches that none of the G samples solves.
PROGRESS_KEYS = {'nll': 'nll', 'val_accuracy': 'val_acc', 'reward': 'reward', 'kl': 'kl', 'clip_frac': 'clip',
                 'frac_groups_no_signal': 'no_signal', 'entropy': 'entropy', 'pass_at_g': 'pass@G'}


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
  """Where the loop writes: checkpoints, metrics, and how often; and its guards."""
  workdir: str
  writer: MetricWriter
  interrupt: Interrupt
  log_every: int
  checkpoint_every: int
  checkpoint_keep: int
  compute_dtype: str = 'float32'  # for the FLOP rates of stages that report 'model_flops'
  max_nonfinite_steps: int = 10  # this many skipped (non-finite) steps in a row stop the run
  collapse_steps: int = 50  # warn when the gradient norm is exactly 0 this many steps in a row


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a non-finite loss, gradient or update (their updates were skipped)."""


class CompileCounter:
  """XLA compilations in this process, for the 'compiles' metric: after a stage's first steps it should stay put."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name: str, *args, **kwargs) -> None:
    if name == '/jax/core/compile/backend_compile_duration':
      self.count += 1


COMPILES = CompileCounter()


def _restore_latest(mngr, targets: dict[str, Any], name: str):
  """(state, meta) of the newest checkpoint that reads and restores, or (None, None) when the stage has none.

  A broken newer checkpoint (a kill mid-save leaves none, but a disk error or a bad copy can) is moved aside,
  with a warning naming it, and the one before it is used; when none restores, the error names them all."""
  broken = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = checkpoint.read_meta(mngr, step)
      state = checkpoint.restore(mngr, step, targets)
    except checkpoint.CheckpointError as e:
      broken.append((step, e))
      continue
    for bad, e in broken:
      where = checkpoint.quarantine(mngr, bad)
      logging.warning('%s: checkpoint step %d is broken (%s); moved it to %s and resumed from step %d', name, bad,
                      e, where, step)
      distributed.print0(f'WARNING: {name}: checkpoint step {bad} is broken; moved to {where}; resuming from step '
                         f'{step}')
    return state, meta
  if broken:
    raise checkpoint.CheckpointError(f'{name}: no checkpoint restores: ' + '; '.join(str(e) for _, e in broken))
  return None, None


def run_stage(stage: Stage, sinks: Sinks) -> tuple[dict[str, Any], dict[str, Any]]:
  """Run `stage` to its end, resuming from its latest checkpoint. Returns (final state, summary).

  A finished stage is not run again: its state is restored and its saved summary returned (unless num_steps
  grew: then it continues). On SIGTERM / SIGINT the state is saved after the current step and the process exits
  (rerun the same command to resume). A step whose metrics say 'nonfinite' was skipped by the train step; after
  sinks.max_nonfinite_steps of them in a row the run stops with NonFiniteError, nothing saved after the last
  finite checkpoint.
  """
  _exit_if_interrupted(sinks, f'before {stage.name} started')
  mngr = checkpoint.manager(sinks.workdir, stage.name, max_to_keep=sinks.checkpoint_keep)
  state = stage.state
  step, wall, stop, nonfinite_steps = 0, 0.0, False, 0
  restored, meta = _restore_latest(mngr, state, stage.name)
  if meta is not None:
    state = restored
    step, wall, stop = meta['step'], meta['wall_time'], meta['stopped']
    nonfinite_steps = meta['nonfinite_steps']
    if meta['finished'] and (stop or step >= stage.num_steps):
      return state, meta['summary']
    distributed.print0(f'{stage.name}: resuming from step {step}')
  sinks.writer.rewind(stage.name, step)

  def save(finished=False, summary=None):
    meta = {'stage': stage.name, 'step': step, 'wall_time': wall + time.perf_counter() - start,
            'finished': finished, 'stopped': stop, 'summary': summary, 'data_position': step,
            'nonfinite_steps': nonfinite_steps, **stage.meta}
    checkpoint.save(mngr, step, state, meta)

  distributed.print0(f'\n=== {stage.name}: steps {step} -> {stage.num_steps} ===')
  start = time.perf_counter()
  bar = tqdm(total=stage.num_steps, initial=step, desc=stage.name, dynamic_ncols=True,
             disable=not distributed.is_main_process())
  nonfinite_streak, zero_grad_streak = 0, 0
  while step < stage.num_steps and not stop:
    t0 = time.perf_counter()
    state, metrics = stage.step(state, step)
    step += 1
    # The two guards' scalars in one transfer: a fetch waits for the step, so each costs a sync.
    guards = jax.device_get({k: metrics[k] for k in ('nonfinite', 'grad_norm') if k in metrics})
    if 'nonfinite' in guards:
      skipped = float(guards['nonfinite']) > 0  # any minibatch of the step
      nonfinite_steps += skipped
      nonfinite_streak = nonfinite_streak + 1 if skipped else 0
      metrics = dict(metrics, nonfinite_steps=nonfinite_steps)
      if nonfinite_streak >= sinks.max_nonfinite_steps:
        bar.close()
        raise NonFiniteError(
            f'{stage.name}: {nonfinite_streak} steps in a row (the last: step {step}) had a non-finite loss, gradient '
            f'or update; their updates were skipped and the last checkpoint ({mngr.latest_step()}) is the last finite '
            'state. Lower the learning rate, check the data and the initial weights, or raise '
            'config.max_nonfinite_steps.')
    if 'grad_norm' in guards:
      zero_grad_streak = zero_grad_streak + 1 if float(guards['grad_norm']) == 0.0 else 0
      if zero_grad_streak == sinks.collapse_steps:
        msg = (f'{stage.name}: the gradient norm has been exactly 0 for {zero_grad_streak} steps (step {step}): '
               'nothing is learned (no reward variance in any group, or a collapsed policy)')
        logging.warning(msg)
        distributed.print0(f'WARNING: {msg}')
    stop = stage.should_stop(metrics)
    if step % sinks.log_every == 0 or stop or step == stage.num_steps:
      metrics = {k: float(v) if np.ndim(v) == 0 else v for k, v in jax.device_get(metrics).items()}
      metrics['step_time'] = time.perf_counter() - t0
      metrics['compiles'] = COMPILES.count
      if 'model_flops' in metrics:  # a stage that reports its work gets rates; they need the step time taken here
        metrics.update(flops.throughput(metrics, metrics['step_time'], num_devices=jax.device_count(),
                                        device_kind=jax.devices()[0].device_kind, dtype=sinks.compute_dtype))
      sinks.writer.write(stage.name, step, metrics)
      bar.set_postfix({PROGRESS_KEYS[k]: f'{v:.3g}' for k, v in metrics.items() if k in PROGRESS_KEYS})
    bar.update(1)
    if distributed.any_process(bool(sinks.interrupt)):  # the save is collective: all hosts stop together
      save()
      bar.close()
      raise SystemExit(f'{sinks.interrupt.signal or "signal on another host"}: saved {stage.name} checkpoint at '
                       f'step {step}; rerun the same command to resume.')
    if step % sinks.checkpoint_every == 0:
      save()
  bar.close()
  summary = {**stage.finish(state), 'steps': step, 'wall_time': wall + time.perf_counter() - start,
             'nonfinite_steps': nonfinite_steps}
  save(finished=True, summary=summary)
  _exit_if_interrupted(sinks, f'{stage.name} finished and saved')
  return state, summary


def _exit_if_interrupted(sinks: Sinks, where: str) -> None:
  """A signal that came during a stage's final evaluation (or between stages) stops the run here, not one step
  into the next stage."""
  if distributed.any_process(bool(sinks.interrupt)):
    raise SystemExit(f'{sinks.interrupt.signal or "signal on another host"}: {where}; rerun the same command to '
                     'resume.')
