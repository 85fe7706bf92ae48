"""Tests for process supervision's building blocks: grpo_jax.rewards.steps (step verifiers) and
grpo_jax.rollout.steps (step boundaries and texts), end to end into core.advantages.process_advantages."""
from __future__ import annotations

import numpy as np
import pytest

from grpo_jax.data.prompts import format_prompt
from grpo_jax.data.tasks import generate_split, vocabulary
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.rewards.steps import STEP_VERIFIERS, arithmetic_steps, get_step_verifier
from grpo_jax.rollout.steps import delimiter_token_ids, step_boundaries, step_texts

QUESTION = 'Mia has 47 shells. Mia finds 8, eats 5, then buys 3. How many shells now?'
PROMPT = format_prompt(QUESTION, template='qa')
GOLD = ['47+8=55\n', '55-5=50\n', '50+3=53\n', '#### 53']


@pytest.fixture(scope='module')
def tokenizer():
  return build_tokenizer(vocabulary())


# ------------------------------------------------------------------------------------------ arithmetic_steps
def test_correct_solution_scores_every_step():
  assert arithmetic_steps(PROMPT, GOLD, '53') == [1.0, 1.0, 1.0, 1.0]


def test_every_generated_gold_solution_scores_all_ones():
  # the task's own solutions, with 'gives away' and 2 or 3 changes, through the plain 'qa' prompt
  for ex in generate_split('train', 40, seed=3):
    steps = ex.solution.splitlines(keepends=True)
    assert arithmetic_steps(format_prompt(ex.question, template='qa'), steps, ex.answer) == [1.0] * len(steps), ex


def test_wrong_middle_line():
  # 55-5 is 50: line 2 fails. Line 3 carries 51 forward correctly and is a valid move; the answer is wrong.
  assert arithmetic_steps(PROMPT, ['47+8=55\n', '55-5=51\n', '51+3=54\n', '#### 54'], '53') == [1.0, 0.0, 1.0, 0.0]
  # line 3 silently switching back to the right value does not start from line 2's result
  assert arithmetic_steps(PROMPT, ['47+8=55\n', '55-5=51\n', '50+3=53\n', '#### 53'], '53') == [1.0, 0.0, 0.0, 1.0]


def test_line_starting_from_the_wrong_previous_result():
  assert arithmetic_steps(PROMPT, ['47+8=55\n', '56-5=51\n', '51+3=54\n', '#### 54'], '53') == [1.0, 0.0, 1.0, 0.0]
  # the first line must start from the question's starting quantity
  assert arithmetic_steps(PROMPT, ['46+8=54\n'], '53') == [0.0]


def test_change_quantities_in_order_one_per_arithmetic_line():
  # using the second change first fails, and so does the line that then uses the first
  assert arithmetic_steps(PROMPT, ['47-5=42\n', '42+8=50\n'], '53') == [0.0, 0.0]
  # a typo in one line's change still uses up that change: the next line is judged against 'eats 5'
  assert arithmetic_steps(PROMPT, ['47+9=56\n', '56-5=51\n', '51+3=54\n'], '53') == [0.0, 1.0, 1.0]
  # more arithmetic lines than changes in the question
  assert arithmetic_steps(PROMPT, [*GOLD[:3], '53+1=54\n'], '53') == [1.0, 1.0, 1.0, 0.0]


def test_op_must_match_the_verb():
  assert arithmetic_steps(PROMPT, ['47-8=39\n', '39-5=34\n'], '53') == [0.0, 1.0]
  q = 'Eva has 87 cards. Eva gives away 7, then wins 8. How many cards now?'
  assert arithmetic_steps(q, ['87+7=94\n', '94+8=102\n'], '88') == [0.0, 1.0]
  assert arithmetic_steps(q, ['87-7=80\n', '80+8=88\n', '#### 88'], '88') == [1.0, 1.0, 1.0]


def test_wrong_final_answer():
  assert arithmetic_steps(PROMPT, [*GOLD[:3], '#### 52'], '53') == [1.0, 1.0, 1.0, 0.0]
  assert arithmetic_steps(PROMPT, [*GOLD[:3], '#### 53.0'], '53') == [1.0, 1.0, 1.0, 1.0]  # numerically equal


def test_malformed_and_empty_steps_score_zero_and_do_not_move_the_chain():
  steps = ['47+8=\n', 'So 47+8=55\n', '47+8=55 shells\n', '\n', '', '47*8=376\n', '#### \n', '#### fifty-three',
           '47+8=' + '5' * 5000 + '\n', '#### ' + '5' * 5000]  # too long for int(): malformed, not a crash
  assert arithmetic_steps(PROMPT, steps, '53') == [0.0] * len(steps)
  # a malformed line between two good ones: the chain and the change quantities skip it
  assert arithmetic_steps(PROMPT, ['47+8=55\n', 'Then:\n', '55-5=50\n'], '53') == [1.0, 0.0, 1.0]


