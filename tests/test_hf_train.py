"""End-to-end on a local Hugging Face model directory (a tiny random Llama written by hf.save_model, with a
character tokenizer and a chat template): GRPO on GSM8K with configs/gsm8k_hf.py:tiny, the HF export, and the
eval / generate commands on both the model directory and the training workdir. No torch needed."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx
from helpers import save_tiny_model

from grpo_jax.data.tokenizer import build_tokenizer, stop_token_ids
from grpo_jax.models import hf
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.pipeline.evaluate import load_policy

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def run(args, timeout=600):
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return save_tiny_model(tmp_path_factory.mktemp('tiny_llama'))


@pytest.fixture(scope='module')
def trained(model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('grpo_gsm8k')
  stdout = run(['grpo_jax.train', f'--config={ROOT}/configs/gsm8k_hf.py:tiny', f'--workdir={workdir}',
                f'--config.model.path={model_dir}', '--config.rl.lr=1e-3'])  # weight decay alone then moves weights
  return workdir, stdout


def test_grpo_on_gsm8k_from_a_hf_directory(trained):
  workdir, stdout = trained
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['rl_steps'] == 2 and summary['sft_steps'] == 0  # RL straight from the loaded model
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['stage'] == 'grpo'] == [1, 2]
  assert all('reward_failures' in r and 'kl' in r for r in rows if r['stage'] == 'grpo')
  assert 'exported the policy' in stdout


def test_export_equals_the_trained_checkpoint(trained, model_dir):
  workdir, _ = trained
  exported, _ = hf.load_model(str(workdir / 'hf_model'))
  graphdef, params, _, tokenizer = load_policy(workdir=str(workdir))
  tokens = jnp.asarray(tokenizer(['Q: 1+1?', 'A: 2 and more'], padding=True)['input_ids'], jnp.int32)
  np.testing.assert_allclose(exported(tokens), nnx.merge(graphdef, params)(tokens), atol=1e-6)
  initial, _ = hf.load_model(str(model_dir))
  assert np.abs(np.asarray(initial(tokens)) - np.asarray(exported(tokens))).max() > 1e-6  # training moved it
  assert (workdir / 'hf_model' / 'tokenizer.json').exists()


@pytest.mark.parametrize('source', ['model', 'workdir'])
def test_eval_command_writes_paper_columns(source, model_dir, trained, tmp_path):
  where = f'--model={model_dir}' if source == 'model' else f'--workdir={trained[0]}'
  out = tmp_path / 'eval.json'
  save = ['--save_completions'] if source == 'model' else []
  stdout = run(['grpo_jax.eval', where, '--datasets=gsm8k,cmath', '--limit=3', '--max_new_tokens=4',
                '--batch_size=2', '--maj_k=2', f'--output={out}', *save])
  results = json.loads(out.read_text())['results']
  assert set(results) == {'gsm8k', 'cmath'} and results['gsm8k']['n'] == 3
  for r in results.values():
    assert 0 <= r['greedy']['accuracy'] <= 1 and 0 <= r['maj@2']['accuracy'] <= 1
    if source == 'model':  # --save_completions: each problem's completion and verdict; the accuracy is their mean
      assert len(r['greedy']['completions']) == len(r['greedy']['correct']) == 3
      assert r['greedy']['accuracy'] == sum(r['greedy']['correct']) / 3 and r['greedy']['sample'] == \
          r['greedy']['completions'][0]
    else:
      assert 'completions' not in r['greedy']
  # The table: a header, then greedy and maj@2 rows, each followed by its 95% interval row.
  header, greedy, greedy_ci, maj, maj_ci = stdout.split('results:')[0].strip().splitlines()[-5:]
  assert header.split() == ['GSM8K', 'CMATH']
  assert greedy.split()[0] == 'greedy' and maj.split()[0] == 'maj@2'
  assert greedy_ci.strip().startswith('95% CI') and maj_ci.strip().startswith('95% CI')


def test_generate_command(model_dir):
  greedy = run(['grpo_jax.generate', f'--model={model_dir}', '--prompt=What is 2+3?', '--max_new_tokens=5'])
  again = run(['grpo_jax.generate', f'--model={model_dir}', '--prompt=What is 2+3?', '--max_new_tokens=5'])
  assert greedy == again and greedy.startswith('---')
  sampled = run(['grpo_jax.generate', f'--model={model_dir}', '--prompt=hi', '--temperature=1', '--num_samples=3',
                 '--max_new_tokens=5'])
  assert sampled.count('--- completion') == 3


def test_bad_model_dirs_fail_before_compile(model_dir, tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={ROOT}/configs/gsm8k_hf.py:tiny',
                         f'--workdir={tmp_path}/w', f'--config.model.path={tmp_path}/nope'], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'is not a directory' in proc.stderr


def test_tokenizer_larger_than_the_embedding_fails_before_compile(tmp_path):
  tokenizer = build_tokenizer(['user', 'assistant'])
  cfg = ModelConfig(model_type='llama', vocab_size=len(tokenizer) - 5, d_model=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=32)
  hf.save_model(Transformer(cfg, nnx.Rngs(0)), cfg, str(tmp_path))
  tokenizer.save_pretrained(str(tmp_path))
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={ROOT}/configs/gsm8k_hf.py:tiny',
                         f'--workdir={tmp_path}/w', f'--config.model.path={tmp_path}'], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert f'tokenizer has {len(tokenizer)} tokens but the model embeds only {cfg.vocab_size}' in proc.stderr


def test_stop_tokens_include_generation_config_eos(tmp_path):
  tokenizer = build_tokenizer()
  assert stop_token_ids(tokenizer, str(tmp_path)) == (tokenizer.eos_token_id,)
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [tokenizer.eos_token_id, 7, 9]}))
  assert stop_token_ids(tokenizer, str(tmp_path)) == (tokenizer.eos_token_id, 7, 9)
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': 11}))
  assert stop_token_ids(tokenizer, str(tmp_path)) == (tokenizer.eos_token_id, 11)


def test_the_command_line_modules_import_together():
  # Their flags share names (--workdir, --model, ...) with other meanings; a notebook may import them all.
  code = 'import grpo_jax.train, grpo_jax.eval, grpo_jax.generate, grpo_jax.plan'
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
