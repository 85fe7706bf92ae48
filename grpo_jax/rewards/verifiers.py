"""Verifiers of DeepSeekMath's benchmarks (GSM8K, MATH, CMATH), as reward functions.

Each verifier has the reward signature fn(completions: list[str], answers: list[str]) -> np.ndarray (float32, [n]):
  1.0 the completion's final answer is correct, 0.0 it is wrong or no answer could be extracted,
  NaN verification itself failed (math-verify timed out, raised, or its worker process died).
Callers count the NaNs in their metrics and score them 0 (e.g. `np.nan_to_num(r, nan=0.0)`).

Extraction (which answer a completion commits to, and the number formats read) is answers.py's; this module
decides whether that answer is right. Numbers: equality is exact between integers, else relative 1e-6; a percent
(50%) equals 50, and also 0.5 (DeepSeekMath's rule).

MATH compares with math-verify, `verify(parse('\\\\boxed{' + gold + '}'), parse('\\\\boxed{' + pred + '}'))`, in
worker processes that are fresh interpreters (never a fork: the parent runs JAX threads); a batch is split in chunks
across the workers. Every item has its own time limit (`configure(timeout_s=...)`, 5 s by default); a worker that
overruns it or dies is killed and replaced, its current item scored NaN and the rest of its chunk re-queued. The
pool starts on first use, is reused, and shuts down at exit. An unparseable prediction scores 0, an unparseable
gold or an exception inside math-verify's comparison NaN.
"""
from __future__ import annotations

import atexit
import collections
import logging
import math
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

import numpy as np

from grpo_jax.rewards.answers import (
    extract_cmath_answer,
    extract_gsm8k_answer,
    extract_math_answer,
    marked_number,
    parse_number,
)

# Same alias as grpo_jax.rewards.registry.RewardFn, not imported from there: registry.py imports this module.
RewardFn = Callable[[list[str], list[str]], np.ndarray]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- numbers
def numbers_equal(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
  """Numeric equality of two number strings; a percent may also match its value / 100.

  Integers compare exactly (1,450,001 is not 1,450,000); the relative tolerance covers rounded decimals of
  fractions (0.333333 for 1/3)."""
  pa, pb = (parse_number(a) if a else None), (parse_number(b) if b else None)
  if pa is None or pb is None:
    return a is not None and b is not None and a.strip() == b.strip()
  (va, pct_a), (vb, pct_b) = pa, pb
  candidates = [(va, vb)]
  if pct_a or pct_b:
    candidates += [(va / 100, vb)] if pct_a else [(va, vb / 100)]
  for x, y in candidates:
    if x == y or (not (x.denominator == y.denominator == 1) and math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)):
      return True
  return False


# ---------------------------------------------------------------------------------------------------- worker pool
_START_TIMEOUT_S = 120.0  # a spawned worker imports numpy, sympy and math-verify before it reports ready
_MAX_CHUNK = 32
_settings = {'timeout_s': 5.0, 'num_workers': max(1, min(8, os.cpu_count() or 1))}  # see configure()


def math_verify_pair(gold: str, pred: str) -> bool:
  """The pool's default job: is the LaTeX answer `pred` equivalent to `gold`? Runs inside a worker process."""
  from math_verify import parse, verify  # imported in the worker processes only

  gold_parsed = parse('\\boxed{' + gold + '}', parsing_timeout=None, raise_on_error=True)
  if not gold_parsed:
    raise ValueError(f'math-verify cannot parse the gold answer {gold!r}')
  # An unparseable prediction is a wrong answer (0), not a verifier failure (NaN).
  pred_parsed = parse('\\boxed{' + pred + '}', parsing_timeout=None)
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True))


def _worker_main(fd: int) -> None:
  """Worker loop: receive (fn, [args, ...]), send back (ok, result or error) for each args as soon as it is done."""
  conn = Connection(fd)
  logging.getLogger('math_verify').setLevel(logging.ERROR)  # its 'timeout disabled' warning: we bound time here
  import math_verify  # noqa: F401 (the import is slow: pay it before the first timed item)

  conn.send('ready')
  while True:
    try:
      msg = conn.recv()
    except EOFError:
      return
    if msg is None:
      return
    fn_bytes, chunk = msg
    for args in chunk:
      try:  # fn is unpickled here so that a function this process cannot import fails its items, not the worker
        out = (True, pickle.loads(fn_bytes)(*args))
      except Exception as e:  # any failure of one item is that item's NaN, never the batch's
        out = (False, f'{type(e).__name__}: {e}')
      conn.send(out)


