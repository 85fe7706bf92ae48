"""Orbax checkpoints of one stage: its trees saved by role, and a JSON meta.

Each stage (its folder: 'sft', 'grpo', 'grpo_2', 'reward_model_0', ...; the table is stages.py) has its own
CheckpointManager under <workdir>/checkpoints/<folder>; a step holds one item per model, named by its `Role`:
'policy' (the trained policy's TrainState: step, params, optimizer state), 'reference' (the frozen reference's
params, when the stage keeps one), 'critic' (the PPO stage's value model, a TrainState), 'reward_model' (the learned
reward model's TrainState); the stage's other state (GRPO's KL controller, the reward model's replay buffer) under its
own name; and 'meta' (JSON: data position, RNG key data, the model config, checked before resuming, and the stage's
summary once finished). A LoRA stage (models/lora.py) saves the frozen base and the adapters in the policy's params,
no reference tree, and its LoRA config under meta['lora'].
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from grpo_jax.models.transformer import ModelConfig
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.stages import Role
from grpo_jax.pipeline.workdir import write_json


class CheckpointError(RuntimeError):
  pass


class DiskFullError(CheckpointError):
  """The device of the checkpoint directory is full; the message names it, the free space and the intact step."""


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Any]:
  """fd 2 into a temporary file while Orbax writes: when a write fails, each of its writer threads prints a
  traceback there, burying the cause. The caller replays the capture unless it reports the failure itself."""
  sys.stderr.flush()
  saved = os.dup(2)
  captured = tempfile.TemporaryFile()  # noqa: SIM115  (closed by _replay, or when dropped)
  os.dup2(captured.fileno(), 2)
  try:
    yield captured
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _replay(captured) -> None:
  """Write what was captured to stderr (a successful save's warnings are not lost) and close it."""
  captured.seek(0)
  text = captured.read()
  captured.close()
  if text:
    sys.stderr.buffer.write(text)
    sys.stderr.flush()


def stage_folders(workdir: str) -> list[str]:
  """The stage folders under <workdir>/checkpoints ('sft', 'grpo', 'grpo_2', 'reward_model_0', ...), sorted."""
  root = os.path.join(workdir, 'checkpoints')
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []


def manager(workdir: str, stage: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, 'checkpoints', stage))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)  # a saved step is on disk
  return ocp.CheckpointManager(path, options=options)


def _meta_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step), 'meta', 'metadata')  # where JsonSave puts the 'meta' item


def save(mngr: ocp.CheckpointManager, step: int, trees: dict[str, Any], meta: dict[str, Any]) -> None:
  """Save `trees` and `meta` as `step` (collective). A step is only ever saved with the state after that many
  steps, so when `step` exists already (the final save of a stage landing on a periodic one) its trees are
  these and only the meta is replaced, atomically: a kill at any moment leaves the old or the new meta."""
  if step in mngr.all_steps():
    if jax.process_index() == 0:
      write_json(_meta_path(mngr, step), meta)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint meta {step}')
    return
  args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
  failure = None
  with _stderr_captured() as captured:
    try:
      mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)
      mngr.wait_until_finished()
    except Exception as e:  # orbax wraps the OSError of a full disk in its own errors
      failure = e
  if failure is None or not _disk_full(failure):
    _replay(captured)
    if failure is not None:
      raise failure
    return
  for name in os.listdir(str(mngr.directory)):  # the half-written step: Orbax writes into a tmp dir first
    if name.startswith(f'{step}.') and 'tmp' in name:
      shutil.rmtree(os.path.join(str(mngr.directory), name), ignore_errors=True)
  free = shutil.disk_usage(str(mngr.directory)).free
  previous = [s for s in mngr.all_steps() if s != step]
  raise DiskFullError(f'no space left on the device of {mngr.directory} saving step {step} ({free / 2**20:.0f} MiB '
                      f'free); the previous checkpoint ({max(previous) if previous else "none"}) is intact. Free '
                      'space and rerun the same command to resume.')


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
  """Move a broken step out of the manager's sight (kept for inspection, not deleted); returns where it went."""
  src = os.path.join(str(mngr.directory), str(step))
  dst = os.path.join(str(mngr.directory), f'broken-{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  if jax.process_index() == 0:
    os.replace(src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'quarantine {step}')
  mngr.reload()
  return dst


def _disk_full(e: BaseException | None) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or 'No space left on device' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any] | None:
  """The JSON meta of the latest (or given) step, or None if the stage has no checkpoint. Cheap: no arrays."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  path = _meta_path(mngr, step)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'checkpoint {mngr.directory}/{step} has no readable meta ({e}); '
                          'it is malformed: delete it or use another --workdir') from e


def check_policy_layout(mngr: ocp.CheckpointManager, step: int) -> None:
  """A policy stage's checkpoint holds its trees by role; one written before that (2026-12-04: the train state as
  item 'state') is refused with what to do, instead of an error from inside Orbax."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  if os.path.isdir(os.path.join(step_dir, 'state')) and not os.path.isdir(os.path.join(step_dir, Role.POLICY)):
    raise CheckpointError(f"{step_dir} has the checkpoint layout of grpo_jax before 2026-12-04 (item 'state', not "
                          "'policy'): finish that run with that version (git checkout 7f909e5) or use a fresh "
                          '--workdir')


def check_model_config(meta: dict[str, Any], model_config: dict[str, Any], where: str) -> None:
  # Fields added to ModelConfig after a checkpoint was written take their defaults (the behaviour it had).
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
  saved = {**defaults, **meta.get('model', {})}
  if saved != model_config:
    diff = {k: (saved.get(k), v) for k, v in model_config.items() if saved.get(k) != v}
    raise CheckpointError(f'{where} holds a checkpoint of a different model config '
                          f'(saved, requested): {diff}; use a fresh --workdir or the saved config')


def restore(mngr: ocp.CheckpointManager, step: int, targets: dict[str, Any]) -> dict[str, Any]:
  """The trees named in `targets`, restored into their shapes, dtypes and shardings (concrete or abstract trees)."""
  abstract = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, t) for name, t in targets.items()}
  args = {name: ocp.args.StandardRestore(t) for name, t in abstract.items()}
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
  except Exception as e:  # orbax raises several types for missing/corrupt items
    raise CheckpointError(f'could not restore {mngr.directory}/{step}: {e}') from e
  return {name: restored[name] for name in targets}


def restore_subtree(mngr: ocp.CheckpointManager, step: int, item: Role | str, target) -> Any:
  """Part of one item (e.g. only {'params': ...} of the 'policy' TrainState, no optimizer state), restored into
  `target`'s shapes, dtypes and shardings."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)  # each array into its sharding
  args = ocp.args.Composite(**{item: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                            partial_restore=True)})
  try:
    return mngr.restore(step, args=args)[item]
  except Exception as e:  # orbax raises several types for missing/corrupt items
    raise CheckpointError(f'could not restore {item} from {mngr.directory}/{step}: {e}') from e


def saved_model_config(workdir: str) -> dict[str, Any]:
  """The model config (a dict of ModelConfig fields) stored with the checkpoint of the workdir's final policy (the
  first of stages.policy_folders that has one)."""
  folders = stages.policy_folders(stage_folders(workdir))
  for folder in folders:
    meta = read_meta(manager(workdir, folder, max_to_keep=1_000_000))
    if meta is not None:
      return meta['model']
  raise CheckpointError(f'{workdir} has no checkpoint of any stage {folders} under {workdir}/checkpoints')
