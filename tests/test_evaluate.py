"""Evaluation helpers: batching over a split, pass@1, majority voting and maj@k, with a fake sampler."""
import functools

import jax
import numpy as np
import pytest

from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.pipeline.evaluate import decode_records, maj_at_k, majority_answers, pass_at_1, sample_texts, vote
from grpo_jax.rewards.answers import extract_answer
from grpo_jax.rewards.verifiers import VERIFIERS, answers_equivalent
from grpo_jax.rollout.sampling import Completions

TOK = build_tokenizer()
GSM8K_SAME = functools.partial(answers_equivalent, 'gsm8k')


def fake_split(answers):
  n = len(answers)
  ids = np.arange(n, dtype=np.int32)[:, None]  # the prompt is just the example's index
  return TokenizedSplit(ids, np.ones_like(ids), np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int32), answers)


def fake_sampler(script, group_size=1):
  """Completions whose texts are script[example index][sample]: a stand-in for make_sampler."""
  calls = []

  def sampler(params, prompt_tokens, prompt_mask, rng):
    calls.append(prompt_tokens[:, 0].tolist())
    texts = [script[int(i)][g] for i in prompt_tokens[:, 0] for g in range(group_size)]
    ids = [TOK(t, add_special_tokens=False)['input_ids'] for t in texts]
    width = max(map(len, ids))
    tokens = np.full((len(ids), width), TOK.pad_token_id, np.int32)
    mask = np.zeros_like(tokens)
    for r, row in enumerate(ids):
      tokens[r, :len(row)], mask[r, :len(row)] = row, 1
    return Completions(tokens, mask, np.zeros(tokens.shape, np.float32))

  return sampler, calls


def test_sample_texts_pads_the_last_batch_by_wrapping():
  script = {i: [f'#### {i}'] for i in range(5)}
  sampler, calls = fake_sampler(script)
  texts = sample_texts(sampler, None, fake_split([str(i) for i in range(5)]), TOK, batch_size=2,
                       rng=jax.random.key(0))
  assert texts == [f'#### {i}' for i in range(5)]
  assert calls == [[0, 1], [2, 3], [4, 0]]  # fixed batch shape: one compile


def test_pass_at_1_counts_verified_answers():
  script = {0: ['#### 3'], 1: ['The answer is 7.'], 2: ['no idea'], 3: ['#### 1,000']}
  sampler, _ = fake_sampler(script)
  result = pass_at_1(sampler, None, fake_split(['3', '8', '2', '1000']), TOK, VERIFIERS['gsm8k'], batch_size=4,
                     rng=jax.random.key(0))
  assert result['accuracy'] == 0.5 and result['sample'] == '#### 3' and result['reward_failures'] == 0


def test_majority_answers():
  extract = lambda t: extract_answer('gsm8k', t)  # noqa: E731
  texts = ['#### 4', '#### 5', '#### 5', 'nothing', 'nothing', 'nothing', '#### 2', '#### 3', '#### 3']
  assert majority_answers(texts, 3, extract) == ['5', None, '3']


def test_equivalent_answers_vote_together():
  gsm8k = functools.partial(answers_equivalent, 'gsm8k')
  # By string '7' wins 2 to 1; by value one half has three votes.
  answers = ['7', '1/2', '7', '0.5', '0.50']
  assert vote(answers) == '7'
  assert vote(answers, gsm8k) == '1/2'  # the class is named by its first answer
  assert vote(['3', '4'], gsm8k) == '3' and vote([], gsm8k) is None  # a tie goes to the answer seen first
  # MATH's equivalence (math-verify): \frac{1}{2} and 0.5 are one answer, 2 another.
  math = functools.partial(answers_equivalent, 'math', timeout_s=120)  # a loaded machine must not split the vote
  assert vote(['2', '\\frac{1}{2}', '2', '0.5', '\\dfrac{1}{2}'], math) == '\\frac{1}{2}'
  extract = lambda t: extract_answer('gsm8k', t)  # noqa: E731
  texts = ['#### 7', '#### 1/2', '#### 7', '#### 0.5', '#### 0.50']
  assert majority_answers(texts, 5, extract) == ['7'] and majority_answers(texts, 5, extract, gsm8k) == ['1/2']


def test_maj_at_k_counts_equivalent_answers_as_one():
  # Two samples say 7, three say one half in three spellings: string voting picks 7, the verifier's equivalence 1/2.
  script = {0: ['#### 7', '#### 1/2', '#### 7', '#### 0.5', '#### 0.50']}
  sampler, _ = fake_sampler(script, group_size=5)
  extract = lambda t: extract_answer('gsm8k', t)  # noqa: E731
  common = dict(k=5, batch_size=1, rng=jax.random.key(0))
  by_value = maj_at_k(sampler, None, fake_split(['0.5']), TOK, VERIFIERS['gsm8k'], extract,
                      same=functools.partial(answers_equivalent, 'gsm8k'), **common)
  by_string = maj_at_k(sampler, None, fake_split(['0.5']), TOK, VERIFIERS['gsm8k'], extract,
                       same=lambda a, b: a == b, **common)
  assert by_value['accuracy'] == 1.0 and by_string['accuracy'] == 0.0