class _Worker:
  """A fresh interpreter running _worker_main over a socket pair. Not a multiprocessing 'spawn' Process: that
  re-imports the parent's __main__ (the training script, JAX and all) in each worker and fails in unguarded
  scripts; `python -c` keeps spawn's safety (no fork of a threaded parent) without that."""

  def __init__(self):
    self.conn, child_conn = multiprocessing.Pipe()
    fd = child_conn.fileno()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    self.process = subprocess.Popen(
        [sys.executable, '-c', f'from grpo_jax.rewards.verifiers import _worker_main; _worker_main({fd})'],
        pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL)
    child_conn.close()  # so that our end reads EOF when the worker dies
    self.ready = False
    self.pending: collections.deque[int] = collections.deque()
    self.deadline = time.monotonic() + _START_TIMEOUT_S

  def kill(self) -> None:
    self.process.kill()
    self.process.wait(timeout=10)
    self.conn.close()


class _Pool:
  """Workers running fn(*args) per item under a per-item time limit; each result is (ok, value or error)."""

  def __init__(self, num_workers: int):
    self._workers = [_Worker() for _ in range(num_workers)]
    self.num_workers = num_workers

  def run(self, fn: Callable, items: Sequence[tuple], timeout_s: float) -> list[tuple[bool, object]]:
    results: list[tuple[bool, object]] = [(False, 'not run')] * len(items)
    queue = collections.deque(range(len(items)))
    chunk = max(1, min(_MAX_CHUNK, len(items) // (4 * self.num_workers)))
    fn_bytes = pickle.dumps(fn)  # here, so that a lambda fails loudly in the caller

    def dispatch(w: _Worker) -> None:
      w.pending.extend(queue.popleft() for _ in range(min(chunk, len(queue))))
      if w.pending:
        w.conn.send((fn_bytes, [items[i] for i in w.pending]))
        w.deadline = time.monotonic() + timeout_s

    def replace(w: _Worker, why: str) -> _Worker:
      w.kill()
      why = why.format(code=w.process.returncode)
      if not w.ready:
        raise RuntimeError(f'verifier worker failed to start ({why})')
      if w.pending:  # the item it was on failed; the rest of its chunk never started
        results[w.pending.popleft()] = (False, why)
        queue.extendleft(reversed(w.pending))
      logger.warning('verifier worker %s; restarting it', why)
      return _Worker()

    for w in self._workers:
      if w.ready:
        dispatch(w)
    while queue or any(w.pending for w in self._workers):
      busy = [w for w in self._workers if w.pending or not w.ready]
      ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
      for k, w in enumerate(self._workers):
        if w.conn in ready:
          try:
            msg = w.conn.recv()
          except (EOFError, OSError):
            self._workers[k] = w = replace(w, 'died (exit code {code})')
            continue
          if msg == 'ready':
            w.ready = True
          else:
            results[w.pending.popleft()] = msg
            w.deadline = time.monotonic() + timeout_s
          if not w.pending:
            dispatch(w)
        elif time.monotonic() > w.deadline and (w.pending or not w.ready):
          self._workers[k] = replace(w, f'timed out after {timeout_s:g} s' if w.ready else 'timed out starting')
    return results

  def close(self) -> None:
    for w in self._workers:
      try:
        w.conn.send(None)
      except OSError:
        pass
    for w in self._workers:
      try:
        w.process.wait(timeout=1)
      except subprocess.TimeoutExpired:
        w.kill()
      w.conn.close()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def configure(timeout_s: float | None = None, num_workers: int | None = None) -> None:
  """Sets the per-item time limit and the worker count of the math-verify pool (a new count restarts it)."""
  global _pool
  with _pool_lock:
    if timeout_s is not None:
      _settings['timeout_s'] = float(timeout_s)
    if num_workers is not None and num_workers != _settings['num_workers']:
      _settings['num_workers'] = max(1, int(num_workers))
      if _pool is not None:
        _pool.close()
        _pool = None


def shutdown() -> None:
  """Stops the worker processes; the next verification starts a new pool."""
  global _pool
  # Bounded wait: at exit a daemon thread may have died holding the lock mid-batch; the workers must go anyway.
  locked = _pool_lock.acquire(timeout=10)
  try:
    if _pool is not None:
      _pool.close()
      _pool = None
  finally:
    if locked:
      _pool_lock.release()


atexit.register(shutdown)


def run_bounded(fn: Callable, items: Sequence[tuple], timeout_s: float | None = None) -> np.ndarray:
  """fn(*args) for each args in the pool: float32 [n], 1.0/0.0 for a truthy/falsy result, NaN for a failure.

  fn must be picklable by reference (a module-level function or a builtin)."""
  global _pool
  if not items:
    return np.zeros(0, np.float32)
  with _pool_lock:  # one batch at a time: the workers hold one chunk each
    if _pool is None:
      _pool = _Pool(_settings['num_workers'])
    limit = _settings['timeout_s'] if timeout_s is None else timeout_s
    try:
      results = _pool.run(fn, items, limit)
    except BaseException:
      # Workers may still be busy on this batch; their late answers must not reach the next one.
      _pool.close()
      _pool = None
      raise
  return np.array([float(bool(r)) if ok else np.nan for ok, r in results], np.float32)


# ---------------------------------------------------------------------------------------------------- verifiers
def _check_lengths(completions: Sequence[str], answers: Sequence[str]) -> None:
  if len(completions) != len(answers):
    raise ValueError(f'{len(completions)} completions but {len(answers)} answers')


def _gold_number(answer: str) -> str:
  """A gold answer given as a number ('18', '2,125', '1/2', '12%') or as a full GSM8K solution ending '#### N'."""
  return marked_number(answer) or answer


def _numeric_reward(extract: Callable[[str], str | None], completions: list[str], answers: list[str]) -> np.ndarray:
  _check_lengths(completions, answers)
  rewards = np.zeros(len(completions), np.float32)
  for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
    try:
      rewards[i] = numbers_equal(extract(completion), _gold_number(answer))
    except Exception:  # a pure-Python parser bug must cost one item, not the training step
      logger.exception('verification failed')
      rewards[i] = np.nan
  return rewards


def gsm8k_reward(completions: list[str], answers: list[str]) -> np.ndarray:
  """GSM8K: 1.0 if the completion's final number (see extract_gsm8k_answer) equals the gold number."""
  return _numeric_reward(extract_gsm8k_answer, completions, answers)


def cmath_reward(completions: list[str], answers: list[str]) -> np.ndarray:
  """CMATH: 1.0 if the completion's final number (see extract_cmath_answer) equals the gold `answer` field."""
  return _numeric_reward(extract_cmath_answer, completions, answers)


def math_reward(completions: list[str], answers: list[str], *, timeout_s: float | None = None,
                worker_fn: Callable[[str, str], bool] = math_verify_pair) -> np.ndarray:
  """MATH: 1.0 if the completion's final answer (see extract_math_answer) is math-verify-equivalent to the gold.

  `worker_fn(gold, pred)` runs in the pool (tests swap it); `timeout_s` overrides the per-item limit."""
  _check_lengths(completions, answers)
  rewards = np.zeros(len(completions), np.float32)
  preds = [extract_math_answer(c) for c in completions]
  todo = [i for i, p in enumerate(preds) if p is not None]  # no answer: 0 without a round trip
  rewards[todo] = run_bounded(worker_fn, [(answers[i], preds[i]) for i in todo], timeout_s)
  return rewards


VERIFIERS: dict[str, RewardFn] = {'gsm8k': gsm8k_reward, 'math': math_reward, 'cmath': cmath_reward}


def _normalize_latex(answer: str) -> str:
  answer = re.sub(r'\\[dt]frac', r'\\frac', answer)
  answer = re.sub(r'\\(?:left|right|!|,|;|:)|\\text\{\s*\}|\s', '', answer)
  return answer.rstrip('.')


def answers_equivalent(verifier_name: str, a: str | None, b: str | None, *, timeout_s: float | None = None) -> bool:
  """Whether two extracted answers are the same answer (maj@k voting groups them).

  gsm8k and cmath compare numerically; math compares whitespace- and \\left/\\right-normalized strings first and
  otherwise asks math-verify (a as gold) through the time-bounded pool, a failure or timeout counting as different."""
  if verifier_name not in VERIFIERS:
    raise ValueError(f'unknown verifier {verifier_name!r}; known: {sorted(VERIFIERS)}')
  if a is None or b is None:
    return False
  if verifier_name != 'math':
    return numbers_equal(a, b)
  if _normalize_latex(a) == _normalize_latex(b):
    return True
  return bool(run_bounded(math_verify_pair, [(a, b)], timeout_s)[0] == 1.0)