def test_spaces_and_trailing_eos_text_are_tolerated():
  steps = [' 47 + 8 = 55 \n', '55 -5= 50\r\n', '50+3=53\n\n', '#### 53<eos>']
  assert arithmetic_steps(PROMPT, steps, '53') == [1.0, 1.0, 1.0, 1.0]
  assert arithmetic_steps(PROMPT, ['#### 53 </s> <|im_end|>\n'], '53') == [1.0]


def test_single_step_output():
  assert arithmetic_steps(PROMPT, ['47+8=55'], '53') == [1.0]
  assert arithmetic_steps(PROMPT, ['#### 53'], '53') == [1.0]
  assert arithmetic_steps(PROMPT, ['47+8=55 55-5=50 50+3=53 #### 53'], '53') == [0.0]  # no delimiter: one bad step
  assert arithmetic_steps(PROMPT, [], '53') == []


def test_question_is_found_inside_a_longer_prompt():
  # chat-template dates before it and a few-shot example with other numbers must not be read as quantities
  prompt = ('Today Date: 26 Jul 2024\nQ: Ben has 10 pens. Ben finds 2, then loses 4. How many pens now?\n'
            'A: 10+2=12\n12-4=8\n#### 8\n' + PROMPT + '<|eot_id|>')
  assert arithmetic_steps(prompt, GOLD, '53') == [1.0, 1.0, 1.0, 1.0]


def test_step_verifier_registry():
  assert get_step_verifier('arithmetic') is arithmetic_steps
  assert STEP_VERIFIERS['arithmetic'] is arithmetic_steps
  with pytest.raises(ValueError, match="unknown step verifier 'nope'.*arithmetic"):
    get_step_verifier('nope')


# ------------------------------------------------------------------------------------------ step boundaries
D = 9  # the delimiter id of the hand-made rows


def test_step_boundaries_hand_made():
  tokens = np.array([
      [1, D, 2, 3, D, 4, 0, 0],  # two delimiters, then a last step ending at the last real token
      [1, 2, 3, 0, 0, 0, 0, 0],  # no delimiter: one step
      [1, D, 2, D, 0, 0, 0, 0],  # delimiter as the last real token: no extra empty step
      [D, D, D, 0, 0, 0, 0, 0],  # no real tokens (mask 0 below): one masked step
      [1, 2, D, D, 5, 6, 7, 8],  # delimiter ids under padding do not count
      [D, 1, 2, 3, 4, 5, 6, D],  # delimiter first, and at the last column
  ])
  mask = np.array([
      [1, 1, 1, 1, 1, 1, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 1, 1, 1, 1],
  ])
  ends, step_mask = step_boundaries(tokens, mask, np.array([D]))
  np.testing.assert_array_equal(ends, [[1, 4, 5], [2, 0, 0], [1, 3, 0], [0, 0, 0], [1, 0, 0], [0, 7, 0]])
  np.testing.assert_array_equal(step_mask, [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]])
  assert ends.dtype == np.int32 and step_mask.dtype == np.int32


def test_step_boundaries_several_delimiter_ids_and_all_empty_rows():
  tokens = np.array([[7, 1, 8, 2, 7]])
  ends, step_mask = step_boundaries(tokens, np.ones_like(tokens), np.array([7, 8]))
  np.testing.assert_array_equal(ends, [[0, 2, 4]])
  np.testing.assert_array_equal(step_mask, [[1, 1, 1]])
  ends, step_mask = step_boundaries(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32), np.array([D]))
  np.testing.assert_array_equal(ends, np.zeros((2, 1)))  # S is at least 1
  np.testing.assert_array_equal(step_mask, np.zeros((2, 1)))


def test_step_texts_follow_the_boundaries(tokenizer):
  ids = tokenizer('ab\ncd\n\ne', add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id]
  tokens, mask = np.array([ids + [tokenizer.pad_token_id] * 2]), np.array([[1] * len(ids) + [0, 0]])
  ends, step_mask = step_boundaries(tokens, mask, delimiter_token_ids(tokenizer, '\n'))
  np.testing.assert_array_equal(ends, [[2, 5, 6, 8]])
  assert step_texts(tokenizer, tokens[0], ends[0], step_mask[0]) == ['ab\n', 'cd\n', '\n', 'e']  # EOS dropped
  assert step_texts(tokenizer, tokens[0], np.array([0, 0]), np.array([0, 0])) == []


# ------------------------------------------------------------------------------------------ delimiter ids
def test_delimiter_ids_of_the_char_tokenizer(tokenizer):
  np.testing.assert_array_equal(delimiter_token_ids(tokenizer, '\n'), [tokenizer.convert_tokens_to_ids('\n')])
  np.testing.assert_array_equal(delimiter_token_ids(tokenizer, '#'), [tokenizer.convert_tokens_to_ids('#')])
  with pytest.raises(ValueError, match='non-empty'):
    delimiter_token_ids(tokenizer, '')


