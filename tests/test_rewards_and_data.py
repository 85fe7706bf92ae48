"""Tests for rewards (gsm8k_exact), the generated task, the char tokenizer, encoding and batch order."""
import re

import numpy as np
import pytest

from grpo_jax.data import tasks
from grpo_jax.data.batches import TokenizedSplit, batch_indices, encode
from grpo_jax.data.prompts import format_prompt as _format_prompt
from grpo_jax.data.tasks import generate_split, vocabulary
from grpo_jax.data.tokenizer import SPECIAL_TOKENS, build_tokenizer
from grpo_jax.rewards.answers import extract_final_answer
from grpo_jax.rewards.registry import REWARDS, get_reward_fn, gsm8k_exact, gsm8k_partial

MAX_PROMPT_LEN, MAX_NEW_TOKENS = 56, 40  # configs/default.py


def format_prompt(question):
  return _format_prompt(question, template='qa')


@pytest.fixture(scope='module')
def tokenizer():
  return build_tokenizer(vocabulary())


@pytest.fixture(scope='module')
def splits():
  return {name: generate_split(name, size, seed=0) for name, size in (('train', 300), ('val', 60), ('test', 60))}


# ---------------------------------------------------------------------------------------------------------------
# rewards


def _reward(completions, answers):
  return get_reward_fn('gsm8k_exact')(completions, answers)


def test_reward_registry():
  assert get_reward_fn('gsm8k_exact') is gsm8k_exact
  assert 'gsm8k_exact' in REWARDS
  with pytest.raises(ValueError, match='unknown reward'):
    get_reward_fn('nope')


def test_reward_is_float32_zero_one():
  got = _reward(['1+2=3\n#### 3', '#### 4', 'no answer', ''], ['3', '3', '3', '3'])
  assert isinstance(got, np.ndarray)
  assert got.dtype == np.float32
  assert got.shape == (4,)
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 0.0])


def test_reward_empty_batch():
  got = _reward([], [])
  assert got.dtype == np.float32 and got.shape == (0,)


@pytest.mark.parametrize('completion,answer,expected', [
    ('#### 1,234', '1234', 1.0),  # thousands separators in the completion
    ('#### 1234', '1,234', 1.0),  # ... or in the gold answer
    ('#### 1,234,567', '1234567', 1.0),
    ('#### 1,234', '1235', 0.0),
    ('#### -5', '-5', 1.0),  # negative numbers
    ('#### -5', '5', 0.0),
    ('#### 5', '-5', 0.0),
    ('####-12', '-12', 1.0),  # no space after the marker
    ('#### 53\n', '53', 1.0),
    ('#### 53.0', '53', 1.0),  # numeric comparison
    ('#### 0.5', '.5', 1.0),
    ('53', '53', 0.0),  # missing '####'
    ('the answer is 53', '53', 0.0),
    ('#### ', '53', 0.0),  # a marker without a number
    ('#### x', '53', 0.0),
    ('#### 3\n#### 5', '5', 1.0),  # the last '####' wins
    ('#### 3\n#### 5', '3', 0.0),
    ('#### 7 then #### 8 then #### 9', '9', 1.0),
    ('1+2=3\n3+4=7\n#### 7', '7', 1.0),
    ('#### 70', '7', 0.0),  # not a prefix match
    ('#### 7', '70', 0.0),
])
def test_reward_cases(completion, answer, expected):
  assert _reward([completion], [answer])[0] == expected


def test_extract_final_answer():
  assert extract_final_answer('a\n#### 1,234') == '1234'
  assert extract_final_answer('#### -7') == '-7'
  assert extract_final_answer('#### 1\n#### 2') == '2'
  assert extract_final_answer('no marker 5') is None


@pytest.mark.parametrize('n_completions,n_answers', [(2, 1), (1, 2), (0, 1)])
def test_reward_length_mismatch_raises(n_completions, n_answers):
  with pytest.raises(ValueError):
    _reward(['#### 1'] * n_completions, ['1'] * n_answers)


