"""Tests of the benchmark verifiers (rewards/verifiers.py): gold data, equivalence tables, timeouts and failures."""
import json
import operator
import os
import time

import numpy as np
import pytest

from grpo_jax.rewards import answers as A, verifiers as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A prediction on which sympy computes 10^(10^10) exactly: math-verify never returns (checked: > 3 s, still running).
PATHOLOGICAL = '\\boxed{10^{10^{10}}}'


def _load(name: str) -> list[dict]:
  with open(os.path.join(ROOT, 'data', name, 'test.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module', autouse=True)
def _stop_pool():
  yield
  V.shutdown()


# ------------------------------------------------------------------------------------------------ gold data
def test_gsm8k_gold_solutions_score_one_and_a_wrong_answer_zero():
  rows = _load('gsm8k')
  assert len(rows) == 1319
  solutions = [r['answer'] for r in rows]
  gold = [s.split('####')[-1].strip() for s in solutions]  # 14 of them have thousands commas, e.g. '2,125'
  np.testing.assert_array_equal(V.gsm8k_reward(solutions, gold), 1.0)
  wrong = [str(int(g.replace(',', '')) + 1) for g in gold]
  np.testing.assert_array_equal(V.gsm8k_reward(solutions, wrong), 0.0)
  # The gold may also be the full solution ('... #### 18').
  np.testing.assert_array_equal(V.gsm8k_reward([f'The answer is {g}.' for g in gold], solutions), 1.0)


def test_math500_gold_answers_verify_against_themselves():
  rows = _load('math500')
  assert len(rows) == 500
  answers = [r['answer'] for r in rows]
  # Our extraction recovers the gold answer from every gold solution's last \boxed{}.
  assert [A.last_boxed(r['solution']) for r in rows] == answers
  # All 500 pass (about 2 s with 2 workers); math-verify needs no known exceptions on this file.
  rewards = V.math_reward(['\\boxed{' + a + '}' for a in answers], answers)
  assert [rows[i]['unique_id'] for i in np.flatnonzero(rewards != 1.0)] == []
  np.testing.assert_array_equal(V.math_reward([r['solution'] for r in rows], answers), 1.0)


def test_cmath_gold_answers_score_one_at_the_end_of_a_completion():
  rows = _load('cmath')
  assert len(rows) == 600
  gold = [r['answer'] for r in rows]
  # Every gold answer is numeric: 517 integers, 52 decimals, 28 fractions ('2/6', '30/42'), 3 percents ('12%').
  assert all(V.parse_number(g) is not None for g in gold)
  assert sum('/' in g for g in gold) == 28 and sum('%' in g for g in gold) == 3
  for template in ('解：……所以答案是 {}。', '一共 {}', 'The answer is {}.', '答案：$\\boxed{{{}}}$'):
    np.testing.assert_array_equal(V.cmath_reward([template.format(g) for g in gold], gold), 1.0)
  wrong = [f'答案是 {float(V.parse_number(g)[0]) + 1:g}' for g in gold]
  np.testing.assert_array_equal(V.cmath_reward(wrong, gold), 0.0)


# ------------------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize('completion, expected', [
    ('#### 1,000', '1000'), ('The answer is $18.00.', '18.00'), ('so \\boxed{\\$18}', '18'),
    ('The answer is: -5', '-5'), ('we get 3.50 dollars.', '3.50'), ('\\boxed{\\frac{3}{4}}', '3/4'),
    ('She pays 50%.', '50%'), ('It costs 18 dollars', '18'), ('−7', '-7'), ('-$5', '-5'), ('$-5', '-5'),
    ('The answer is \\text{18 apples}', '18'), ('x-5 = 3 so 8', '8'), ('nothing here', None),
    ('#### 7\nThe answer is 9', '7'),  # '####' outranks the other markers
    ('The answer is 9.\n\\boxed{8}', '8'),  # \boxed outranks 'the answer is'
    ('The ANSWER IS 12. Then 13', '12'),  # a marker outranks the last number
    ('#### twelve\nthe answer is 12', '12'),  # a marker without a number falls through
    ('Q: 2+3? 2+3=5. Total 5.', '5'),  # no marker: the last number (DeepSeekMath's rule)
])
def test_extract_gsm8k_answer(completion, expected):
  assert V.extract_gsm8k_answer(completion) == expected


