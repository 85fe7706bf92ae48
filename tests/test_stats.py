"""Tests for grpo_jax.pipeline.stats against plain transcriptions (Wilson's closed form, the binomial sum), and the
training summary's intervals and paired test."""
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from conftest import load_config

from grpo_jax.pipeline import stats

Z = NormalDist().inv_cdf(0.975)


def _wilson_closed_form(k, n, z=Z):
  p = k / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return center - half, center + half


def _mcnemar_binomial_sum(b, c):
  """Two-sided exact p-value: twice the smaller tail of Binomial(b + c, 1/2), capped at 1."""
  n = b + c
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


@pytest.mark.parametrize('k,n', [(0, 1), (1, 1), (0, 10), (3, 10), (5, 10), (10, 10), (37, 100), (412, 500),
                                 (1, 500)])
def test_wilson_matches_closed_form(k, n):
  correct = np.zeros(n, bool)
  correct[np.random.default_rng(n + k).choice(n, k, replace=False)] = True
  low, high = stats.wilson_interval(correct)
  want_low, want_high = _wilson_closed_form(k, n)
  assert low == pytest.approx(want_low, abs=1e-12) and high == pytest.approx(want_high, abs=1e-12)
  assert 0 <= low <= k / n <= high <= 1


def test_wilson_hand_worked_all_wrong():
  # k = 0: the closed form reduces to [0, z^2 / (n + z^2)].
  low, high = stats.wilson_interval(np.zeros(10, bool))
  assert low == pytest.approx(0, abs=1e-12)
  assert high == pytest.approx(Z * Z / (10 + Z * Z), abs=1e-12)


def test_wilson_accepts_01_and_counts_agree():
  correct = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1, 0], np.float32)
  assert stats.wilson_interval(correct) == stats.wilson_interval(correct >= 1)
  assert stats.accuracy_interval(float(correct.mean()), correct.size) == stats.wilson_interval(correct)


def test_wilson_narrows_with_more_problems():
  small = stats.wilson_counts(30, 100)
  large = stats.wilson_counts(300, 1000)
  assert large[1] - large[0] < small[1] - small[0]


@pytest.mark.parametrize('bad', [np.array([0.5, 1.0]), np.zeros((2, 2), bool), np.zeros(0, bool)])
def test_wilson_refuses_bad_input(bad):
  with pytest.raises(ValueError):
    stats.wilson_interval(bad)


@pytest.mark.parametrize('a_only,b_only,both,neither', [(0, 0, 5, 5), (1, 6, 10, 3), (0, 5, 0, 0), (3, 3, 2, 2),
                                                        (4, 17, 50, 29), (12, 11, 0, 1), (40, 20, 100, 40)])
def test_mcnemar_matches_binomial_sum(a_only, b_only, both, neither):
  a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, bool)
  b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, bool)
  order = np.random.default_rng(a.size).permutation(a.size)  # pairing, not position, is what counts
  got = stats.mcnemar(a[order], b[order])
  assert got['a_only'] == a_only and got['b_only'] == b_only
  assert got['p_value'] == pytest.approx(_mcnemar_binomial_sum(a_only, b_only), rel=1e-9, abs=1e-15)
  assert stats.mcnemar(b[order], a[order])['p_value'] == pytest.approx(got['p_value'], rel=1e-12)


def test_mcnemar_hand_worked():
  # 1 vs 6 discordant: 2 * (C(7,0) + C(7,1)) / 2^7 = 16 / 128.
  a = np.array([1, 0, 0, 0, 0, 0, 0, 1, 0], bool)
  b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0], bool)
  assert stats.mcnemar(a, b) == {'p_value': pytest.approx(16 / 128), 'a_only': 1, 'b_only': 6}


def test_mcnemar_refuses_other_problems():
  with pytest.raises(ValueError, match='same problems'):
    stats.mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_training_summary_reports_intervals_and_the_paired_test(tiny_run):
  """The tiny run's summary: each accuracy's interval over the held-out problems, GRPO against SFT's McNemar p-value.
  (Without a GRPO stage both are None: test_train's SFT-only run checks that.)"""
  summary = json.loads((tiny_run.workdir / 'summary.json').read_text())
  n = load_config('tiny').task.num_test
  # From the reported accuracy and n, not the per-problem scores the run used: the two must agree.
  assert summary['sft_accuracy_ci'] == pytest.approx(stats.accuracy_interval(summary['sft_accuracy'], n), abs=1e-12)
  assert summary['rl_accuracy_ci'] == pytest.approx(stats.accuracy_interval(summary['rl_accuracy'], n), abs=1e-12)
  assert 0 < summary['rl_vs_sft_mcnemar_p'] <= 1
