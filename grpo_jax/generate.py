r"""Generate from a policy: a quick look at what a model or a training run produces.

  python -m grpo_jax.generate --model /models/deepseek-math-7b-instruct --prompt "What is 15% of 80?"
  python -m grpo_jax.generate --workdir /tmp/grpo_default --prompt "Mia has 12 coins. ..." --prompt_template qa
  python -m grpo_jax.generate --model DIR --prompt "..." --temperature 0.7 --top_p 0.95 --num_samples 4

Greedy unless --temperature > 0. The prompt goes through the prompt template and, when the tokenizer has one,
the chat template (--chat never for raw text).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging

from grpo_jax.evaluate import decode, load_policy
from grpo_jax.prompts import format_prompt, tokenize_prompts, uses_chat_template
from grpo_jax.sampling import make_sampler
from grpo_jax.tokenizer import stop_token_ids

_MODEL = flags.DEFINE_string('model', None, 'Local Hugging Face model directory.')
_WORKDIR = flags.DEFINE_string('workdir', None, "A training workdir: uses its latest checkpoint's policy.")
_PROMPT = flags.DEFINE_string('prompt', None, 'The question or text to continue.', required=True)
_TEMPLATE = flags.DEFINE_string('prompt_template', 'plain', "'plain', 'cot', 'qa' or a string with {question}.")
_CHAT = flags.DEFINE_enum('chat', 'auto', ['auto', 'always', 'never'], "Use the tokenizer's chat template.")
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Completion budget in tokens.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling (1 = off).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k sampling (0 = off).')
_NUM = flags.DEFINE_integer('num_samples', 1, 'Completions to draw (with --temperature > 0).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Parameter and compute dtype.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if (_MODEL.value is None) == (_WORKDIR.value is None):
    raise app.UsageError('give exactly one of --model and --workdir')
  if _TEMPERATURE.value < 0 or _NUM.value < 1 or _MAX_NEW.value < 1:
    raise app.UsageError('need --temperature >= 0, --num_samples >= 1 and --max_new_tokens >= 1')
  tokenizer_dir = _MODEL.value or os.path.join(_WORKDIR.value, 'tokenizer')
  graphdef, params, _, tokenizer = load_policy(model_dir=_MODEL.value, workdir=_WORKDIR.value, dtype=_DTYPE.value)
  text = format_prompt(_PROMPT.value, template=_TEMPLATE.value, tokenizer=tokenizer, chat=_CHAT.value)
  ids = tokenize_prompts(tokenizer, [text], chat_formatted=uses_chat_template(tokenizer, _CHAT.value))[0]
  tokens = np.asarray([ids], np.int32)  # [1, p]: one unpadded prompt
  greedy = _TEMPERATURE.value == 0
  sampler = make_sampler(graphdef, max_new_tokens=_MAX_NEW.value, eos_id=stop_token_ids(tokenizer, tokenizer_dir),
                         pad_id=tokenizer.pad_token_id, greedy=greedy, temperature=_TEMPERATURE.value or 1.0,
                         top_p=_TOP_P.value, top_k=_TOP_K.value, group_size=1 if greedy else _NUM.value)
  out = sampler(params, tokens, np.ones_like(tokens), jax.random.key(_SEED.value))
  for i, text in enumerate(decode(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))):
    print(f'--- completion {i}' if not greedy else '---')
    print(text)


if __name__ == '__main__':
  app.run(main)
