"""Nothing silently wrong: non-finite numbers, a resume with another config, two runs on one workdir, damaged logs,
a full disk, a corrupt latest checkpoint. Each test fails without its guard."""
import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding
from grpo_jax.pipeline import checkpoint, run as runner, workdir as workdir_lib
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.loop import NonFiniteError
from grpo_jax.pipeline.metrics import MetricWriter, read_metrics
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout


def one_device(cfg):
  cfg.cpu_devices = 0  # in-process runs: this process has one device already
  return cfg


# --- 1. non-finite numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize('path, value', [('rl.beta', float('nan')), ('rl.lr', float('inf')),
                                         ('sft.lr', float('-inf'))])
def test_non_finite_config_values_are_refused(tiny_config, path, value):
  section, key = path.split('.')
  tiny_config[section][key] = value
  with pytest.raises(ValueError, match=rf'config.{section}.{key} must be a finite number'):
    check_config(tiny_config, 1)


def test_a_step_with_a_non_finite_loss_changes_nothing():
  tokenizer = build_tokenizer()
  model_cfg = ModelConfig(vocab_size=len(tokenizer), d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                          head_dim=8, mlp_dim=32)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  graphdef, params = nnx.split(Transformer(model_cfg, nnx.Rngs(0)), nnx.Param)
  tx = make_optimizer(ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0,
                                      grad_clip=1.0, master_dtype='float32')), 10)
  state = init_state(params, tx, mesh)
  step = make_train_step(graphdef, tx, lambda m, b, h: grpo_objective(m, b, h, config=LossConfig()),
                         state_shardings(state, mesh), sharding.batch_sharding(mesh), mesh)
  tokens = np.arange(4 * 5, dtype=np.int32).reshape(4, 5) % 20 + 4
  ones, lp = np.ones_like(tokens), np.full((4, 5), -2.0, np.float32)
  beta = {'beta': np.float32(0.04)}
  bad = Rollout(tokens, ones, tokens, ones, lp, lp, np.array([1.0, np.nan, 0.0, -1.0], np.float32))
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, bad, beta)
  assert float(metrics['nonfinite']) == 1.0 and not np.isfinite(float(metrics['loss']))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)  # params, moments, step
  good = bad._replace(advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32))
  state, metrics = step(state, good, beta)
  assert float(metrics['nonfinite']) == 0.0 and int(state.step) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state.params)),
                                                     jax.tree.leaves(before.params), strict=True))


def test_a_diverging_run_stops_naming_the_step_and_keeps_finite_checkpoints(tiny_config, tmp_path):
  cfg = one_device(tiny_config)
  cfg.sft.lr, cfg.max_nonfinite_steps = 1e38, 2  # the first update is finite and huge; what follows overflows
  with pytest.raises(NonFiniteError, match=r'sft: 2 steps in a row \(the last: step \d\) had a non-finite'):
    runner.run(cfg, str(tmp_path))
  from grpo_jax.pipeline import sft
  from grpo_jax.pipeline.setup import build_setup
  setup = build_setup(cfg)
  target = sft.make_stage(setup, setup.init_params).state
  mngr = checkpoint.manager(str(tmp_path), 'sft', max_to_keep=5)
  assert mngr.all_steps()
  for step in mngr.all_steps():
    saved = checkpoint.restore(mngr, step, target)['policy']
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved)), step


# --- 2. resume checks what changed ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def finished_workdir(tmp_path_factory):
  from conftest import load_config
  workdir = tmp_path_factory.mktemp('finished')
  runner.run(one_device(load_config('tiny')), str(workdir))
  return workdir


def test_resume_with_another_trajectory_config_is_refused_listing_the_fields(finished_workdir, tiny_config):
  cfg = one_device(tiny_config)
  cfg.rl.lr, cfg.seed = 1e-3, 7
  before = (finished_workdir / 'config.json').read_text()
  with pytest.raises(workdir_lib.WorkdirError, match=r"rl.lr: 5e-05 -> 0.001; seed: 0 -> 7.*"
                                                     r"--allow_config_change=rl.lr,seed"):
    runner.run(cfg, str(finished_workdir))
  assert (finished_workdir / 'config.json').read_text() == before  # not overwritten to claim the new values