def test_delimiter_ids_of_a_byte_level_bpe_tokenizer():
  # GPT-2 style byte-level BPE: '\n' is stored as 'Ċ' and merged runs like '\n\n' are tokens of their own
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<eos>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(['1+2=3\n\n3+4=7\n#### 7\n\n'] * 20, trainer)
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<eos>')
  ids = delimiter_token_ids(hf, '\n')
  assert {tok.token_to_id('Ċ'), tok.token_to_id('ĊĊ')} <= set(ids.tolist())
  for i in range(len(hf)):
    assert (i in ids) == ('\n' in hf.decode([i])), (i, hf.convert_ids_to_tokens(i))


# ------------------------------------------------------------------------------------------ end to end
def _paper_process_advantages(step_rewards, step_ends, step_mask, num_tokens, eps=1e-6):
  """DeepSeekMath 4.1.3 by loops: normalize over every step of the group, sum the steps ending at or after t."""
  num_prompts, group, num_steps = step_rewards.shape
  out = np.zeros((num_prompts, group, num_tokens))
  for p in range(num_prompts):
    real = [step_rewards[p, g, s] for g in range(group) for s in range(num_steps) if step_mask[p, g, s]]
    mean, std = np.mean(real), np.std(real)
    for g in range(group):
      for t in range(num_tokens):
        out[p, g, t] = sum((step_rewards[p, g, s] - mean) / (std + eps)
                           for s in range(num_steps) if step_mask[p, g, s] and step_ends[p, g, s] >= t)
  return out


def test_end_to_end_into_process_advantages(tokenizer):
  from grpo_jax.core.advantages import process_advantages

  first, second = generate_split('train', 2, seed=0)
  assert first.solution == '68-8=60\n60-5=55\n55+4=59\n#### 59'  # the hand-worked rewards below depend on it
  assert second.solution == '66+3=69\n69+7=76\n76+5=81\n#### 81'
  eos = tokenizer.eos_token_id

  def encode(text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)['input_ids']

  # (prompt example, completion ids, expected texts, expected step rewards), G = 3 per prompt
  rows = [
      (first, encode(first.solution) + [eos], ['68-8=60\n', '60-5=55\n', '55+4=59\n', '#### 59'], [1, 1, 1, 1]),
      (first, encode('68-8=60\n60-5=54\n54+4=58\n#### 58\n') + [eos],
       ['68-8=60\n', '60-5=54\n', '54+4=58\n', '#### 58\n', ''], [1, 0, 1, 0, 0]),
      (first, encode('#### 59') + [eos], ['#### 59'], [1]),
      (second, encode(second.solution) + [eos], ['66+3=69\n', '69+7=76\n', '76+5=81\n', '#### 81'], [1, 1, 1, 1]),
      (second, encode('66+3=69\n69+7=77\n'), ['66+3=69\n', '69+7=77\n'], [1, 0]),  # cut off: no EOS
      (second, [], [], []),  # no real tokens
  ]
  num_tokens = max(len(ids) for _, ids, _, _ in rows) + 2
  tokens = np.full((len(rows), num_tokens), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(rows), num_tokens), np.int32)
  for n, (_, ids, _, _) in enumerate(rows):
    tokens[n, :len(ids)], mask[n, :len(ids)] = ids, 1

  ends, step_mask = step_boundaries(tokens, mask, delimiter_token_ids(tokenizer, '\n'))
  assert ends.shape == (6, 5)
  verifier = get_step_verifier('arithmetic')
  rewards = np.zeros(ends.shape, np.float32)
  for n, (ex, _, want_texts, want_rewards) in enumerate(rows):
    texts = step_texts(tokenizer, tokens[n], ends[n], step_mask[n])
    assert texts == want_texts
    got = verifier(format_prompt(ex.question, template='qa'), texts, ex.answer)
    assert got == want_rewards
    rewards[n, :len(got)] = got
  np.testing.assert_array_equal(step_mask.sum(axis=1), [4, 5, 1, 4, 2, 0])

  shape = (2, 3, ends.shape[1])
  got = np.asarray(process_advantages(rewards.reshape(shape), ends.reshape(shape), step_mask.reshape(shape),
                                      num_tokens=num_tokens))
  want = _paper_process_advantages(rewards.reshape(shape), ends.reshape(shape), step_mask.reshape(shape),
                                   num_tokens)
  assert got.shape == (2, 3, num_tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  flat = got.reshape(len(rows), num_tokens)
  np.testing.assert_array_equal(flat[mask == 0], 0.0)  # nothing after a row's last step, nothing for an empty row
