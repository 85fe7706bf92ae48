"""The eval command's robustness: an unwritable output fails before anything is loaded, an interrupted eval resumes
from <output>.partial.json without decoding again what it finished, and --skip_long_prompts. Runs the command in
subprocesses on the tiny random Llama of helpers.save_tiny_model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from helpers import save_tiny_model

from grpo_jax.data.batches import encode
from grpo_jax.data.datasets import load_examples
from grpo_jax.data.tokenizer import load_tokenizer
from grpo_jax.pipeline import stats

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}

# `python -m grpo_jax.eval` that counts the sampler's calls and, with EVAL_STOP_AFTER=N, dies as a kill would
# (os._exit: no cleanup) when call N + 1 starts, i.e. once N decoding batches are done and saved.
DRIVER = """
import os, sys
from absl import app
from grpo_jax import eval as ev

calls, stop = [], int(os.environ.get('EVAL_STOP_AFTER', '0'))
make_sampler = ev.make_sampler

def counting(*args, **kwargs):
  sampler = make_sampler(*args, **kwargs)
  def run(*batch):
    if stop and len(calls) == stop:
      os._exit(3)
    calls.append(1)
    return sampler(*batch)
  return run

ev.make_sampler = counting
ev.define_flags()
try:
  app.run(ev.main, argv=sys.argv)
finally:
  print(f'sampler calls: {len(calls)}', flush=True)