def test_reward_on_gold_solutions(splits):
  # Every generated solution earns reward 1 against its own answer, and 0 against a different answer.
  examples = splits['test']
  got = _reward([e.solution for e in examples], [e.answer for e in examples])
  np.testing.assert_array_equal(got, np.ones(len(examples), np.float32))
  wrong = [str(int(e.answer) + 1) for e in examples]
  np.testing.assert_array_equal(_reward([e.solution for e in examples], wrong), 0.0)


# gsm8k_partial (the :tiny preset's shaping reward): 1.0 for an exact '#### N', else
# 0.5 * (fraction of the gold answer's characters, commas and spaces dropped, found in the completion) + 0.25 * (mark).
@pytest.mark.parametrize('completion,answer,expected', [
    ('#### 53', '53', 1.0),  # exact: gsm8k_exact's 1, not 0.5 + 0.25
    ('#### 1,000', '1000', 1.0),
    ('abc', '53', 0.0),  # no digit of the answer, no mark
    ('', '53', 0.0),
    ('x5y', '53', 0.25),  # one of two digits: 0.5 * 1/2
    ('3 then 5', '53', 0.5),  # both digits, in any order: 0.5 * 2/2
    ('6', '66', 0.5),  # every position of the answer counts, so a repeated digit is found twice
    ('5 and 5', '53', 0.25),  # ... but a digit the answer lacks earns nothing
    ('####', '53', 0.25),  # a mark alone
    ('#### 35', '53', 0.75),  # a wrong marked answer with both digits: 0.5 + 0.25, still below exact
    ('#### 8\n7', '7', 0.75),  # the last marked answer (8) is wrong; 7 occurs elsewhere
    ('7###', '7', 0.5),  # three '#' are no mark
    ('1 000', '1,000', 0.5),  # the gold answer's comma is not a character to find
])
def test_gsm8k_partial_cases(completion, answer, expected):
  got = get_reward_fn('gsm8k_partial')([completion], [answer])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, [expected])


def test_gsm8k_partial_batch_and_errors(splits):
  assert REWARDS['gsm8k_partial'] is gsm8k_partial
  got = gsm8k_partial(['#### 12', '1', 'zz', '#### 2'], ['12', '12', '12', '12'])
  np.testing.assert_allclose(got, [1.0, 0.25, 0.0, 0.5])
  assert gsm8k_partial([], []).shape == (0,)
  with pytest.raises(ValueError):
    gsm8k_partial(['#### 1'], [])
  # Exact wherever gsm8k_exact is: the gold solutions score 1, and wrong answers stay strictly below 1.
  examples = splits['test']
  solutions = [e.solution for e in examples]
  np.testing.assert_array_equal(gsm8k_partial(solutions, [e.answer for e in examples]), 1.0)
  wrong = gsm8k_partial(solutions, [str(int(e.answer) + 1) for e in examples])
  assert (wrong < 1.0).all() and (wrong > 0.0).any()


# ---------------------------------------------------------------------------------------------------------------
# tasks

_LINE = re.compile(r'^(\d+)([+-])(\d+)=(\d+)$')
_QUESTION = re.compile(r'^(\w+) has (\d+) (\w+)\. \1 (.*)\. How many \3 now\?$')
_PHRASE = re.compile(r'(finds|buys|gets|wins|loses|eats|sells|gives away) (\d+)')


