"""grpo_jax.rewards.answers: every final-answer reader on hand-worked cases, and on the shipped gold solutions."""
import json
from fractions import Fraction

import pytest

from grpo_jax.data import datasets
from grpo_jax.rewards import answers as A, registry, verifiers


def _rows(name: str, split: str = 'test') -> list[dict]:
  with open(datasets.DATA_DIR / name / f'{split}.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------ boxes
@pytest.mark.parametrize('text, expected', [
    (r'So $x = \boxed{\frac{1}{2}}$.', r'\frac{1}{2}'),  # nested braces
    (r'\boxed{1} then \boxed{\{a, b\}}', r'\{a, b\}'),  # the last box wins; escaped braces still pair up
    (r'\boxed{a^{2}} and then a truncated \boxed{b', 'a^{2}'),  # an unclosed box is skipped
    (r'\boxed{1} \boxed{\frac{2}{3}', '1'),  # a complete '{2}' inside the unclosed box is no box
    (r'\boxed{b', None), (r'\boxed{{b}', None),  # nothing complete
    (r'\fbox{7}', '7'), (r'\boxed{1} \fbox{2}', '2'), (r'\fbox{1} \boxed{2}', '2'),
    (r'$\boxed 5$', '5'), (r'\boxed 5 apples', '5'),  # no braces: one token
    (r'\boxed{1} and \boxed 2', '2'), (r'\boxed 2 and \boxed{1}', '1'),
    (r'\boxed{ 3 }', '3'), (r'\boxed {4}', '4'), (r'\boxed{}', ''),
    ('no box', None), ('', None),
])
def test_last_boxed(text, expected):
  assert A.last_boxed(text) == expected


def test_math500_gold_boxes_are_closed_so_the_truncation_rule_never_applies():
  rows = _rows('math500')
  assert [A.last_boxed(r['solution']) for r in rows] == [r['answer'] for r in rows]
  for r in rows:
    s = r['solution']
    start = max(s.rfind('\\boxed'), s.rfind('\\fbox'))
    # The box at the last occurrence is complete, so skipping unclosed boxes and giving up on them agree here.
    assert A.last_boxed(s[start:]) == A.last_boxed(s), r['unique_id']


# ------------------------------------------------------------------------------------------------ '####'
@pytest.mark.parametrize('text, expected', [
    ('a\n#### 1,080', ['1080']), ('#### 1\n#### 2', ['1', '2']), ('##### 5', ['5']), ('no mark', []),
])
def test_mark_tails(text, expected):
  assert [t.strip().replace(',', '') for t in A.mark_tails(text)] == expected


@pytest.mark.parametrize('text, expected', [
    ('3 + 4 = <<3+4=7>>7\n#### 1,080', '1080'), ('#### 1\n#### 2', '2'), ('#### -5', '-5'),
    ('#### 72 dollars', '72 dollars'),  # the gold text as written, not only its number
    ('##### 5', '5'), ('no final answer', None),
])
def test_gsm8k_answer(text, expected):
  assert A.gsm8k_answer(text) == expected


@pytest.mark.parametrize('text, expected', [
    ('a\n#### 1,080', '1080'), ('#### -7', '-7'), ('#### 3.5', '3.5'), ('#### 1\n#### 2', '2'), ('####\n12', '12'),
    ('#### 12 apples', '12'),
    ('#### $18', None), ('#### eighteen', None),  # gsm8k_exact is strict: a number right after the mark
    ('#### 5\n#### x', '5'),  # the last mark that has a number
    ('no marker 5', None),
])
def test_extract_final_answer(text, expected):
  assert A.extract_final_answer(text) == expected


@pytest.mark.parametrize('text, expected', [
    ('a\n#### 1,080', '1080'), ('#### $18.00', '18.00'), ('#### 3/4', '3/4'), ('#### 50%', '50%'),
    ('#### The total is 12.', '12'), ('####\n  7 apples', '7'), ('#### 5\nmore 9', '5'),
    ('#### 1\n#### 2', '2'), ('#### 1 #### 2', '2'),  # the last mark, also on one line
    ('#### twelve', None), ('#### 5\n#### x', None),  # only the last mark's line counts
    ('no mark 5', None),
])
def test_marked_number(text, expected):
  assert A.marked_number(text) == expected


@pytest.mark.parametrize('split', ['test', 'train'])
def test_the_three_mark_readers_agree_on_gsm8k_gold_solutions(split):
  solutions = [r['answer'] for r in _rows('gsm8k', split)]
  gold = [A.gsm8k_answer(s) for s in solutions]
  assert None not in gold and any(',' in s.rsplit('####', 1)[1] for s in solutions)  # commas are exercised
  assert [A.extract_final_answer(s) for s in solutions] == gold
  assert [A.marked_number(s) for s in solutions] == gold


# ------------------------------------------------------------------------------------------------ numbers
def test_numbers():
  assert A.first_number(r'costs \$1,000.50 or 3') == '1000.50'
  assert A.first_number(r'\frac{3}{4} of it') == '3/4'
  assert A.first_number('50 % off') == '50%'
  assert A.first_number('none') is None
  assert A.last_number('1 then \u22122.') == '-2'
  assert A.parse_number('50%') == (Fraction(50), True)
  assert A.parse_number('-3.50') == (Fraction(-7, 2), False)
  assert A.parse_number('1/0') is None and A.parse_number('x') is None


# ------------------------------------------------------------------------------------------------ benchmarks
@pytest.mark.parametrize('text, expected', [
    ('#### 7\nThe answer is 9', '7'), ('The answer is 9.\n\\boxed{8}', '8'), ('The ANSWER IS 12. Then 13', '12'),
    ('#### twelve\nthe answer is 12', '12'), ('Q: 2+3? 2+3=5. Total 5.', '5'),
    ('\\boxed{12} then \\boxed{1', '12'),  # the truncated box is skipped, the complete one read
    ('nothing here', None),
])
def test_extract_gsm8k_answer(text, expected):
  assert A.extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize('text, expected', [
    ('答案是 3/4', '3/4'), ('答案：$\\boxed{5}$', '5'), ('所以答案是：9页。还剩 8 页', '9'), ('一共 12', '12'),
    ('无', None),
])
def test_extract_cmath_answer(text, expected):
  assert A.extract_cmath_answer(text) == expected


@pytest.mark.parametrize('text, expected', [
    ('so \\boxed{\\frac{1}{2}}.', '\\frac{1}{2}'), ('\\boxed{x} then \\boxed{42', 'x'),
    ('The final answer is $\\frac12$. I hope it is correct.', '\\frac12'), ('So the answer is 3.5. Done.', '3.5'),
    ('I think 42', None),  # no last-number fallback for symbolic answers
])
def test_extract_math_answer(text, expected):
  assert A.extract_math_answer(text) == expected


def test_extract_answer_dispatch():
  assert set(A.EXTRACTORS_BY_VERIFIER) == set(verifiers.VERIFIERS)
  assert A.extract_answer('gsm8k', 'so #### 1,234') == '1234'
  with pytest.raises(ValueError, match='unknown verifier'):
    A.extract_answer('mmlu', 'x')


# ------------------------------------------------------------------------------------------------ users
def test_users_read_answers_through_this_module():
  assert datasets.EXTRACTORS == {'gsm8k': A.gsm8k_answer, 'boxed': A.last_boxed}
  assert registry.gsm8k_exact(['#### 1,080', '#### $1080', '#### 5\n#### x'], ['1080', '1080', '5']).tolist() == [
      1.0, 0.0, 1.0]
  # The gsm8k verifier reads the gold number of a full solution with the same mark reader.
  assert verifiers.gsm8k_reward(['the answer is 1080'], ['a\n#### 1,080'])[0] == 1.0


def test_load_jsonl_boxed_skips_a_truncated_box(tmp_path):
  path = tmp_path / 'x.jsonl'
  path.write_text(json.dumps({'q': 'q', 'a': 'So \\boxed{3}. Also \\boxed{4'}) + '\n', encoding='utf-8')
  [ex] = datasets.load_jsonl(path, question_field='q', answer_field='a', answer_from_solution='boxed')
  assert ex.answer == '3'