"""
# 3 problems per dataset: greedy in 2 batches of 2, maj@2 in 3 batches of 1 -> 5 sampler calls per dataset.
ARGS = ['--datasets=gsm8k,cmath', '--limit=3', '--max_new_tokens=4', '--batch_size=2', '--maj_k=2',
        '--save_completions']
CALLS_PER_DATASET = 5


def eval_cli(args, stop_after=0, timeout=600, **env):
  env = {**ENV, 'EVAL_STOP_AFTER': str(stop_after), **env}
  return subprocess.run([sys.executable, '-c', DRIVER, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def sampler_calls(proc):
  return int(proc.stdout.split('sampler calls: ')[-1].split()[0])


def comparable(path):
  """The output without what may differ between runs of the same settings: timings and the output path."""
  saved = json.loads(path.read_text())
  saved['settings'].pop('output')
  for result in saved['results'].values():
    result.pop('wall_time')
  return saved


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return save_tiny_model(tmp_path_factory.mktemp('tiny_llama'))


@pytest.fixture(scope='module')
def uninterrupted(model_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('uninterrupted') / 'eval.json'
  proc = eval_cli([f'--model={model_dir}', f'--output={out}', *ARGS])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sampler_calls(proc) == 2 * CALLS_PER_DATASET
  return comparable(out)


def last_line(proc):
  return proc.stderr.strip().splitlines()[-1]


def test_output_under_a_file_fails_before_the_model_is_loaded(tmp_path):
  (tmp_path / 'file.txt').write_text('not a directory')
  out = tmp_path / 'file.txt' / 'eval.json'
  # No model at --model: had eval loaded it (or any data) first, that would have been the error.
  proc = eval_cli([f'--model={tmp_path}/no_model', f'--output={out}', f'--source_dir={tmp_path}/no_data'])
  assert proc.returncode == 1
  assert last_line(proc) == (f'eval: cannot write the results to {out}: {tmp_path}/file.txt is not a directory; '
                             'pass --output=<a writable file>')
  assert sampler_calls(proc) == 0


def test_default_output_that_is_a_directory(tmp_path):
  (tmp_path / 'model' / 'eval.json').mkdir(parents=True)
  proc = eval_cli([f'--model={tmp_path}/model'])
  assert proc.returncode == 1
  assert last_line(proc) == (f'eval: cannot write the results to {tmp_path}/model/eval.json: it is a directory; '
                             'pass --output=<a writable file>')


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a read-only directory; the file-as-directory case '
                    'above checks the same path without permissions')
def test_read_only_model_directory(tmp_path):
  model = tmp_path / 'model'
  model.mkdir()
  model.chmod(0o555)
  try:
    proc = eval_cli([f'--model={model}'])
  finally:
    model.chmod(0o755)
  assert proc.returncode == 1
  assert last_line(proc) == (f'eval: cannot write the results to {model}/eval.json: {model} is not writable '
                             '(Permission denied); pass --output=<a writable file>')


def test_output_directory_is_created(model_dir, tmp_path):
  out = tmp_path / 'new' / 'dir' / 'eval.json'
  proc = eval_cli([f'--model={model_dir}', f'--output={out}', '--datasets=gsm8k', '--limit=1',
                   '--max_new_tokens=2', '--batch_size=1'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(out.read_text())['results']['gsm8k']['n'] == 1
  assert sorted(os.listdir(out.parent)) == ['eval.json']  # no partial, tmp or write-check file left behind
  assert '95% CI' in proc.stdout


def test_accuracies_carry_wilson_intervals(uninterrupted):
  # Recomputed from the saved per-problem correctness, not from the reported accuracy the command used.
  for name, result in uninterrupted['results'].items():
    greedy = result['greedy']
    assert greedy['ci95'] == pytest.approx(stats.wilson_interval(np.array(greedy['correct'])), abs=1e-12), name
    for metric in ('greedy', 'maj@2'):
      low, high = result[metric]['ci95']
      assert 0 <= low <= result[metric]['accuracy'] <= high <= 1 and high - low > 0.3, (name, metric)  # n = 3


def test_maj_batches_must_divide_over_the_devices(tmp_path):
  proc = eval_cli([f'--model={tmp_path}/no_model', '--batch_size=4', '--maj_k=4'],
                  XLA_FLAGS='--xla_force_host_platform_device_count=2')
  assert proc.returncode == 1
  assert 'maj@k decodes --batch_size // --maj_k = 1 prompts at a time, which must divide by the 2 devices' in \
      proc.stderr


# Killed after 5 batches: the first dataset finished; after 8: also the second's greedy batches and its first maj@2
# batch.
@pytest.mark.parametrize('stop_after', [5, 8])
def test_an_interrupted_eval_resumes_where_it_stopped(stop_after, model_dir, uninterrupted, tmp_path):
  out = tmp_path / 'eval.json'
  partial = tmp_path / 'eval.json.partial.json'
  args = [f'--model={model_dir}', f'--output={out}', *ARGS]
  killed = eval_cli(args, stop_after=stop_after)
  assert killed.returncode == 3 and not out.exists()
  saved = json.loads(partial.read_text())
  assert list(saved['results']) == ['gsm8k']
  if stop_after == 8:
    assert saved['pending']['dataset'] == 'cmath'
    assert len(saved['pending']['greedy']) == 3 and len(saved['pending']['maj@2']) == 1  # one voted answer each
  else:
    assert saved['pending'] is None

  resumed = eval_cli(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert sampler_calls(resumed) == 2 * CALLS_PER_DATASET - stop_after
  assert f'resuming the interrupted eval saved in {partial}' in resumed.stdout
  assert 'gsm8k: done by the interrupted run, not decoded again' in resumed.stdout
  for line in ('cmath greedy: 3 of 3 problems done by the interrupted run', 'cmath maj@2: 1 of 3 problems done'):
    assert (line in resumed.stdout) == (stop_after == 8), line
  assert comparable(out) == uninterrupted
  assert not partial.exists()  # so the next run of the same command evaluates afresh


def test_other_settings_start_over(model_dir, uninterrupted, tmp_path):
  out = tmp_path / 'eval.json'
  killed = eval_cli([f'--model={model_dir}', f'--output={out}', *ARGS, '--seed=1'], stop_after=6)
  assert killed.returncode == 3
  rerun = eval_cli([f'--model={model_dir}', f'--output={out}', *ARGS])
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert (f'warning: {out}.partial.json holds results of other settings (seed); starting over (they are not mixed '
          'with these)') in rerun.stdout
  assert sampler_calls(rerun) == 2 * CALLS_PER_DATASET and comparable(out) == uninterrupted


def test_other_model_files_start_over(tmp_path):
  model = tmp_path / 'model'
  save_tiny_model(model)
  args = [f'--model={model}', '--datasets=gsm8k,cmath', '--limit=1', '--max_new_tokens=2', '--batch_size=1']
  assert eval_cli(args, stop_after=1).returncode == 3  # gsm8k finished: the partial file is in the model directory
  os.utime(model / 'model.safetensors', ns=(0, 0))  # as if the weights were rewritten
  rerun = eval_cli(args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'holds results of another checkpoint or model files; starting over' in rerun.stdout
  assert sampler_calls(rerun) == 2


def test_skip_long_prompts(model_dir, tmp_path):
  tokenizer = load_tokenizer(str(model_dir))
  examples = load_examples('gsm8k', 'test', limit=3)
  lengths = encode(tokenizer, examples, max_prompt_len=100_000, max_new_tokens=4, template='cot', chat='auto',
                   with_solutions=False).prompt_mask.sum(1)
  limit = int(sorted(lengths)[1])  # the two shortest fit
  assert sorted(lengths)[2] > limit
  out = tmp_path / 'eval.json'
  args = [f'--model={model_dir}', f'--output={out}', '--datasets=gsm8k', '--limit=3', '--max_new_tokens=2',
          '--batch_size=1', f'--max_prompt_len={limit}']
  failed = eval_cli(args)
  assert failed.returncode != 0 and 'skip_long_prompts' in failed.stderr and not out.exists()
  skipped = eval_cli([*args, '--skip_long_prompts'])
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  assert f'gsm8k: dropped 1 of 3 prompts longer than max_prompt_len={limit}' in skipped.stdout
  saved = json.loads(out.read_text())
  assert saved['results']['gsm8k']['n'] == 2 and saved['settings']['skip_long_prompts'] is True


def test_table_shows_each_accuracy_with_its_interval():
  from grpo_jax import eval as ev
  results = {'cmath': {'n': 3, 'greedy': {'accuracy': 1 / 3}},
             'gsm8k': {'n': 200, 'greedy': {'accuracy': 0.5}, 'maj@4': {'accuracy': 0.6}}}
  ev.add_intervals(results)
  for res in results.values():
    for metric in ('greedy', 'maj@4'):
      if metric in res:
        k = round(res[metric]['accuracy'] * res['n'])
        assert res[metric]['ci95'] == pytest.approx(stats.wilson_interval(np.arange(res['n']) < k), abs=1e-12)
  lines = ev.table(results).splitlines()
  assert lines[0].split() == ['GSM8K', 'CMATH']  # the paper's column order
  assert lines[1].split() == ['greedy', '50.0', '33.3']
  low, high = (100 * x for x in results['gsm8k']['greedy']['ci95'])
  low3, high3 = (100 * x for x in results['cmath']['greedy']['ci95'])
  assert lines[2].split('  95% CI')[1].split() == [f'[{low:.1f},', f'{high:.1f}]', f'[{low3:.1f},', f'{high3:.1f}]']
  assert lines[3].split() == ['maj@4', '60.0', '-']
  low, high = (100 * x for x in results['gsm8k']['maj@4']['ci95'])
  assert lines[4].split('  95% CI')[1].split() == [f'[{low:.1f},', f'{high:.1f}]']


def test_compare_pairs_each_problem_with_the_other_eval(model_dir, uninterrupted, tmp_path):
  # The other policy: the uninterrupted run's gsm8k results with the first two problems' correctness flipped, so
  # that there are discordant problems whichever way this tiny random model's answers fall.
  other = json.loads(json.dumps(uninterrupted))
  theirs = other['results']['gsm8k']['greedy']['correct']
  theirs[:2] = [not c for c in theirs[:2]]
  other_path = tmp_path / 'other.json'
  other_path.write_text(json.dumps(other))
  out = tmp_path / 'eval.json'
  proc = eval_cli([f'--model={model_dir}', f'--output={out}', '--datasets=gsm8k', '--limit=3', '--max_new_tokens=4',
                   '--batch_size=2', f'--compare={other_path}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads(out.read_text())
  ours = saved['results']['gsm8k']['greedy']['correct']
  assert ours == uninterrupted['results']['gsm8k']['greedy']['correct']  # the same greedy decoding
  want = stats.mcnemar(np.array(ours), np.array(theirs))
  got = saved['comparison']['greedy']['gsm8k']
  assert saved['comparison']['with'] == str(other_path)
  assert (got['this_only'], got['other_only']) == (want['a_only'], want['b_only']) and got['this_only'] + \
      got['other_only'] == 2
  assert got['p_value'] == pytest.approx(want['p_value'])
  assert f"{got['this_only']} solved only by this policy, {got['other_only']} only by that one, p = " in proc.stdout


@pytest.mark.parametrize('edit,message', [
    (lambda o: o['settings'].update(limit=2), 'it evaluated other problems (limit=2)'),
    (lambda o: o['results'].pop('cmath'), 'it has no per-problem greedy results of cmath'),
    (lambda o: o.pop('results'), 'it is not a readable eval output'),
])
def test_compare_with_other_problems_fails_before_the_model_is_loaded(edit, message, uninterrupted, tmp_path):
  other = json.loads(json.dumps(uninterrupted))
  edit(other)
  (tmp_path / 'other.json').write_text(json.dumps(other))
  proc = eval_cli([f'--model={tmp_path}/no_model', f'--output={tmp_path}/eval.json', *ARGS,
                   f'--compare={tmp_path}/other.json'])
  assert proc.returncode == 1
  assert last_line(proc).startswith(f'eval: cannot compare with --compare={tmp_path}/other.json: {message}')
