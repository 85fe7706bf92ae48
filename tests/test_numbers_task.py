"""Tests for the non-verifiable numbers task: generation, splits, the hidden scorer, win_rate, tokenization."""
from __future__ import annotations

import re

import numpy as np
import pytest

from grpo_jax.data import numbers_task as N
from grpo_jax.data.tasks import _split_of
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.rewards.registry import REWARDS, get_reward_fn

SPLITS = ('train', 'val', 'test')


@pytest.fixture(scope='module')
def splits():
  return {name: N.generate_split(name, 2000, seed=0) for name in SPLITS}


# generation


def test_deterministic_in_split_and_seed(splits):
  assert N.generate_split('train', 2000, seed=0) == splits['train']
  assert N.generate_split('train', 50, seed=0) == splits['train'][:50]  # a prefix: sizes do not reshuffle
  assert N.generate_split('train', 50, seed=1) != splits['train'][:50]
  assert N.generate_split('val', 50, seed=0) != N.generate_split('test', 50, seed=0)


def test_splits_are_disjoint_by_triple_and_question_text(splits):
  triples = {name: {N.parse_answer(ex.answer) for ex in exs} for name, exs in splits.items()}
  questions = {name: {ex.question for ex in exs} for name, exs in splits.items()}
  for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test')):
    assert not triples[a] & triples[b], (a, b)
    assert not questions[a] & questions[b], (a, b)
  for name, exs in splits.items():
    assert all(_split_of(ex.question) == name for ex in exs)


def test_questions_repeat_by_design_and_cover_the_ranges(splits):
  test = splits['test']
  assert len(test) == 2000
  assert len({ex.question for ex in test}) < 2000  # far more examples than the ~370 test triples
  counts, los, his = zip(*(N.parse_answer(ex.answer) for ex in splits['train']), strict=True)
  assert set(counts) == {3, 4, 5}
  assert min(los) == 10 and max(los) == 40 and min(his) == 60 and max(his) == 99


def test_question_matches_answer():
  ex = N.generate_split('train', 1, seed=3)[0]
  count, lo, hi = N.parse_answer(ex.answer)
  assert ex.question == f'Write {count} numbers from {lo} to {hi}.'


def test_solutions_are_well_formed_and_score_their_even_fraction(splits):
  examples = [ex for exs in splits.values() for ex in exs]
  expected = []
  for ex in examples:
    count, lo, hi = N.parse_answer(ex.answer)
    assert re.fullmatch(r'[1-9][0-9]*( [1-9][0-9]*)*', ex.solution), ex.solution
    numbers = [int(t) for t in ex.solution.split(' ')]
    assert len(numbers) == count and len(set(numbers)) == count
    assert all(lo <= n <= hi for n in numbers)
    expected.append(sum(n % 2 == 0 for n in numbers) / count)
  scores = N.hidden_score([ex.solution for ex in examples], [ex.answer for ex in examples])
  np.testing.assert_array_equal(scores, np.array(expected, np.float32))


def test_sft_solutions_have_no_parity_preference(splits):
  numbers = [int(t) for ex in splits['train'] for t in ex.solution.split()]
  assert abs(np.mean([n % 2 == 0 for n in numbers]) - 0.5) < 0.02  # ~8000 fair coins: std 0.006


@pytest.mark.parametrize('kwargs,match', [
  ({'split': 'dev'}, 'unknown split'), ({'size': 0}, 'positive'),
  ({'min_count': 4, 'max_count': 3}, 'min_count'), ({'max_count': 11}, 'exceeds'),
  ({'lo_range': (50, 70)}, 'in order'),
])
def test_bad_arguments_raise(kwargs, match):
  args = {'split': 'train', 'size': 5, 'seed': 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    N.generate_split(args.pop('split'), args.pop('size'), **args)


# hidden_score


@pytest.mark.parametrize('completion,expected', [
  ('10 12 14 16', 1.0),  # all even
  ('11 13 15 17', 0.0),  # well-formed, all odd
  ('10 13 15 17', 0.25),
  ('10 99 11 98', 0.5),  # both bounds are inside the range
  ('  10 12 13 15\n', 0.5),  # surrounding whitespace is allowed
  ('10 10 10 10', 0.0),  # repeats: not well-formed (the SFT data's numbers are distinct; a repeated even number
  ('10 12 10 14', 0.0),  # would otherwise score 1 with no preference learned)
  ('10 12 14', 0.0),  # too few
  ('10 12 14 16 18', 0.0),  # too many
  ('10 12 14 100', 0.0),  # above hi
  ('8 12 14 16', 0.0),  # below lo
  ('10 12 14 16.', 0.0),  # extra text
  ('Numbers: 10 12 14 16', 0.0),
  ('10 12 14 16 #### 4', 0.0),
  ('10, 12, 14, 16', 0.0),  # not space-separated
  ('10  12 14 16', 0.0),  # two spaces
  ('10\n12 14 16', 0.0),  # a newline is not a separator
  ('010 12 14 16', 0.0),  # leading zero
  ('-10 12 14 16', 0.0),
  ('', 0.0),
])
def test_hidden_score_by_hand(completion, expected):
  scores = N.hidden_score([completion], ['4 10 99'])
  assert scores.dtype == np.float32 and scores.shape == (1,)
  assert scores[0] == pytest.approx(expected)


def test_hidden_score_reads_each_rows_answer():
  scores = N.hidden_score(['20 22 23', '20 22 23', '20 22 23'], ['3 20 30', '3 21 30', '2 20 30'])
  np.testing.assert_allclose(scores, [2 / 3, 0.0, 0.0])


def test_hidden_score_rejects_bad_inputs():
  with pytest.raises(ValueError, match='2 completions but 1 answers'):
    N.hidden_score(['10', '12'], ['1 10 20'])
  with pytest.raises(ValueError, match='count lo hi'):
    N.hidden_score(['10'], ['10'])  # a gold output is not an answer here


def test_registered_as_a_reward():
  assert REWARDS['numbers_hidden'] is N.hidden_score
  assert get_reward_fn('numbers_hidden')(['12 14 15'], ['3 10 20']).tolist() == pytest.approx([2 / 3])


# win_rate


def test_win_rate_by_hand():
  a, b = np.array([1.0, 0.5, 0.0, 0.25]), np.array([0.0, 0.5, 1.0, 0.0])
  assert N.win_rate(a, b) == 0.625  # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4
  assert N.win_rate(b, a) == 0.375
  assert N.win_rate(a, a) == 0.5
  assert N.win_rate([1.0], [0.0]) == 1.0


@pytest.mark.parametrize('a,b', [([1.0, 0.0], [1.0]), ([], []), ([[1.0]], [[0.0]])])
def test_win_rate_rejects_bad_shapes(a, b):
  with pytest.raises(ValueError, match='same length'):
    N.win_rate(np.array(a), np.array(b))


# tokenizer


def test_tokenizer_round_trips_questions_and_solutions(splits):
  tokenizer = build_tokenizer(N.vocabulary())
  ex = splits['train'][0]
  for text in (ex.question, ex.solution, 'Write 5 numbers from 40 to 60.\n12 14 16 18 20'):
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
  tokens = tokenizer.convert_ids_to_tokens(tokenizer('Write 4 numbers from 12 to 87.',
                                                     add_special_tokens=False)['input_ids'])
  assert tokens == ['Write', ' ', '4', ' ', 'numbers', ' ', 'from', ' ', '1', '2', ' ', 'to', ' ', '8', '7', '.']
  assert N.vocabulary() == ['Write', 'from', 'numbers', 'to']