def test_extending_a_finished_run_trains_the_extra_steps_and_keeps_the_history(finished_workdir, tiny_config,
                                                                               tmp_path):
  import shutil
  workdir = tmp_path / 'w'
  shutil.copytree(finished_workdir, workdir)
  cfg = one_device(tiny_config)
  cfg.rl.num_steps, cfg.log_every = 6, 2  # log_every does not change the trajectory: no need to allow it
  summary = runner.run(cfg, str(workdir), allow_config_change=['rl.num_steps'])
  assert summary['rl_steps'] == 6
  assert [r['step'] for r in read_metrics(str(workdir), 'grpo')] == [1, 2, 3, 4, 6]
  history = [json.loads(line) for line in (workdir / 'config_history.jsonl').read_text().splitlines()]
  assert [h['event'] for h in history] == ['started', 'resumed']
  assert history[-1]['changes'] == {'rl.num_steps': [4, 6]}
  assert json.loads((workdir / 'config.json').read_text())['rl']['num_steps'] == 6


# --- 3. one run per workdir ---------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_workdir_names_the_holder(tmp_path, tiny_config):
  holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
      import fcntl, json, os, socket, sys, time
      f = open({str(tmp_path / '.lock')!r}, 'a+')
      fcntl.flock(f, fcntl.LOCK_EX)
      f.write(json.dumps({{'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now'}})); f.flush()
      print('locked', flush=True)
      time.sleep(60)
      ''')], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirError, match=rf'in use by another run: pid {holder.pid} on host '):
      runner.run(one_device(tiny_config), str(tmp_path))
    assert not (tmp_path / 'metrics.jsonl').exists()
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  (tmp_path / '.lock').write_text(json.dumps({'pid': 999999, 'host': 'gone', 'started': 'then'}))
  with workdir_lib.lock(str(tmp_path)):
    held = json.loads((tmp_path / '.lock').read_text())
    assert held['pid'] == os.getpid()
    with open(tmp_path / '.lock') as f, pytest.raises(BlockingIOError):
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # really held
  assert 'had the lock of a run that is gone' in capsys.readouterr().out
  assert (tmp_path / '.lock').read_text() == ''  # released: an empty lock file is not stale


# --- 4. damaged logs ----------------------------------------------------------------------------------------


def test_a_partial_last_metrics_line_is_dropped_and_rewind_repairs_the_file(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"stage": "sft", "step": 1, "loss": 1.0}\n{"stage": "sft", "step": 2, "loss": 0.9}\n'
                  '{"stage": "sft", "step": 3, "lo')
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2]
  MetricWriter(str(tmp_path)).rewind('sft', 2)
  assert path.read_text().endswith('\n') and [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_a_damaged_metrics_line_before_the_end_names_the_file_and_line(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"stage": "sft", "step": 1}\n{"stage": "sf\n{"stage": "sft", "step": 3}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: damaged line'):
    read_metrics(str(tmp_path))


def test_a_truncated_init_eval_is_evaluated_again_not_fatal(finished_workdir, tiny_config, tmp_path, capsys):
  import shutil
  workdir = tmp_path / 'w'
  shutil.copytree(finished_workdir, workdir)
  good = json.loads((workdir / 'init_eval.json').read_text())
  (workdir / 'init_eval.json').write_text('{"accuracy": 0.0, "rew')
  runner.run(one_device(tiny_config), str(workdir))
  assert 'init_eval.json is damaged' in capsys.readouterr().out
  assert json.loads((workdir / 'init_eval.json').read_text()) == good


# --- 5. full disk -------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_clear_error_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  mngr = checkpoint.manager(str(tmp_path), 'grpo', max_to_keep=2)
  tree = {'policy': {'w': jnp.ones((3, 2))}}
  checkpoint.save(mngr, 2, tree, {'step': 2})

  def full(step, **kwargs):
    os.makedirs(os.path.join(str(mngr.directory), f'{step}.orbax-checkpoint-tmp-123'))
    raise RuntimeError('save failed') from OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(mngr, 'save', full)
  with pytest.raises(checkpoint.CheckpointError, match=r'no space left .* saving step 4 \(\d+ MiB free\); the '
                                                       r'previous checkpoint \(2\) is intact'):
    checkpoint.save(mngr, 4, tree, {'step': 4})
  monkeypatch.undo()
  assert sorted(os.listdir(mngr.directory)) == ['2']  # the temporary directory is gone
  np.testing.assert_array_equal(checkpoint.restore(mngr, 2, tree)['policy']['w'], np.ones((3, 2)))
