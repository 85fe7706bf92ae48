"""The stage loop, algorithm-free: resume, step, log, checkpoint, stop on a signal or when the stage says so.

A stage is data (`Stage`): a name, a step count, its state as trees named by role (stages.Role: 'policy',
'reference', ...) and a plain `step(state, i) -> (state, metrics)`. Its module (sft.py, grpo.py) builds it; run.py
runs stages in sequence through `run_stage`, which knows nothing of what they train.

The loop also says when a stage did not train (`Health`): updates skipped as non-finite (counted; too many in a row
stop the run, most of a stage's stop it at the stage's end) and a collapsed model (named the step it happens), both in
the stage's summary.
"""
from __future__ import annotations

import math
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
  max_skipped_fraction: float = 0.5  # a stage that skipped more of its updates than this ends the run (NotTrainedError)
  # Steps in a row that name a collapse (Health.observe): two, so one coincidence is not enough; a healthy step never
  # has an exactly zero gradient with signal, nor the entropy of the step before to the last bit.
  collapse_steps: int = 2
  zero_grad_steps: int = 50  # warn when the gradient norm is exactly 0 this many steps in a row (no signal at all)


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a non-finite loss, gradient or update (their updates were skipped)."""


class NotTrainedError(RuntimeError):
  """A stage skipped most of its updates (non-finite): what it ends with is not a trained model."""


class Health:
  """What each step's metrics say about whether a stage trains, beyond the loss: skipped (non-finite) updates and a
  collapse. Counts carry over a resume through the checkpoint meta (`meta`); the in-a-row streaks start again.

  A step's 'nonfinite' is the fraction of its updates the train step skipped (a GRPO step's epochs x minibatches
  average theirs), so the stage's skipped fraction is their mean over its steps.

  A collapse is `collapse_steps` steps in a row each with either sign of a model that no longer changes: a gradient
  norm of exactly 0 although some group had reward variance (frac_groups_no_signal < 1; no such metric: SFT, the
  reward model, which always have a signal), or the mean token entropy of the step before, to the last bit, on freshly
  sampled outputs (a policy whose logits no longer depend on its input, e.g. uniform after an overflow). A policy that
  only lacks signal (every group solved or failed alike) has a zero gradient too; that is the zero_grad_steps warning.
  """
  KEYS = ('nonfinite', 'grad_norm', 'entropy', 'frac_groups_no_signal')  # the metrics fetched each step

  def __init__(self, name: str, sinks: Sinks, latest_checkpoint: Callable[[], int | None],
               meta: dict[str, Any] | None = None):
    self.name, self.sinks, self.latest_checkpoint = name, sinks, latest_checkpoint
    meta = meta or {}
    self.nonfinite_steps = meta.get('nonfinite_steps', 0)
    # Checkpoints written before these were counted: a stage with no skipped step skipped no update.
    self.skipped_updates = meta.get('skipped_updates', 0.0 if self.nonfinite_steps == 0 else math.nan)
    self.collapse_step = meta.get('collapse_step')
    self.nonfinite_streak = self.zero_grad_streak = self.frozen_streak = 0
    self.last_entropy = None

  def observe(self, step: int, values: dict[str, Any]) -> None:
    """Step `step`'s (1-based) fetched KEYS; raises NonFiniteError after max_nonfinite_steps skipped in a row."""
    if 'nonfinite' in values:
      skipped = float(values['nonfinite'])
      self.skipped_updates += skipped
      self.nonfinite_steps += skipped > 0  # any update of the step
      self.nonfinite_streak = self.nonfinite_streak + 1 if skipped > 0 else 0
      if self.nonfinite_streak >= self.sinks.max_nonfinite_steps:
        raise NonFiniteError(
            f'{self.name}: {self.nonfinite_streak} steps in a row (the last: step {step}) had a non-finite loss, '
            f'gradient or update; their updates were skipped and the last checkpoint ({self.latest_checkpoint()}) is '
            'the last finite state. Lower the learning rate, check the data and the initial weights, or raise '
            'config.max_nonfinite_steps.')
    zero_grad = 'grad_norm' in values and float(values['grad_norm']) == 0.0
    self.zero_grad_streak = self.zero_grad_streak + 1 if zero_grad else 0
    if self.zero_grad_streak == self.sinks.zero_grad_steps:
      self._warn(f'{self.name}: the gradient norm has been exactly 0 for {self.zero_grad_streak} steps (step {step}): '
                 'nothing is learned (no reward variance in any group, or a collapsed policy)')
    signal = float(values.get('frac_groups_no_signal', 0.0)) < 1.0
    entropy = float(values['entropy']) if 'entropy' in values else None
    frozen = (zero_grad and signal) or (entropy is not None and entropy == self.last_entropy)
    self.last_entropy = entropy
    self.frozen_streak = self.frozen_streak + 1 if frozen else 0
    if self.frozen_streak >= self.sinks.collapse_steps and self.collapse_step is None:
      self.collapse_step = step
      self._warn(f'{self.name}: collapsed at step {step}: {self.frozen_streak} steps in a row with a gradient norm of '
                 'exactly 0 despite reward variance, or exactly the entropy of the step before; the model no longer '
                 'changes, so it does not train from here (too high a learning rate?)')

  def _warn(self, msg: str) -> None:
    logging.warning(msg)
    distributed.print0(f'WARNING: {msg}')

  def meta(self) -> dict[str, Any]:
    """The counts, for the checkpoint meta (a resumed stage continues them)."""
    return {'nonfinite_steps': self.nonfinite_steps, 'skipped_updates': self.skipped_updates,
            'collapse_step': self.collapse_step}

  def summary(self, steps: int) -> dict[str, Any]:
    """For the stage's summary: steps with a skipped update, the fraction of its updates skipped (nan: unknown, a
    checkpoint from before it was counted), and the step it collapsed at (None: it did not)."""
    return {'nonfinite_steps': self.nonfinite_steps, 'skipped_update_frac': self.skipped_updates / steps if steps else
            0.0, 'collapse_step': self.collapse_step}

  def check_trained(self, steps: int, before_raising: Callable[[], None] = lambda: None) -> None:
    """NotTrainedError when more than sinks.max_skipped_fraction of the stage's updates were skipped (nan, not
    counted: not refused), after before_raising()."""
    frac = self.summary(steps)['skipped_update_frac']
    if frac > self.sinks.max_skipped_fraction:
      before_raising()
      raise NotTrainedError(
          f'{self.name}: {100 * frac:.0f}% of its updates were skipped ({self.nonfinite_steps} of {steps} steps had a '
          'non-finite loss, gradient or update), so it did not train and no result is reported. Lower the learning '
          f'rate, check the data and the initial weights (last checkpoint: step {self.latest_checkpoint()}).')


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
  finite checkpoint, and a stage that skipped most of its updates stops at its end with NotTrainedError (before its
  evaluation; a rerun says so again). The summary counts them and names a collapse (`Health`).
  """
  _exit_if_interrupted(sinks, f'before {stage.name} started')
  mngr = checkpoint.manager(sinks.workdir, stage.name, max_to_keep=sinks.checkpoint_keep)
  state = stage.state
  step, wall, stop = 0, 0.0, False
  restored, meta = _restore_latest(mngr, state, stage.name)
  health = Health(stage.name, sinks, mngr.latest_step, meta)
  if meta is not None:
    state = restored
    step, wall, stop = meta['step'], meta['wall_time'], meta['stopped']
    if meta['finished'] and (stop or step >= stage.num_steps):
      health.check_trained(step)  # a finished stage's summary from before the check carries no counts
      return state, {**health.summary(step), **meta['summary']}
    distributed.print0(f'{stage.name}: resuming from step {step}')
  sinks.writer.rewind(stage.name, step)

  def save(finished=False, summary=None):
    meta = {'stage': stage.name, 'step': step, 'wall_time': wall + time.perf_counter() - start,
            'finished': finished, 'stopped': stop, 'summary': summary, 'data_position': step, **health.meta(),
            **stage.meta}
    checkpoint.save(mngr, step, state, meta)

  distributed.print0(f'\n=== {stage.name}: steps {step} -> {stage.num_steps} ===')
  start = time.perf_counter()
  bar = tqdm(total=stage.num_steps, initial=step, desc=stage.name, dynamic_ncols=True,
             disable=not distributed.is_main_process())
  while step < stage.num_steps and not stop:
    t0 = time.perf_counter()
    state, metrics = stage.step(state, step)
    step += 1
    # The guards' scalars in one transfer: a fetch waits for the step, so each costs a sync.
    try:
      health.observe(step, jax.device_get({k: metrics[k] for k in Health.KEYS if k in metrics}))
    except NonFiniteError:
      bar.close()
      raise
    if 'nonfinite' in metrics:
      metrics = dict(metrics, nonfinite_steps=health.nonfinite_steps)
    stop = stage.should_stop(metrics)
    if step % sinks.log_every == 0 or stop or step == stage.num_steps:
      _log(sinks, stage.name, step, metrics, time.perf_counter() - t0, bar)
    bar.update(1)
    if distributed.any_process(bool(sinks.interrupt)):  # the save is collective: all hosts stop together
      save()
      bar.close()
      raise SystemExit(f'{sinks.interrupt.signal or "signal on another host"}: saved {stage.name} checkpoint at '
                       f'step {step}; rerun the same command to resume.')
    if step % sinks.checkpoint_every == 0:
      save()
  bar.close()
  health.check_trained(step, before_raising=save)  # a rerun restores that save and stops here again, training nothing
  summary = {**stage.finish(state), 'steps': step, 'wall_time': wall + time.perf_counter() - start,
             **health.summary(step)}
  save(finished=True, summary=summary)
  _exit_if_interrupted(sinks, f'{stage.name} finished and saved')
  return state, summary


def _log(sinks: Sinks, name: str, step: int, metrics: dict[str, Any], step_time: float, bar) -> None:
  """Step `step`'s metrics fetched from the device, with its time, the compile count and, for a stage that reports
  its work, FLOP rates; into metrics.jsonl and onto the progress bar."""
  metrics = {k: float(v) if np.ndim(v) == 0 else v for k, v in jax.device_get(metrics).items()}
  metrics['step_time'] = step_time
  metrics['compiles'] = COMPILES.count
  if 'model_flops' in metrics:  # a stage that reports its work gets rates; they need the step time taken here
    metrics.update(flops.throughput(metrics, metrics['step_time'], num_devices=jax.device_count(),
                                    device_kind=jax.devices()[0].device_kind, dtype=sinks.compute_dtype))
  sinks.writer.write(name, step, metrics)
  bar.set_postfix({PROGRESS_KEYS[k]: f'{v:.3g}' for k, v in metrics.items() if k in PROGRESS_KEYS})


def _exit_if_interrupted(sinks: Sinks, where: str) -> None:
  """A signal that came during a stage's final evaluation (or between stages) stops the run here, not one step
  into the next stage."""
  if distributed.any_process(bool(sinks.interrupt)):
    raise SystemExit(f'{sinks.interrupt.signal or "signal on another host"}: {where}; rerun the same command to '
                     'resume.')