def test_maj_at_k_beats_a_wrong_greedy_sample():
  # Problem 0: 2 of 3 samples right -> the vote is right. Problem 1: 1 of 3 right -> wrong. Problem 2: none.
  script = {0: ['#### 12', '#### 11', 'so #### 12'], 1: ['#### 5', '#### 6', '#### 6'], 2: ['?', '?', '?']}
  sampler, _ = fake_sampler(script, group_size=3)
  result = maj_at_k(sampler, None, fake_split(['12', '5', '1']), TOK, VERIFIERS['gsm8k'],
                    lambda t: extract_answer('gsm8k', t), same=GSM8K_SAME, k=3, batch_size=2, rng=jax.random.key(0))
  assert result['accuracy'] == 1 / 3 and result['no_answer'] == 1 / 3


def test_decode_records_resumes_after_the_saved_batches():
  script = {i: [f'#### {i}'] for i in range(5)}
  sampler, calls = fake_sampler(script)
  split, saved = fake_split([str(i) for i in range(5)]), []
  whole = decode_records(sampler, None, split, TOK, batch_size=2, rng=jax.random.key(0),
                         on_batch=lambda records: saved.append(list(records)))
  assert whole == [f'#### {i}' for i in range(5)] and saved == [whole[:2], whole[:4], whole]
  calls.clear()
  resumed = decode_records(sampler, None, split, TOK, batch_size=2, rng=jax.random.key(0), done=saved[0])
  assert resumed == whole and calls == [[2, 3], [4, 0]]  # the saved batch is not decoded again
  calls.clear()
  assert decode_records(sampler, None, split, TOK, batch_size=2, rng=jax.random.key(0), done=whole) == whole
  assert calls == []
  with pytest.raises(ValueError, match='not a whole number of batches'):
    decode_records(sampler, None, split, TOK, batch_size=2, rng=jax.random.key(0), done=whole[:3])


def test_a_resumed_batch_gets_the_rng_of_its_place():
  keys = []

  def sampler(params, prompt_tokens, prompt_mask, rng):
    keys.append(jax.random.key_data(rng).tolist())
    return Completions(prompt_tokens, prompt_mask, np.zeros(prompt_tokens.shape, np.float32))

  split = fake_split([str(i) for i in range(5)])
  decode_records(sampler, None, split, TOK, batch_size=2, rng=jax.random.key(0))
  whole, keys[:] = list(keys), []
  decode_records(sampler, None, split, TOK, batch_size=2, rng=jax.random.key(0), done=['x'] * 4)
  assert keys == whole[2:]


def test_maj_at_k_resumes_from_voted_answers():
  script = {0: ['#### 12', '#### 11', 'so #### 12'], 1: ['#### 5', '#### 6', '#### 6'], 2: ['?', '?', '?']}
  sampler, calls = fake_sampler(script, group_size=3)
  split, saved = fake_split(['12', '5', '1']), []
  extract = lambda t: extract_answer('gsm8k', t)  # noqa: E731
  whole = maj_at_k(sampler, None, split, TOK, VERIFIERS['gsm8k'], extract, same=GSM8K_SAME, k=3, batch_size=2,
                   rng=jax.random.key(0), on_batch=lambda voted: saved.append(list(voted)))
  assert saved == [['12', '6'], ['12', '6', None]]  # one answer per problem is what gets saved, not k completions
  calls.clear()
  resumed = maj_at_k(sampler, None, split, TOK, VERIFIERS['gsm8k'], extract, same=GSM8K_SAME, k=3, batch_size=2,
                     rng=jax.random.key(0), done=saved[0])
  assert resumed == whole and calls == [[2, 0]]


def test_pass_at_1_resumes_from_saved_completions():
  script = {0: ['#### 3'], 1: ['The answer is 7.'], 2: ['no idea'], 3: ['#### 1,000']}
  sampler, calls = fake_sampler(script)
  split = fake_split(['3', '8', '2', '1000'])
  whole = pass_at_1(sampler, None, split, TOK, VERIFIERS['gsm8k'], batch_size=2, rng=jax.random.key(0),
                    keep_completions=True)
  calls.clear()
  resumed = pass_at_1(sampler, None, split, TOK, VERIFIERS['gsm8k'], batch_size=2, rng=jax.random.key(0),
                      keep_completions=True, done=['#### 3', 'The answer is 7.'])
  assert resumed == whole and calls == [[2, 3]]