@pytest.mark.parametrize('a, b, equal', [
    ('1,000', '1000', True), ('$18.00', '18', True), ('\\$18', '18', True), ('-5', '5', False), ('3.50', '3.5', True),
    ('3/4', '0.75', True), ('\\frac{3}{4}', '0.75', True), ('50%', '50', True), ('18.', '18', True),
    ('18.5', '18.5000001', True), ('18', '18.001', False), ('0', '0.0', True), ('7', '-7', False),
    ('1,450,000', '1450001', False), ('1/3', '0.3333333', True), ('1/3', '0.33', False),
])
def test_gsm8k_and_cmath_equivalence(a, b, equal):
  for name in ('gsm8k', 'cmath'):
    assert V.answers_equivalent(name, a, b) is equal
  assert V.gsm8k_reward([f'#### {a}'], [b])[0] == float(equal)


@pytest.mark.parametrize('completion, gold, correct', [
    ('所以答案是：9页。', '9', True), ('答案：1/3', '2/6', True), ('答案为 \\frac{5}{7}', '30/42', True),
    ('超产 12%。', '12%', True), ('答案是 0.12', '12%', True), ('答案是 12', '12%', True),
    ('答案是：9页。还剩 8 页', '9', True),  # the marker outranks the last number
    ('最后剩下 ９ 个', '9', True),  # full-width digits
    ('答案是 2.5', '2.50', True), ('答案是 1/2', '2', False), ('答案是 25', '2.5', False),
])
def test_cmath_table(completion, gold, correct):
  assert V.cmath_reward([completion], [gold])[0] == float(correct)


@pytest.mark.parametrize('text, expected', [
    ('so $\\boxed{\\frac{1}{2}}$.', '\\frac{1}{2}'), ('\\boxed{a}, then \\boxed{\\{1, 2\\}}', '\\{1, 2\\}'),
    ('\\boxed 5$', '5'), ('\\fbox{x+1}', 'x+1'), ('\\boxed{a} and a truncated \\boxed{b', 'a'), ('no box', None),
])
def test_extract_boxed(text, expected):
  assert A.last_boxed(text) == expected


# (gold, prediction, equivalent): only pairs whose expected outcome is mathematically right (checked against
# math-verify 0.9.0). Left out: '52_8' vs '52' (math-verify says equal; base 8 52 is 42).
MATH_PAIRS = [
    ('\\frac{1}{2}', '0.5', True), ('\\frac{\\sqrt{2}}{2}', '\\sqrt{2}/2', True),
    ('\\frac{\\sqrt2}{2}', '\\sqrt{2}/2', True),
    ('[1,2)', '[1, 2)', True), ('(1,2]', '(1,2)', False), ('(1,2)', '(2,1)', False), ('(1,2)', '(1, 2)', True),
    ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}', True),
    ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}', True),
    ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}', False),
    ('\\text{(C)}', 'C', True), ('\\text{(C)}', 'D', False), ('\\text{Evelyn}', 'Evelyn', True),
    ('\\text{Evelyn}', '\\text{Bob}', False), ('10\\%', '0.1', True),
    ('10\\%', '10', True),  # MATH's convention, which math-verify follows: a percent answer may drop its sign
    ('1,-2', '-2, 1', True), ('3, 5, 7', '7,5,3', True), ('\\{1,2\\}', '\\{2,1\\}', True), ('x=5', '5', True),
    ('90^\\circ', '90', True), ('6 - 5i', '6-5i', True), ('\\pi', '3.14', False), ('\\frac{14}{3}', '4.67', False),
    ('\\frac{14}{3}', '\\dfrac{14}{3}', True), ('p - q', '-q+p', True), ('x^2+2x+1', '(x+1)^2', True),
    ('(-\\infty, 0) \\cup (1, \\infty)', '(1,\\infty)\\cup(-\\infty,0)', True), ('1000', '1,000', True),
    ('0.15', '\\frac{3}{20}', True), ('-\\frac{\\pi}{6}', '-\\pi/6', True), ('11\\sqrt2', '11\\sqrt{2}', True),
    ('2', '3', False), ('\\$18', '18', True), ('5\\text{ cm}', '5', True),
]


def test_math_equivalence_table():
  golds, preds, expected = zip(*MATH_PAIRS, strict=True)
  rewards = V.math_reward([f'so \\boxed{{{p}}}.' for p in preds], list(golds))
  wrong = [pair for pair, r in zip(MATH_PAIRS, rewards, strict=True) if r != float(pair[2])]
  assert wrong == []