def _check_example(ex, *, min_steps=2, max_steps=3, start_range=(10, 99), change_range=(2, 9)):
  *lines, final = ex.solution.split('\n')
  assert min_steps <= len(lines) <= max_steps, ex
  m = _QUESTION.match(ex.question)
  assert m, ex.question
  start = int(m.group(2))
  assert start_range[0] <= start <= start_range[1]
  phrases = _PHRASE.findall(m.group(4))
  assert len(phrases) == len(lines), ex
  value = start
  for line, (verb, change) in zip(lines, phrases, strict=True):
    lm = _LINE.match(line)
    assert lm, line
    a, op, b, c = int(lm.group(1)), lm.group(2), int(lm.group(3)), int(lm.group(4))
    assert a == value, ex  # steps chain from the starting quantity
    assert c == (a + b if op == '+' else a - b), line  # the arithmetic is right
    assert c >= 0 and a >= 0, line  # no negative intermediate values
    assert b == int(change) and change_range[0] <= b <= change_range[1]
    assert (op == '+') == (verb in tasks.GAIN_VERBS), (verb, line)  # question and solution agree
    value = c
  assert final == f'#### {value}', ex
  assert ex.answer == str(value)
  assert extract_final_answer(ex.solution) == ex.answer


def test_generate_split_deterministic_and_seeded():
  a = generate_split('train', 50, seed=3)
  assert a == generate_split('train', 50, seed=3)
  assert a != generate_split('train', 50, seed=4)
  assert len({e.question for e in a} & {e.question for e in generate_split('train', 50, seed=4)}) < 25
  # The first examples of a larger request are the same (a pure prefix of one stream).
  assert generate_split('train', 80, seed=3)[:50] == a


def test_generate_split_sizes_and_distinct(splits):
  for name, size in (('train', 300), ('val', 60), ('test', 60)):
    examples = splits[name]
    assert len(examples) == size
    assert len({e.question for e in examples}) == size
    assert all(isinstance(e, tasks.Example) for e in examples)


def test_splits_pairwise_disjoint(splits):
  questions = {name: {e.question for e in exs} for name, exs in splits.items()}
  assert not questions['train'] & questions['val']
  assert not questions['train'] & questions['test']
  assert not questions['val'] & questions['test']


def test_splits_disjoint_across_seeds():
  # Membership is by question hash, so even different seeds never leak held-out questions into train.
  train = {e.question for seed in (0, 1, 2) for e in generate_split('train', 200, seed=seed)}
  test = {e.question for seed in (5, 6) for e in generate_split('test', 60, seed=seed)}
  assert not train & test


def test_every_solution_is_correct(splits):
  for examples in splits.values():
    for ex in examples:
      _check_example(ex)


def test_custom_ranges_respected():
  kw = dict(min_steps=4, max_steps=5, start_range=(2, 5), change_range=(3, 20))
  examples = generate_split('val', 40, seed=1, **kw)
  for ex in examples:
    _check_example(ex, **kw)
  # Starting at <= 5 with changes up to 20 forces gains whenever a loss would go negative.
  assert any('+' in line for ex in examples for line in ex.solution.split('\n'))


@pytest.mark.parametrize('size', [0, -1])
def test_bad_size_raises(size):
  with pytest.raises(ValueError, match='positive'):
    generate_split('train', size, seed=0)


@pytest.mark.parametrize('split', ['dev', 'TRAIN', ''])
def test_unknown_split_raises(split):
  with pytest.raises(ValueError, match='unknown split'):
    generate_split(split, 10, seed=0)


@pytest.mark.parametrize('min_steps,max_steps', [(0, 2), (3, 2)])
def test_bad_steps_raise(min_steps, max_steps):
  with pytest.raises(ValueError, match='min_steps'):
    generate_split('train', 10, seed=0, min_steps=min_steps, max_steps=max_steps)


def test_too_small_problem_space_raises():
  # 1 step, one start value, one change size: at most 12 names * 10 items * 8 verbs = 960 questions, ~10% in val.
  with pytest.raises(ValueError, match='distinct'):
    generate_split('val', 200, seed=0, min_steps=1, max_steps=1, start_range=(10, 10), change_range=(2, 2))


def test_single_step_question_is_well_formed():
  for ex in generate_split('train', 5, seed=0, min_steps=1, max_steps=1):
    assert ' , ' not in ex.question, ex.question


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_ids(tokenizer):
  ids = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
  assert all(isinstance(i, int) for i in ids)
  assert len(set(ids)) == 4
  assert tokenizer.pad_token == SPECIAL_TOKENS['pad_token'] and tokenizer.eos_token == SPECIAL_TOKENS['eos_token']
  assert tokenizer.padding_side == 'left'


