"""A run's workdir beside its checkpoints: one run at a time (a lock), the config it was trained with (compared on
resume, its changes kept as history), and JSON side files written atomically."""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from grpo_jax.parallel import distributed

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'  # the config of the latest run in this workdir
HISTORY_FILE = 'config_history.jsonl'  # one line per run start: when, and what changed against the saved config
# Knobs that change how a run is logged or saved, not what it computes: they may differ on resume.
NOT_TRAJECTORY = ('log_every', 'checkpoint_every', 'checkpoint_keep', 'compile_cache_dir', 'export_hf',
                  'memory_check', 'memory_limit_gib', 'decode_buckets')
# Knobs added after runs were saved, with the value that reproduces what those runs did: a saved config without
# one is read as having it, so resuming an older workdir is not refused as a config change.
ADDED_KNOBS = {'rl.policy_loss': 'clip', 'decode_buckets': 1}


class WorkdirError(RuntimeError):
  pass


def write_text(path: str, text: str) -> None:
  """Atomically: a kill or a full disk mid-write leaves the old file or the new one, never a truncated one."""
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def write_json(path: str, obj: Any, **kwargs) -> None:
  """json.dump, atomically (write_text)."""
  write_text(path, json.dumps(obj, **kwargs))


def read_json(path: str) -> Any | None:
  """The file's JSON; None when it is missing. A damaged file is an error that names it."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f'{path} is damaged ({e}); delete it if it is a cache, or restore it') from e


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec='seconds')


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Hold <workdir>/.lock for the run (process 0 on several hosts). A second run on the workdir fails, naming the
  holder's pid and host; a lock left by a process that is gone (the OS released it) is taken over with a warning."""
  if not distributed.is_main_process():
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, 'a+')  # noqa: SIM115  (held open for the run: closing it releases the lock)
  try:
    f.seek(0)
    previous = f.read().strip()
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = json.loads(previous) if previous.startswith('{') else {}
      raise WorkdirError(f'{workdir} is in use by another run: pid {holder.get("pid", "?")} on host '
                         f'{holder.get("host", "?")} (started {holder.get("started", "?")}); wait for it to end or '
                         'use another --workdir') from None
    if previous:
      logging.warning('taking over the stale lock of %s on %s', previous, workdir)
      distributed.print0(f'WARNING: {workdir} had the lock of a run that is gone ({previous}); taking it over')
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': _now()}))
    f.flush()
    yield
  finally:
    if not f.closed:
      with contextlib.suppress(OSError):  # an empty lock file: the run ended; a full one: it did not
        f.seek(0)
        f.truncate()
      f.close()


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved: dict, requested: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved, requested)} for every knob that differs, NOT_TRAJECTORY ones aside."""
  a, b = _flatten(saved), _flatten(requested)
  a = {**{k: v for k, v in ADDED_KNOBS.items() if k in b}, **a}
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in NOT_TRAJECTORY}


def _allowed(key: str, allow: Sequence[str]) -> bool:
  return any(key == a or key.startswith(a + '.') for a in allow)


def check_config(workdir: str, config_json: str, *, allow: Sequence[str] = (), trained: bool) -> dict:
  """The accepted differences between the requested config (its JSON) and the one the workdir was trained with.

  trained: the workdir holds results of the saved config (checkpoints or the initial evaluation). Then a knob
  that changes the trajectory may differ only when `allow` names it (a key or a section, e.g. 'rl.num_steps');
  anything else is an error listing each difference. Writes nothing: `record_config` does, once the run's other
  checks have passed.
  """
  requested = json.loads(config_json)
  saved = read_json(os.path.join(workdir, CONFIG_FILE)) if trained else None
  changes = {} if saved is None else config_changes(saved, requested)
  refused = {k: v for k, v in changes.items() if not _allowed(k, allow)}
  if refused:
    listed = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in refused.items())
    raise WorkdirError(f'{workdir} was trained with another config (saved -> requested): {listed}. Resume with the '
                       f'saved config ({os.path.join(workdir, CONFIG_FILE)}), use a fresh --workdir, or accept the '
                       f'change with --allow_config_change={",".join(refused)}')
  return changes


def record_config(workdir: str, config_json: str, changes: dict, *, resumed: bool) -> None:
  """config.json := the run's config (atomically); a line in the history: when, started or resumed, what changed."""
  if not distributed.is_main_process():
    return
  write_text(os.path.join(workdir, CONFIG_FILE), config_json)
  with open(os.path.join(workdir, HISTORY_FILE), 'a') as f:
    f.write(json.dumps({'time': _now(), 'event': 'resumed' if resumed else 'started',
                        'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
