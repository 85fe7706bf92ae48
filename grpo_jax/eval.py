r"""Evaluate a policy on the paper's benchmarks: greedy pass@1 and, optionally, maj@k.

  python -m grpo_jax.eval --model /models/deepseek-math-7b-instruct --datasets gsm8k,math500,cmath
  python -m grpo_jax.eval --workdir /tmp/grpo_gsm8k --datasets gsm8k --limit 200 --maj_k 16

Writes a JSON file (default <workdir or model>/eval.json; --output to change) and prints a table in the paper's
columns (GSM8K, MATH, CMATH). Everything is local: the model directory, the shipped datasets (data/).

On several hosts every process runs this same command, in the environment the launch scripts give the trainer
(grpo_jax/parallel/distributed.py); the batches are split over all devices, and process 0 prints and writes the JSON.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
from absl import app, flags, logging

from grpo_jax.data.batches import encode
from grpo_jax.data.datasets import load_examples
from grpo_jax.data.tokenizer import stop_token_ids
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline.evaluate import greedy_eval, load_policy, maj_at_k
from grpo_jax.rewards.answers import extract_answer
from grpo_jax.rewards.registry import get_reward_fn
from grpo_jax.rollout.sampling import make_sampler

# dataset -> (split, verifier, the paper's column)
BENCHMARKS = {'gsm8k': ('test', 'gsm8k', 'GSM8K'), 'math500': ('test', 'math', 'MATH'),
              'math': ('test', 'math', 'MATH'), 'cmath': ('test', 'cmath', 'CMATH')}

FLAGS = flags.FLAGS
SETTINGS = ('model', 'workdir', 'datasets', 'source_dir', 'limit', 'maj_k', 'temperature', 'top_p', 'batch_size',
            'max_prompt_len', 'max_new_tokens', 'prompt_template', 'chat', 'dtype', 'output', 'seed',
            'save_completions')  # in eval.json


def define_flags() -> None:
  """This CLI's flags, defined when it runs rather than on import: grpo_jax.train, eval and generate use
  some of the same names (--workdir, --model, ...) with other meanings, and one process may import them all."""
  flags.DEFINE_string('model', None, 'Local Hugging Face model directory.')
  flags.DEFINE_string('workdir', None, "A training workdir: evaluates its latest checkpoint's policy.")
  flags.DEFINE_list('datasets', ['gsm8k', 'math500', 'cmath'], f'Any of {sorted(BENCHMARKS)}.')
  flags.DEFINE_string('source_dir', None, 'Read one dataset from this directory instead of data/.')
  flags.DEFINE_integer('limit', None, 'Evaluate only the first N problems of each dataset.')
  flags.DEFINE_integer('maj_k', 0, 'k samples per problem for maj@k (0 = greedy pass@1 only).')
  flags.DEFINE_float('temperature', 0.7, 'Sampling temperature for maj@k.')
  flags.DEFINE_float('top_p', 0.95, 'Nucleus top-p for maj@k.')
  flags.DEFINE_integer('batch_size', 32, 'Prompts per decoding batch.')
  flags.DEFINE_integer('max_prompt_len', 512, 'Prompt budget in tokens (chat template included).')
  flags.DEFINE_integer('max_new_tokens', 1024, 'Completion budget in tokens.')
  flags.DEFINE_string('prompt_template', 'cot', "'cot', 'qa', 'plain' or a string with {question}.")
  flags.DEFINE_enum('chat', 'auto', ['auto', 'always', 'never'], "Use the tokenizer's chat template.")
  flags.DEFINE_string('dtype', 'float32', 'Parameter and compute dtype.')
  flags.DEFINE_string('output', None, 'Where to write the JSON results.')
  flags.DEFINE_bool('save_completions', False, 'Also write every greedy completion and whether it was right.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed (maj@k).')
  flags.DEFINE_integer('cpu_devices', 0, 'CPU hosts: split the CPU into this many XLA devices, one core each, to '
                       'decode batches on several cores at once (config.cpu_devices); 0 = one device.')


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
  distributed.use_cpu_devices(FLAGS.cpu_devices)
  distributed.initialize()  # before any other jax call (no-op on one host)
  unknown = [d for d in FLAGS.datasets if d not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f'unknown datasets {unknown}; known: {sorted(BENCHMARKS)}')
  if (FLAGS.model is None) == (FLAGS.workdir is None):
    raise app.UsageError('give exactly one of --model and --workdir')
  if FLAGS.batch_size % jax.device_count():
    raise app.UsageError(f'--batch_size={FLAGS.batch_size} must divide by the {jax.device_count()} devices')
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Data first: a missing or broken dataset file fails before the model is loaded.
  examples = {name: load_examples(name, BENCHMARKS[name][0], source_dir=FLAGS.source_dir, limit=FLAGS.limit)
              for name in FLAGS.datasets}
  tokenizer_dir = FLAGS.model or os.path.join(FLAGS.workdir, 'tokenizer')
  graphdef, params, _, tokenizer = load_policy(model_dir=FLAGS.model, workdir=FLAGS.workdir, dtype=FLAGS.dtype,
                                               mesh=mesh)
  common = dict(max_new_tokens=FLAGS.max_new_tokens, eos_id=stop_token_ids(tokenizer, tokenizer_dir),
                pad_id=tokenizer.pad_token_id, mesh=mesh,
                param_shardings=jax.tree.map(lambda x: x.sharding, params))
  # Several hosts: each passes the whole numpy batch, keeps its own rows, and gets every row's tokens back.
  host_io = functools.partial(distributed.host_io, batch_sharding=sharding.batch_sharding(mesh),
                              batch_argnums=(1, 2))
  greedy = host_io(make_sampler(graphdef, greedy=True, **common))
  voter = None if not FLAGS.maj_k else host_io(make_sampler(graphdef, temperature=FLAGS.temperature,
                                                            top_p=FLAGS.top_p, group_size=FLAGS.maj_k, **common))
  main_process = distributed.is_main_process()  # the one with progress bars, prints and the JSON file
  rng = jax.random.key(FLAGS.seed)
  results = {}
  for name, exs in examples.items():
    _, verifier_name, column = BENCHMARKS[name]
    split = encode(tokenizer, exs, max_prompt_len=FLAGS.max_prompt_len, max_new_tokens=FLAGS.max_new_tokens,
                   template=FLAGS.prompt_template, chat=FLAGS.chat, split=name, with_solutions=False)
    verifier = get_reward_fn(verifier_name)
    start = time.perf_counter()
    res = {'n': len(split), 'column': column,
           'greedy': greedy_eval(greedy, params, split, tokenizer, verifier, batch_size=FLAGS.batch_size, rng=rng,
                                 desc=f'{name} greedy' if main_process else None,
                                 keep_completions=FLAGS.save_completions)}
    if voter is not None:
      res[f'maj@{FLAGS.maj_k}'] = maj_at_k(
          voter, params, split, tokenizer, verifier, lambda t, v=verifier_name: extract_answer(v, t),
          k=FLAGS.maj_k, batch_size=max(1, FLAGS.batch_size // FLAGS.maj_k), rng=rng,
          desc=f'{name} maj@{FLAGS.maj_k}' if main_process else None)
    res['wall_time'] = time.perf_counter() - start
    results[name] = res
    distributed.print0(f"{name}: greedy {100 * res['greedy']['accuracy']:.1f}% of {len(split)}")
  output = FLAGS.output or os.path.join(FLAGS.workdir or FLAGS.model, 'eval.json')
  if main_process:
    settings = {name: FLAGS[name].value for name in SETTINGS}
    with open(output, 'w') as f:
      json.dump({'settings': settings, 'results': results}, f, indent=2)
  distributed.print0('\n' + table(results) + f'\n\nresults: {output}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
