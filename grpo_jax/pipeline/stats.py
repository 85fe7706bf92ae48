"""Honest accuracy numbers: a 95% Wilson interval over problems, and an exact McNemar test for two policies scored
on the same problems. Held-out sets of 100-500 problems leave intervals several points wide, so a difference between
two accuracies means little without them. The statistics are scipy's."""
from __future__ import annotations

import numpy as np
from scipy import stats


def _as_correct(correct: np.ndarray, name: str = 'correct') -> np.ndarray:
  """[n] per-problem correctness as bools; 0/1 numbers are accepted, anything else (a raw score) is refused."""
  c = np.asarray(correct)
  if c.ndim != 1:
    raise ValueError(f'{name}: need a [n] array of per-problem correctness, got shape {c.shape}')
  if c.dtype != np.bool_:
    if not np.all((c == 0) | (c == 1)):
      raise ValueError(f'{name}: need booleans or 0/1 (e.g. scores >= 1), got values {sorted(set(c.tolist()))[:5]}')
    c = c.astype(bool)
  return c


def wilson_counts(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """The Wilson score interval of a proportion with k successes of n trials (n >= 1)."""
  if n < 1 or not 0 <= k <= n:
    raise ValueError(f'need 0 <= k <= n and n >= 1, got k={k}, n={n}')
  ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method='wilson')
  return float(ci.low), float(ci.high)


def wilson_interval(correct: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
  """(low, high) of the Wilson interval of the accuracy, over problems.

  Args:
    correct: [n] bool (or 0/1), whether each problem was solved; n >= 1.
  """
  c = _as_correct(correct)
  return wilson_counts(int(c.sum()), c.size, confidence)


def accuracy_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """The Wilson interval of an accuracy reported as a fraction of n problems (k = accuracy * n, rounded: the
  fraction was k / n)."""
  return wilson_counts(round(accuracy * n), n, confidence)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float | int]:
  """Exact McNemar test of two policies scored on the same problems: a two-sided binomial test (p = 1/2) on the
  discordant problems, those exactly one of the two solved. Problems both solve or both miss say nothing about
  which is better.

  Args:
    a_correct, b_correct: [n] bool (or 0/1), per problem, in the same order.
  Returns:
    {'p_value': the test's p-value (1.0 when no problem is discordant), 'a_only': problems only a solved,
     'b_only': problems only b solved}.
  """
  a, b = _as_correct(a_correct, 'a_correct'), _as_correct(b_correct, 'b_correct')
  if a.shape != b.shape:
    raise ValueError(f'need the same problems for both, got {a.size} and {b.size}')
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
  p_value = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
  return {'p_value': p_value, 'a_only': a_only, 'b_only': b_only}
