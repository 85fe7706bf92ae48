"""The reward-model command (train on preference JSONL, report held-out pairwise accuracy) and the bad input of
iterative RL, each refused with a clear message before any compile."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from flax import nnx

from grpo_jax.data.tasks import generate_split
from grpo_jax.models import hf
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.pipeline.config_checks import check_config

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _write_preferences(path, n=200):
  """chosen: a worked solution; rejected: the same without its '#### N' line (a preference a tiny model learns)."""
  with open(path, 'w') as f:
    for e in generate_split('train', n, seed=0):
      f.write(json.dumps({'prompt': e.question, 'chosen': e.solution,
                          'rejected': e.solution.rsplit('\n', 1)[0]}) + '\n')


def _command(workdir, preferences, *overrides):
  return [sys.executable, '-m', 'grpo_jax.reward_model', f'--config={ROOT}/configs/default.py:tiny',
          f'--workdir={workdir}', f'--preferences={preferences}', *overrides]


def test_reward_model_command_learns_a_preference_and_reports_held_out_accuracy(tmp_path):
  prefs = tmp_path / 'prefs.jsonl'
  _write_preferences(prefs)
  proc = subprocess.run(_command(tmp_path / 'w', prefs, '--config.reward_model.num_steps=40',
                                 '--config.reward_model.batch_size=16', '--config.reward_model.lr=3e-3'),
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'w' / 'reward_model.json') as f:
    result = json.load(f)
  # 200 pairs, the last 25% held out; an untrained head scores every pair alike (0.5).
  assert (result['train_pairs'], result['heldout_pairs'], result['steps']) == (150, 50, 40)
  assert result['heldout_accuracy_before'] == 0.5
  assert result['heldout_accuracy'] >= 0.9
  assert 'held-out pairwise accuracy' in proc.stdout


def test_a_malformed_preference_file_names_the_file_and_line(tmp_path):
  prefs = tmp_path / 'prefs.jsonl'
  _write_preferences(prefs, n=3)
  with open(prefs, 'a') as f:
    f.write('{"prompt": "q", "chosen": "a"}\n')
  proc = subprocess.run(_command(tmp_path / 'w', prefs), cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert f'{prefs}:4' in proc.stderr and 'rejected' in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('overrides, match', [
    ({'reward_model.replay_fraction': 1.5}, r'replay_fraction must be in \[0, 1\]'),
    ({'reward_model.replay_fraction': -0.1}, r'replay_fraction must be in \[0, 1\]'),
    ({'rl.num_iterations': 3}, 'does not split into rl.num_iterations=3'),  # tiny: 4 steps
    ({'rl.num_iterations': 0}, 'num_iterations must be an int >= 1'),
    ({'rl.num_iterations': 5}, 'does not split'),  # M = 4 / 5 < 1
    ({'rl.kl_target': -0.1}, 'kl_target must be >= 0'),
    ({'rl.kl_adapt': 'gamma'}, 'kl_adapt'),
    ({'rl.reward_source': 'oracle'}, 'reward_source'),
    ({'rl.reward_source': 'reward_model', 'reward_model.label_samples': False}, 'needs comparisons'),
    ({'rl.supervision': 'process', 'rl.step_delimiter': ''}, 'step_delimiter must be a non-empty string'),
    ({'rl.supervision': 'steps'}, 'supervision'),
    ({'task.name': 'numbers'}, "has no verifier"),
    ({'rl.reward_source': 'mix', 'reward_model.path': '/nonexistent'}, 'reward_model.path'),
])
def test_bad_iterative_rl_settings_are_named(tiny_config, overrides, match):
  for key, value in overrides.items():
    group, name = key.split('.')
    tiny_config[group][name] = value
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    check_config(tiny_config, 2)


def test_an_empty_preference_file_is_refused_by_the_config_check(tiny_config, tmp_path):
  (tmp_path / 'empty.jsonl').write_text('')
  tiny_config.rl.reward_source = 'reward_model'
  tiny_config.reward_model.preference_file = str(tmp_path / 'empty.jsonl')
  with pytest.raises(ValueError, match='empty'):
    check_config(tiny_config, 2)


def test_a_reward_model_of_another_architecture_is_refused_before_any_compile(tmp_path):
  other = ModelConfig(vocab_size=80, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  hf.save_model(Transformer(other, nnx.Rngs(0)), other, str(tmp_path / 'rm'))
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.train', f'--config={ROOT}/configs/default.py:tiny',
                         f'--workdir={tmp_path / "w"}', '--config.rl.reward_source=mix',
                         f'--config.reward_model.path={tmp_path / "rm"}'], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0
  assert 'holds another architecture than the policy' in proc.stderr and 'd_model' in proc.stderr
  assert '=== sft' not in proc.stdout  # nothing trained