def test_tokenizer_round_trips_every_example(tokenizer, splits):
  texts = []
  for examples in splits.values():
    for ex in examples:
      texts += [format_prompt(ex.question), ex.solution, format_prompt(ex.question) + ex.solution]
  encoded = tokenizer(texts, add_special_tokens=False)['input_ids']
  special = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
  for text, ids in zip(texts, encoded, strict=True):
    assert len(ids) == _num_tokens_expected(text)  # one token per task word, one per other character
    assert not special & set(ids)  # no <unk> (or other special) ids in task text
    assert tokenizer.decode(ids) == text


def _num_tokens_expected(text):
  words = set(vocabulary())
  pieces = re.findall(r'[A-Za-z]+|[\s\S]', text)
  return sum(1 if p in words else len(p) for p in pieces)


def _ntok(tokenizer, text):
  return len(tokenizer(text, add_special_tokens=False)['input_ids'])


def test_tokenizer_words_are_single_tokens_and_others_split_into_characters(tokenizer):
  ids = tokenizer('Mia sells 12 Banana', add_special_tokens=False)['input_ids']
  assert tokenizer.convert_ids_to_tokens(ids) == ['Mia', ' ', 'sells', ' ', '1', '2', ' ', *'Banana']
  assert tokenizer.decode(ids) == 'Mia sells 12 Banana'
  # A task word inside a longer word is not split out (word boundaries).
  assert tokenizer.convert_ids_to_tokens(tokenizer('Mias', add_special_tokens=False)['input_ids']) == list('Mias')


def test_tokenizer_decode_skips_special_tokens(tokenizer):
  ids = tokenizer('#### 42', add_special_tokens=False)['input_ids']
  padded = ids + [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id]
  assert tokenizer.decode(padded, skip_special_tokens=True) == '#### 42'


def test_tokenizer_save_and_reload(tokenizer, splits, tmp_path):
  from transformers import AutoTokenizer

  tokenizer.save_pretrained(str(tmp_path))
  reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
  texts = [format_prompt(e.question) + e.solution for e in splits['val']] + ['', ' \n', 'Q: ?!#$%()']
  assert reloaded(texts, add_special_tokens=False)['input_ids'] == tokenizer(texts, add_special_tokens=False)[
      'input_ids']
  for attr in ('pad_token_id', 'eos_token_id', 'bos_token_id', 'unk_token_id', 'padding_side'):
    assert getattr(reloaded, attr) == getattr(tokenizer, attr), attr
  assert len(reloaded) == len(tokenizer)
  ids = tokenizer(texts[0], add_special_tokens=False)['input_ids']
  assert reloaded.decode(ids) == texts[0]


# ---------------------------------------------------------------------------------------------------------------
# data.encode


def _encode(tokenizer, examples, **kw):
  kw = {'max_prompt_len': MAX_PROMPT_LEN, 'max_new_tokens': MAX_NEW_TOKENS, **kw}
  return encode(tokenizer, examples, **kw)