def test_math_extraction_and_no_answer():
  completions = ['The final answer is $\\frac12$. I hope it is correct.', 'So the answer is 3.5. Done.',
                 'I think 42', '\\boxed{x} then \\boxed{42']
  np.testing.assert_array_equal(V.math_reward(completions, ['0.5', '7/2', '42', '42']), [1.0, 1.0, 0.0, 0.0])


def test_extract_answer_and_answers_equivalent_for_voting():
  assert A.extract_answer('gsm8k', 'so #### 1,234') == '1234'
  assert A.extract_answer('cmath', '答案是 3/4') == '3/4'
  assert A.extract_answer('math', 'so \\boxed{\\frac{1}{2}}') == '\\frac{1}{2}'
  assert V.answers_equivalent('math', '\\left( 1, 2 \\right)', '(1,2)')  # by string normalization
  assert V.answers_equivalent('math', '\\frac{1}{2}', '0.5')  # by math-verify
  assert not V.answers_equivalent('math', '\\frac{1}{2}', '2')
  assert not V.answers_equivalent('gsm8k', None, '2')
  with pytest.raises(ValueError):
    A.extract_answer('mmlu', 'x')
  assert set(V.VERIFIERS) == {'gsm8k', 'math', 'cmath'}


# ------------------------------------------------------------------------------------------------ failures
def test_a_hanging_verification_is_nan_within_the_timeout_and_the_pool_recovers():
  V.math_reward(['\\boxed{1}'], ['1'])  # start the workers outside the timed part
  start = time.monotonic()
  rewards = V.math_reward(['\\boxed{1}', PATHOLOGICAL, '\\boxed{2}'], ['1', '1', '1'], timeout_s=1.0)
  elapsed = time.monotonic() - start
  assert np.isnan(rewards[1]) and rewards[0] == 1.0 and rewards[2] == 0.0
  assert elapsed < 6.0, elapsed  # about the 1 s limit, plus slack for 2 shared cores
  np.testing.assert_array_equal(V.math_reward(['\\boxed{0.5}'] * 8, ['\\frac12'] * 8), 1.0)


def test_an_injected_slow_function_is_nan_and_the_rest_of_its_chunk_still_runs():
  # time.sleep stands in for a hanging verifier; it returns None, a falsy result, hence 0.0 when it finishes.
  # 48 items make chunks of several (48 // (4 * workers)), so the hang sits inside a chunk whose tail is re-queued.
  items = [(0.001,)] * 48
  items[2] = (60.0,)
  start = time.monotonic()
  rewards = V.run_bounded(time.sleep, items, timeout_s=1.0)
  assert time.monotonic() - start < 8.0
  expected = np.zeros(len(items), np.float32)
  expected[2] = np.nan
  np.testing.assert_array_equal(rewards, expected)


def test_configure_sets_the_worker_count_and_the_default_timeout():
  old = dict(V._settings)
  try:
    V.configure(timeout_s=0.5, num_workers=1)
    start = time.monotonic()
    rewards = V.run_bounded(time.sleep, [(0.001,), (60.0,), (0.001,)])  # one worker: the hang blocks the queue
    np.testing.assert_array_equal(rewards, [0.0, np.nan, 0.0])
    assert time.monotonic() - start < 8.0
  finally:
    V.configure(**old)


def test_exceptions_and_dead_workers_give_nan_not_a_crash():
  np.testing.assert_array_equal(V.run_bounded(int, [('x',), ('3',), ('0',)]), [np.nan, 1.0, 0.0])
  # A verifier that raises (TypeError: str / str), and a gold answer math-verify cannot parse.
  assert np.isnan(V.math_reward(['\\boxed{1}'], ['1'], worker_fn=operator.truediv)).all()
  np.testing.assert_array_equal(V.math_reward(['\\boxed{1}', '\\boxed{1}'], ['', '1']), [np.nan, 1.0])
  assert np.isnan(V.run_bounded(os._exit, [(3,)])).all()  # the worker dies mid-item
  np.testing.assert_array_equal(V.math_reward(['\\boxed{2}'], ['2']), [1.0])


def test_no_items_and_mismatched_lengths():
  assert V.math_reward([], []).shape == (0,)
  for fn in V.VERIFIERS.values():
    with pytest.raises(ValueError):
      fn(['a', 'b'], ['a'])
    assert fn(['#### 3', 'no'], ['3', '4']).dtype == np.float32
