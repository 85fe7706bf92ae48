r"""Question -> prompt text, optionally through the tokenizer's chat template.

A template is a registry name or any string with a `{question}` field:

  format_prompt('What is 2+3?', template='cot')
  -> 'What is 2+3?\nPlease reason step by step, and put your final answer within \boxed{}.'

With `chat='auto'` the text becomes the user turn of the tokenizer's chat template when it has one (instruct
models), and stays raw otherwise (base models, the embedded task's tokenizer).
"""
from __future__ import annotations

PROMPT_TEMPLATES = {
    'qa': 'Q: {question}\nA: ',  # the embedded arithmetic task
    # DeepSeekMath's chain-of-thought format (the paper's evaluation and RL prompts)
    'cot': '{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.',
    'plain': '{question}',
}
CHAT_MODES = ('auto', 'always', 'never')


def resolve_template(template: str) -> str:
  """A registry name -> its text; any other string must itself contain '{question}'."""
  if template in PROMPT_TEMPLATES:
    return PROMPT_TEMPLATES[template]
  if '{question}' not in template:
    raise ValueError(f'prompt template {template!r} is neither a known name ({sorted(PROMPT_TEMPLATES)}) '
                     "nor a format string with a '{question}' field")
  return template


def uses_chat_template(tokenizer, chat: str) -> bool:
  if chat not in CHAT_MODES:
    raise ValueError(f'chat={chat!r} is unknown; known: {CHAT_MODES}')
  has_template = bool(getattr(tokenizer, 'chat_template', None))
  if chat == 'always' and not has_template:
    raise ValueError("chat='always' but the tokenizer has no chat template; use chat='never' or 'auto'")
  return chat == 'always' or (chat == 'auto' and has_template)


def format_prompt(question: str, *, template: str, tokenizer=None, chat: str = 'never', system: str = '') -> str:
  """The full prompt text (chat-formatted when asked and available) that generation continues from."""
  text = resolve_template(template).format(question=question)
  if tokenizer is None or not uses_chat_template(tokenizer, chat):
    return text
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': text}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(tokenizer, prompts: list[str], *, chat_formatted: bool) -> list[list[int]]:
  """Token ids per prompt. A chat template already writes BOS and other specials, so none are added then."""
  return tokenizer(prompts, add_special_tokens=not chat_formatted)['input_ids']
