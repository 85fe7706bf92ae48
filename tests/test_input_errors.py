"""Error messages for bad input name the culprit and the fix: long prompts, corrupt or non-finite HF weights, null
JSONL fields, unknown config keys on the command line."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_config, train_command
from flax import nnx
from safetensors.numpy import load_file, save_file

from grpo_jax.data import datasets
from grpo_jax.data.batches import encode
from grpo_jax.data.datasets import MathExample, load_jsonl
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models import hf
from grpo_jax.models.transformer import ModelConfig, Transformer

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
CFG = ModelConfig(model_type='llama', vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)


# --- long prompts ---

def test_long_prompt_error_names_the_real_config_key_and_the_eval_flag():
  examples = [MathExample('short', '1'), MathExample('a much longer question', '2')]
  with pytest.raises(ValueError) as info:
    encode(build_tokenizer(), examples, max_prompt_len=8, max_new_tokens=4, template='plain', with_solutions=False)
  message = str(info.value)
  key = re.search(r'\bconfig\.([\w.]+)=True', message)
  assert key, message
  section, name = key[1].split('.')
  assert load_config()[section][name] is False  # a key the default config really has, off by default
  assert key[1] == 'task.skip_long_prompts'
  assert '--skip_long_prompts' in message and 'count' in message


# --- Hugging Face weights ---

@pytest.fixture
def model_dir(tmp_path):
  hf.save_model(Transformer(CFG, nnx.Rngs(0)), CFG, str(tmp_path))
  return tmp_path


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
@pytest.mark.parametrize('indexed', [False, True], ids=['single_file', 'with_index'])
def test_corrupt_safetensors_error_names_the_file(model_dir, damage, indexed):
  file = model_dir / 'model.safetensors'
  if indexed:  # then the file is first opened in load_params, not while listing the tensors
    weight_map = {name: file.name for name in load_file(str(file))}
    (model_dir / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  data = file.read_bytes()
  file.write_bytes({'truncated': data[:len(data) // 2], 'garbage': np.random.default_rng(0).bytes(len(data)),
                    'empty': b''}[damage])
  with pytest.raises(ValueError) as info:
    hf.load_params(str(model_dir), CFG)
  assert str(file) in str(info.value)
  assert 'Re-download' in str(info.value)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_refused_naming_the_tensors(model_dir, bad):
  file = str(model_dir / 'model.safetensors')
  tensors = load_file(file)
  for name in ('model.layers.1.mlp.up_proj.weight', 'model.norm.weight'):
    tensors[name][0, ...] = bad  # one row: a slice read from anywhere in the tensor must be checked
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='NaN or inf') as info:
    hf.load_params(str(model_dir), CFG)
  message = str(info.value)
  assert 'model.layers.1.mlp.up_proj.weight' in message and 'model.norm.weight' in message
  assert 'in 2 tensors' in message and 'model.embed_tokens.weight' not in message


def test_nonfinite_error_names_at_most_five_tensors(model_dir):
  file = str(model_dir / 'model.safetensors')
  tensors = {name: np.full_like(x, np.nan) for name, x in load_file(file).items()}
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError) as info:
    hf.load_params(str(model_dir), CFG)
  message = str(info.value)
  assert f'in {len(tensors)} tensors' in message and f'and {len(tensors) - 5} more' in message
  assert sum(name in message for name in tensors) == 5


def test_finite_weights_still_load(model_dir):
  params = hf.load_params(str(model_dir), CFG)
  assert np.isfinite(np.asarray(params['embed'].get_value())).all()


def test_value_that_overflows_the_load_dtype_is_refused(model_dir):
  file = str(model_dir / 'model.safetensors')
  tensors = load_file(file)
  tensors['model.norm.weight'][0] = 1e6  # finite in float32, inf in float16
  save_file(tensors, file, metadata={'format': 'pt'})
  hf.load_params(str(model_dir), CFG)
  with pytest.raises(ValueError, match=r'read as float16\) in 1 tensor: model\.norm\.weight\.'):
    hf.load_params(str(model_dir), CFG, dtype='float16')


# --- JSONL fields ---

def test_null_field_is_reported_as_null_and_missing_as_missing(tmp_path):
  path = tmp_path / 'x.jsonl'
  path.write_text('{"q": "1+1", "a": 2}\n{"q": "2+2", "a": null}\n')
  with pytest.raises(ValueError) as info:
    load_jsonl(path, question_field='q', answer_field='a')
  assert str(info.value) == f"{path}:2: field 'a' is null"
  path.write_text('{"q": "1+1", "a": 2}\n\n{"q": "2+2"}\n')
  with pytest.raises(ValueError) as info:
    load_jsonl(path, question_field='q', answer_field='a')
  assert str(info.value) == f"{path}:3: record has no field 'a' (it has ['q'])"


def test_math_record_with_null_answer_and_no_box_says_null():
  record = {'problem': 'p', 'solution': 'no box here', 'answer': None}
  with pytest.raises(ValueError, match=r"^x:1: field 'answer' is null and no \\boxed\{\} in the solution$"):
    datasets._math_example(record, 'x:1')
  del record['answer']
  with pytest.raises(ValueError, match=r"^x:1: no field 'answer' and no \\boxed\{\}"):
    datasets._math_example(record, 'x:1')
  assert datasets._math_example({**record, 'solution': r'so \boxed{4}', 'answer': None}, 'x:1').answer == '4'


# --- unknown config keys on the command line ---

def _short_error(command: list[str]) -> str:
  proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
  return proc.stderr.strip()


def test_unknown_config_key_is_one_line_for_train(tmp_path):
  stderr = _short_error(train_command(tmp_path, '--config.rl.group_sise=16'))
  assert stderr == 'grpo_jax.train: unknown config key rl.group_sise (did you mean rl.group_size?)'
  assert not (tmp_path / 'metrics.jsonl').exists()
  stderr = _short_error(train_command(tmp_path, '--config.zzzqqq=1'))
  assert stderr == 'grpo_jax.train: unknown config key zzzqqq'
  stderr = _short_error(train_command(tmp_path, '--config.rl.group_size.x=1'))
  assert stderr.startswith('grpo_jax.train: bad override --config.rl.group_size.x: ')


def test_unknown_config_key_is_one_line_for_plan():
  stderr = _short_error([sys.executable, '-m', 'grpo_jax.plan', f'--config={ROOT}/configs/default.py:tiny',
                         '--num_devices=1', '--config.rll.group_size=16'])
  assert stderr == 'grpo_jax.plan: unknown config key rll.group_size (did you mean rl.group_size?)'