def test_encode_layout(tokenizer, splits):
  examples = splits['val'][:20]
  enc = _encode(tokenizer, examples)
  assert isinstance(enc, TokenizedSplit) and len(enc) == 20
  assert enc.prompt_tokens.shape == enc.prompt_mask.shape == (20, MAX_PROMPT_LEN)
  assert enc.completion_tokens.shape == enc.completion_mask.shape == (20, MAX_NEW_TOKENS)
  for arr in (enc.prompt_tokens, enc.prompt_mask, enc.completion_tokens, enc.completion_mask):
    assert arr.dtype == np.int32
  assert enc.answers == [e.answer for e in examples]
  pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
  for i, ex in enumerate(examples):
    prompt, solution = format_prompt(ex.question), ex.solution
    # Prompt: left-padded, the mask a contiguous suffix covering exactly the prompt.
    pm = enc.prompt_mask[i]
    n_prompt = _ntok(tokenizer, prompt)
    np.testing.assert_array_equal(pm, np.r_[np.zeros(MAX_PROMPT_LEN - n_prompt), np.ones(n_prompt)])
    assert np.all(enc.prompt_tokens[i, :MAX_PROMPT_LEN - n_prompt] == pad)
    assert tokenizer.decode(enc.prompt_tokens[i, pm == 1].tolist()) == prompt
    # Completion: solution then EOS, right-padded, the mask a contiguous prefix that includes the EOS.
    cm = enc.completion_mask[i]
    n_comp = _ntok(tokenizer, solution) + 1
    np.testing.assert_array_equal(cm, np.r_[np.ones(n_comp), np.zeros(MAX_NEW_TOKENS - n_comp)])
    assert enc.completion_tokens[i, n_comp - 1] == eos
    assert np.all(enc.completion_tokens[i, n_comp:] == pad)
    assert tokenizer.decode(enc.completion_tokens[i, :n_comp - 1].tolist()) == solution
    assert eos not in enc.completion_tokens[i, :n_comp - 1]


def test_encode_exact_fit(tokenizer, splits):
  examples = splits['test'][:10]
  longest_prompt = max(_ntok(tokenizer, format_prompt(e.question)) for e in examples)
  longest_completion = max(_ntok(tokenizer, e.solution) + 1 for e in examples)
  enc = _encode(tokenizer, examples, max_prompt_len=longest_prompt, max_new_tokens=longest_completion)
  assert enc.prompt_mask.sum(axis=1).max() == longest_prompt  # some row has no padding at all
  assert enc.completion_mask.sum(axis=1).max() == longest_completion
  assert (enc.completion_tokens == tokenizer.eos_token_id).sum() == len(examples)


def test_encode_too_long_prompt_raises(tokenizer, splits):
  examples = splits['test'][:10]
  longest_prompt = max(_ntok(tokenizer, format_prompt(e.question)) for e in examples)
  with pytest.raises(ValueError, match='max_prompt_len') as info:
    _encode(tokenizer, examples, max_prompt_len=longest_prompt - 1, split='test')
  assert 'test example' in str(info.value)


def test_encode_too_long_solution_raises(tokenizer, splits):
  examples = splits['test'][:10]
  longest_completion = max(_ntok(tokenizer, e.solution) + 1 for e in examples)  # the EOS counts
  with pytest.raises(ValueError, match='max_new_tokens'):
    _encode(tokenizer, examples, max_new_tokens=longest_completion - 1)


def test_take(tokenizer, splits):
  enc = _encode(tokenizer, splits['val'][:8])
  idx = np.array([5, 0, 5])
  sub = enc.take(idx)
  assert len(sub) == 3
  np.testing.assert_array_equal(sub.prompt_tokens, enc.prompt_tokens[idx])
  np.testing.assert_array_equal(sub.completion_mask, enc.completion_mask[idx])
  assert sub.answers == [enc.answers[i] for i in idx]


# ---------------------------------------------------------------------------------------------------------------
# data.batch_indices


def _epoch(num_examples, epoch, *, seed, stream):
  # A batch of exactly num_examples starting at an epoch boundary is that epoch's whole permutation.
  return batch_indices(num_examples, num_examples, epoch, seed=seed, stream=stream)


def test_batch_indices_deterministic():
  a = batch_indices(20, 4, 7, seed=1, stream='sft')
  np.testing.assert_array_equal(a, batch_indices(20, 4, 7, seed=1, stream='sft'))
  assert a.dtype == np.int64 and a.shape == (4,)
  assert not np.array_equal(_epoch(20, 0, seed=1, stream='sft'), _epoch(20, 0, seed=2, stream='sft'))
  assert not np.array_equal(_epoch(20, 0, seed=1, stream='sft'), _epoch(20, 0, seed=1, stream='grpo'))


