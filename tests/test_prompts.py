"""Prompt templates, chat formatting and prompt tokenization (grpo_jax/data/prompts.py, data.encode)."""
import numpy as np
import pytest

from grpo_jax.data.batches import encode
from grpo_jax.data.datasets import MathExample
from grpo_jax.data.prompts import (
  PROMPT_TEMPLATES,
  format_prompt,
  resolve_template,
  tokenize_prompts,
  uses_chat_template,
)
from grpo_jax.data.tokenizer import build_tokenizer

# A minimal chat template in the usual Hugging Face shape (BOS, role markers, generation prompt).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def tokenizer():
  return build_tokenizer(['user', 'assistant', 'system'])


@pytest.fixture
def chat_tokenizer():
  tok = build_tokenizer(['user', 'assistant', 'system'])
  tok.chat_template = CHAT_TEMPLATE
  return tok


def test_cot_is_the_papers_format():
  assert format_prompt('What is 2+3?', template='cot') == (
      'What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}.')
  assert format_prompt('x', template='qa') == 'Q: x\nA: '
  assert format_prompt('x', template='Problem: {question}\nSolution:') == 'Problem: x\nSolution:'


def test_unknown_template_names_the_known_ones():
  with pytest.raises(ValueError, match="neither a known name.*'cot'"):
    resolve_template('chain_of_thought')
  assert set(PROMPT_TEMPLATES) >= {'cot', 'qa', 'plain'}


def test_chat_modes(tokenizer, chat_tokenizer):
  assert not uses_chat_template(tokenizer, 'auto') and uses_chat_template(chat_tokenizer, 'auto')
  assert not uses_chat_template(chat_tokenizer, 'never')
  with pytest.raises(ValueError, match='no chat template'):
    uses_chat_template(tokenizer, 'always')
  with pytest.raises(ValueError, match='unknown'):
    uses_chat_template(tokenizer, 'maybe')


def test_chat_template_wraps_the_formatted_question(chat_tokenizer):
  text = format_prompt('What is 2+3?', template='qa', tokenizer=chat_tokenizer, chat='auto')
  assert text == '<bos>user: Q: What is 2+3?\nA: \nassistant: '
  with_system = format_prompt('hi', template='plain', tokenizer=chat_tokenizer, chat='always', system='Be brief.')
  assert with_system == '<bos>system: Be brief.\nuser: hi\nassistant: '
  # 'auto' with a tokenizer without a template leaves the text raw
  assert format_prompt('hi', template='plain', tokenizer=build_tokenizer(), chat='auto') == 'hi'


def test_chat_prompts_get_no_second_bos(chat_tokenizer):
  # The template already writes BOS; tokenizing with special tokens would prepend another on BOS-adding models.
  text = format_prompt('hi', template='plain', tokenizer=chat_tokenizer, chat='auto')
  ids = tokenize_prompts(chat_tokenizer, [text], chat_formatted=True)[0]
  assert ids.count(chat_tokenizer.bos_token_id) == 1 and ids[0] == chat_tokenizer.bos_token_id
  assert chat_tokenizer.decode(ids) == text


def test_encode_with_chat_template_and_without_solutions(chat_tokenizer):
  examples = [MathExample('What is 2+3?', '5', '2+3=5\n#### 5'), MathExample('1+1?', '2')]
  enc = encode(chat_tokenizer, examples, max_prompt_len=40, max_new_tokens=12, template='plain', chat='auto',
               with_solutions=False)
  assert enc.completion_tokens.shape == (2, 0) and enc.answers == ['5', '2']
  row = enc.prompt_tokens[1][enc.prompt_mask[1].astype(bool)]
  assert chat_tokenizer.decode(row) == '<bos>user: 1+1?\nassistant: '
  assert enc.prompt_mask[1, :-len(row)].sum() == 0  # left padded


def test_masks_come_from_lengths_when_pad_is_eos(tokenizer):
  tokenizer.pad_token = tokenizer.eos_token  # as for models without a pad token
  examples = [MathExample('a', '1', 'x'), MathExample('bbb', '2', 'yy')]
  enc = encode(tokenizer, examples, max_prompt_len=10, max_new_tokens=4, template='plain')
  np.testing.assert_array_equal(enc.prompt_mask.sum(1), [1, 3])
  np.testing.assert_array_equal(enc.completion_mask.sum(1), [2, 3])  # the EOS counts although it equals pad


def test_long_prompts_error_or_are_skipped(tokenizer, capsys):
  examples = [MathExample('short', '1'), MathExample('a much longer question', '2'), MathExample('ok', '3')]
  with pytest.raises(ValueError, match=r'example 1 has a \d+-token prompt.*skip_long_prompts'):
    encode(tokenizer, examples, max_prompt_len=8, max_new_tokens=4, template='plain', with_solutions=False)
  enc = encode(tokenizer, examples, max_prompt_len=8, max_new_tokens=4, template='plain', with_solutions=False,
               skip_long_prompts=True, split='train')
  assert enc.answers == ['1', '3']
  assert 'dropped 1 of 3' in capsys.readouterr().out
