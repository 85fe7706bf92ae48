r"""Evaluate a policy on the paper's benchmarks: greedy pass@1 and, optionally, maj@k.

  python -m grpo_jax.eval --model /models/deepseek-math-7b-instruct --datasets gsm8k,math500,cmath
  python -m grpo_jax.eval --workdir /tmp/grpo_gsm8k --datasets gsm8k --limit 200 --maj_k 16

Writes a JSON file (default <workdir or model>/eval.json; --output to change) and prints a table in the paper's
columns (GSM8K, MATH, CMATH). Everything is local: the model directory, the shipped datasets (data/).
"""
from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging

from grpo_jax import sharding
from grpo_jax.data import encode
from grpo_jax.datasets import load_examples
from grpo_jax.evaluate import greedy_eval, load_policy, maj_at_k
from grpo_jax.rewards import get_reward_fn
from grpo_jax.sampling import make_sampler
from grpo_jax.tokenizer import stop_token_ids
from grpo_jax.verifiers import extract_answer

# dataset -> (split, verifier, the paper's column)
BENCHMARKS = {'gsm8k': ('test', 'gsm8k', 'GSM8K'), 'math500': ('test', 'math', 'MATH'),
              'math': ('test', 'math', 'MATH'), 'cmath': ('test', 'cmath', 'CMATH')}

_MODEL = flags.DEFINE_string('model', None, 'Local Hugging Face model directory.')
_WORKDIR = flags.DEFINE_string('workdir', None, "A training workdir: evaluates its latest checkpoint's policy.")
_DATASETS = flags.DEFINE_list('datasets', ['gsm8k', 'math500', 'cmath'], f'Any of {sorted(BENCHMARKS)}.')
_SOURCE_DIR = flags.DEFINE_string('source_dir', None, 'Read one dataset from this directory instead of data/.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate only the first N problems of each dataset.')
_MAJ_K = flags.DEFINE_integer('maj_k', 0, 'k samples per problem for maj@k (0 = greedy pass@1 only).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.7, 'Sampling temperature for maj@k.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus top-p for maj@k.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Prompts per decoding batch.')
_MAX_PROMPT = flags.DEFINE_integer('max_prompt_len', 512, 'Prompt budget in tokens (chat template included).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 1024, 'Completion budget in tokens.')
_TEMPLATE = flags.DEFINE_string('prompt_template', 'cot', "'cot', 'qa', 'plain' or a string with {question}.")
_CHAT = flags.DEFINE_enum('chat', 'auto', ['auto', 'always', 'never'], "Use the tokenizer's chat template.")
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Parameter and compute dtype.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the JSON results.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed (maj@k).')


def table(results: dict[str, dict]) -> str:
  """Rows greedy / maj@k, columns in the paper's order, accuracies in percent."""
  names = [n for n in ('gsm8k', 'math500', 'math', 'cmath') if n in results]
  lines = [f"{'':<10}" + ''.join(f'{BENCHMARKS[n][2]:>10}' for n in names)]
  for metric in ('greedy', *sorted({k for r in results.values() for k in r if k.startswith('maj@')})):
    cells = [f"{100 * results[n][metric]['accuracy']:>10.1f}" if metric in results[n] else f"{'-':>10}"
             for n in names]
    lines.append(f'{metric:<10}' + ''.join(cells))
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = [d for d in _DATASETS.value if d not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f'unknown datasets {unknown}; known: {sorted(BENCHMARKS)}')
  if (_MODEL.value is None) == (_WORKDIR.value is None):
    raise app.UsageError('give exactly one of --model and --workdir')
  if _BATCH.value % jax.device_count():
    raise app.UsageError(f'--batch_size={_BATCH.value} must divide by the {jax.device_count()} devices')
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Data first: a missing or broken dataset file fails before the model is loaded.
  examples = {name: load_examples(name, BENCHMARKS[name][0], source_dir=_SOURCE_DIR.value, limit=_LIMIT.value)
              for name in _DATASETS.value}
  tokenizer_dir = _MODEL.value or os.path.join(_WORKDIR.value, 'tokenizer')
  graphdef, params, _, tokenizer = load_policy(model_dir=_MODEL.value, workdir=_WORKDIR.value, dtype=_DTYPE.value,
                                               mesh=mesh)
  common = dict(max_new_tokens=_MAX_NEW.value, eos_id=stop_token_ids(tokenizer, tokenizer_dir),
                pad_id=tokenizer.pad_token_id, mesh=mesh,
                param_shardings=jax.tree.map(lambda x: x.sharding, params))
  greedy = make_sampler(graphdef, greedy=True, **common)
  voter = None if not _MAJ_K.value else make_sampler(graphdef, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                                                     group_size=_MAJ_K.value, **common)
  rng = jax.random.key(_SEED.value)
  results = {}
  for name, exs in examples.items():
    _, verifier_name, column = BENCHMARKS[name]
    split = encode(tokenizer, exs, max_prompt_len=_MAX_PROMPT.value, max_new_tokens=_MAX_NEW.value,
                   template=_TEMPLATE.value, chat=_CHAT.value, split=name, with_solutions=False)
    verifier = get_reward_fn(verifier_name)
    start = time.perf_counter()
    res = {'n': len(split), 'column': column,
           'greedy': greedy_eval(greedy, params, split, tokenizer, verifier, batch_size=_BATCH.value, rng=rng,
                                 desc=f'{name} greedy')}
    if voter is not None:
      res[f'maj@{_MAJ_K.value}'] = maj_at_k(
          voter, params, split, tokenizer, verifier, lambda t, v=verifier_name: extract_answer(v, t),
          k=_MAJ_K.value, batch_size=max(1, _BATCH.value // _MAJ_K.value), rng=rng, desc=f'{name} maj@{_MAJ_K.value}')
    res['wall_time'] = time.perf_counter() - start
    results[name] = res
    print(f"{name}: greedy {100 * res['greedy']['accuracy']:.1f}% of {len(split)}")
  output = _OUTPUT.value or os.path.join(_WORKDIR.value or _MODEL.value, 'eval.json')
  settings = {f.name: f.value for f in _OWN_FLAGS}
  with open(output, 'w') as f:
    json.dump({'settings': settings, 'results': results}, f, indent=2)
  print('\n' + table(results) + f'\n\nresults: {output}')


_OWN_FLAGS = [_MODEL, _WORKDIR, _DATASETS, _SOURCE_DIR, _LIMIT, _MAJ_K, _TEMPERATURE, _TOP_P, _BATCH, _MAX_PROMPT,
              _MAX_NEW, _TEMPLATE, _CHAT, _DTYPE, _OUTPUT, _SEED]

if __name__ == '__main__':
  app.run(main)