def test_each_epoch_is_a_permutation():
  n, b = 12, 4
  steps_per_epoch = n // b
  epochs = []
  for epoch in range(3):
    idx = np.concatenate([batch_indices(n, b, epoch * steps_per_epoch + s, seed=0, stream='sft')
                          for s in range(steps_per_epoch)])
    np.testing.assert_array_equal(np.sort(idx), np.arange(n))
    np.testing.assert_array_equal(idx, _epoch(n, epoch, seed=0, stream='sft'))
    epochs.append(idx)
  assert not np.array_equal(epochs[0], epochs[1])  # a fresh shuffle each epoch
  assert not np.array_equal(epochs[0], np.arange(n))  # actually shuffled


@pytest.mark.parametrize('n,b', [(10, 4), (7, 3), (3, 7), (5, 5), (1, 2)])
def test_batches_across_epoch_boundaries(n, b):
  num_steps = 6
  stream = np.concatenate([_epoch(n, e, seed=9, stream='grpo') for e in range(num_steps * b // n + 1)])
  for step in range(num_steps):
    got = batch_indices(n, b, step, seed=9, stream='grpo')
    assert got.shape == (b,)
    np.testing.assert_array_equal(got, stream[step * b:(step + 1) * b])
    assert np.all((got >= 0) & (got < n))
  for e in range(2):
    np.testing.assert_array_equal(np.sort(stream[e * n:(e + 1) * n]), np.arange(n))


def test_first_integer_reward():
  fn = get_reward_fn('first_integer')
  out = fn(['57 and 12', 'x 12 57', '', '-3', '570'], ['57', '57', '57', '-3', '57'])
  # '57 and 12' -> 57 (right); 'x 12 57' -> 12 (wrong); '' -> none; '-3' -> -3 (right); '570' != '57'
  np.testing.assert_array_equal(out, [1, 0, 0, 1, 0])
  assert out.dtype == np.float32
  with pytest.raises(ValueError):
    fn(['1'], [])


def _teacher_lines(ex):
  """(a, op, b, written result) of each step line of a solution."""
  for line in ex.solution.split('\n')[:-1]:
    lhs, result = line.split('=')
    op = '+' if '+' in lhs else '-'
    a, b = lhs.split(op)
    yield int(a), op, int(b), int(result)


@pytest.mark.parametrize('slip', [0.0, 0.5, 1.0])
def test_teacher_slip_forgets_borrows_only(slip):
  exact = generate_split('train', 400, seed=2)
  taught = generate_split('train', 400, seed=2, teacher_slip=slip)
  # The questions and the (true) answers never depend on the teacher.
  assert [(e.question, e.answer) for e in taught] == [(e.question, e.answer) for e in exact]
  slips = borrows = 0
  for ex in taught:
    running = None
    for a, op, b, result in _teacher_lines(ex):
      assert running is None or a == running  # the teacher carries its own (possibly wrong) value on
      true = a + b if op == '+' else a - b
      borrow = op == '-' and a % 10 < b
      borrows += borrow
      if result != true:  # the only error: the tens digit kept where a borrow was needed
        assert borrow and result == true + 10, (ex.solution, a, op, b, result)
        slips += 1
      running = result
    assert ex.solution.split('\n')[-1] == f'#### {running}'
  assert borrows > 100
  if slip == 0.0:
    assert taught == exact
  elif slip == 1.0:
    assert slips == borrows
  else:
    assert 0.4 < slips / borrows < 0.6
  wrong = sum(ex.solution.split('#### ')[1] != ex.answer for ex in taught)
  assert (wrong == 0) == (slip == 0.0)


@pytest.mark.parametrize('slip', [-0.1, 1.5])
def test_teacher_slip_out_of_range_raises(slip):
  with pytest.raises(ValueError, match='teacher_slip'):
    generate_split('train', 10, seed=0, teacher_slip=slip)
