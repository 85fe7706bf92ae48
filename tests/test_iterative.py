"""Iterative RL end to end on the tiny preset: outer iterations, the reward model retrained between them with replay,
the reference reset, kills inside reward-model training and right after an iteration boundary, and I = 2 without a
reference reset equal to I = 1."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, TINY_RUN_OVERRIDES, train_command

from grpo_jax.pipeline import checkpoint, metrics

TIMING_KEYS = {'step_time', 'sample_time', 'sampled_tokens_per_s', 'tokens_per_s_per_device', 'mfu', 'compiles'}
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
# Three iterations of two GRPO steps, a reward model (mixed reward) retrained between them, the KL controller on the
# learning rate; a checkpoint every step so kills land between saved steps.
ITERATIVE = ('--config.rl.num_steps=6', '--config.rl.num_iterations=3', '--config.rl.reward_source=mix',
             '--config.reward_model.num_steps=6', '--config.checkpoint_every=1', '--config.rl.kl_target=0.001',
             '--config.rl.kl_adapt=lr')


def read_metrics(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics.read_metrics(str(workdir))]


def summary_without_wall(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  drop = lambda d: {k: v for k, v in d.items() if 'wall' not in k}  # noqa: E731
  out = drop(summary)
  for key in ('iterations', 'reward_model'):
    out[key] = [drop(x) for x in summary.get(key, [])]
  return out


def train(workdir, *overrides):
  proc = subprocess.run(train_command(workdir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope='module')
def iterative_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('iterative')
  return workdir, train(workdir, *ITERATIVE)


def test_stages_of_algorithm_1_in_order_with_their_checkpoints(iterative_run):
  workdir, stdout = iterative_run
  order = ['sft', 'reward_model_0', 'grpo_1', 'reward_model_1', 'grpo_2', 'reward_model_2', 'grpo_3']
  assert sorted(os.listdir(workdir / 'checkpoints')) == sorted(order)
  stages = []
  for r in read_metrics(workdir):
    if not stages or stages[-1] != r['stage']:
      stages.append(r['stage'])
  assert stages == order
  rows = read_metrics(workdir)
  assert [r['iteration'] for r in rows if r['stage'].startswith('grpo')] == [1, 1, 2, 2, 3, 3]
  for stage in order[1:]:
    meta = checkpoint.read_meta(checkpoint.manager(str(workdir), stage, max_to_keep=2))
    assert meta['finished'] and meta['step'] == (6 if stage.startswith('reward') else 2)
    k = int(stage.split('_')[-1])
    assert meta['iteration'] == k
    if stage.startswith('grpo'):  # the boundary's RNG and data position
      assert meta['data_offset'] == 2 * (k - 1) and meta['data_position'] == 2 and len(meta['rng']) == 2
  summary = summary_without_wall(workdir)
  assert [it['stage'] for it in summary['iterations']] == ['grpo_1', 'grpo_2', 'grpo_3']
  assert summary['rl_steps'] == 6
  for it in summary['iterations']:
    assert 0 <= it['rm_heldout_accuracy'] <= 1 and 0 <= it['win_rate_vs_sft'] <= 1
  assert 'grpo_3' in stdout


def test_replay_buffer_holds_every_earlier_iterations_comparisons(iterative_run):
  workdir, _ = iterative_run
  rms = summary_without_wall(workdir)['reward_model']
  assert [r['stage'] for r in rms] == ['reward_model_0', 'reward_model_1', 'reward_model_2']
  assert rms[0]['replay_size'] == 0  # before iteration 1 nothing is old
  assert rms[1]['replay_size'] == rms[0]['train_pairs']
  assert rms[2]['replay_size'] == rms[0]['train_pairs'] + rms[1]['train_pairs']  # below replay_capacity
  for r in rms:
    assert r['train_pairs'] > 0 and r['heldout_pairs'] > 0


def _restore(workdir, stage, item):
  """One item of a stage's latest checkpoint as numpy arrays (saved over 2 devices; this process may have one)."""
  mngr = checkpoint.manager(str(workdir), stage, max_to_keep=100)
  path = os.path.join(str(mngr.directory), str(mngr.latest_step()), item)
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  return ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_reference_is_the_policy_at_the_start_of_each_iteration(iterative_run):
  workdir, _ = iterative_run
  for k in (2, 3):
    previous_policy = _restore(workdir, f'grpo_{k - 1}', 'policy')['params']
    reference = _restore(workdir, f'grpo_{k}', 'reference')
    for a, b in zip(_leaves(previous_policy), _leaves(reference), strict=True):
      np.testing.assert_array_equal(a, b)
  # ... and iteration 1's is the SFT policy.
  for a, b in zip(_leaves(_restore(workdir, 'sft', 'policy')['params']), _leaves(_restore(workdir, 'grpo_1',
                                                                                          'reference')), strict=True):
    np.testing.assert_array_equal(a, b)


def test_kl_controller_moves_the_learning_rate_not_beta(iterative_run):
  workdir, _ = iterative_run
  rows = [r for r in read_metrics(workdir) if r['stage'].startswith('grpo')]
  assert len({r['beta'] for r in rows}) == 1
  assert len({r['lr'] for r in rows}) > 1
  for r in rows:
    assert r['kl'] >= 0 and r['kl_exact'] >= 0
    assert 0 <= r['rule_reward'] <= 1 and np.isfinite(r['rm_score'])


def _run_until(workdir, condition):
  proc = subprocess.Popen(train_command(workdir, *ITERATIVE), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None:
    if condition(workdir):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.communicate(timeout=900)
  return proc.returncode


def _resume_and_compare(workdir, reference):
  stdout = train(workdir, *ITERATIVE)
  assert read_metrics(workdir) == read_metrics(reference)
  assert summary_without_wall(workdir) == summary_without_wall(reference)
  return stdout


def _rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return read_metrics(workdir) if os.path.exists(path) else []


def test_kill_inside_reward_model_training_then_resume_matches_uninterrupted(iterative_run, tmp_path):
  reference, _ = iterative_run
  inside = lambda w: any(r['stage'] == 'reward_model_1' and r['step'] >= 3 for r in _rows(w))  # noqa: E731
  assert _run_until(tmp_path, inside) == -signal.SIGKILL, 'the run finished before the kill'
  assert 'reward_model_1: resuming from step' in _resume_and_compare(tmp_path, reference)


@pytest.mark.slow  # CI time: test_kill_inside_reward_model_training_... covers resume across iterations in CI
def test_kill_right_after_an_iteration_boundary_then_resume_matches_uninterrupted(iterative_run, tmp_path):
  reference, _ = iterative_run
  # grpo_1 is finished and saved once the next stage's checkpoint folder appears.
  after = lambda w: os.path.isdir(os.path.join(w, 'checkpoints', 'reward_model_1'))  # noqa: E731
  assert _run_until(tmp_path, after) == -signal.SIGKILL, 'the run finished before the kill'
  stdout = _resume_and_compare(tmp_path, reference)
  assert 'grpo_1: resuming' not in stdout  # the finished iteration is restored, not rerun


@pytest.mark.slow  # CI time (about a minute); run with the slow tests
def test_iterations_without_reference_reset_equal_one_iteration(tiny_run, tmp_path):
  """With the verifier's reward and the SFT reference kept, splitting GRPO into iterations changes nothing: the
  policy, optimizer, learning-rate schedule, KL controller, data order and RNG all run on across the boundary.
  One iteration: the session's shared tiny run; two: the same settings in two iterations of 6 steps."""
  one, two = tiny_run.workdir, tmp_path / 'two'
  train(two, *TINY_RUN_OVERRIDES, '--config.rl.num_iterations=2', '--config.rl.reset_reference=False')
  drop = ('stage', 'step', 'iteration')
  rows = lambda w: [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(w)  # noqa: E731
                    if r['stage'].startswith('grpo')]
  assert len(rows(one)) == 12 and rows(one) == rows(two)
  a, b = summary_without_wall(one), summary_without_wall(two)
  assert (a['rl_accuracy'], a['rl_reward']) == (b['rl_accuracy'], b['rl_reward'])


def test_eval_loads_the_policy_of_a_chosen_iteration(iterative_run):
  from grpo_jax.pipeline.evaluate import load_policy, policy_stages
  workdir, _ = iterative_run
  assert policy_stages(str(workdir)) == ('grpo_3', 'grpo_2', 'grpo_1', 'grpo', 'ppo', 'sft')
  for k, stage in ((0, 'sft'), (2, 'grpo_2'), (None, 'grpo_3')):
    _, params, _, _ = load_policy(workdir=str(workdir), iteration=k)
    for a, b in zip(_leaves(params), _leaves(_restore(workdir, stage, 'policy')['params']), strict=True):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoint.CheckpointError, match=r'no checkpoint of outer iteration 7; it has iterations '
                     r'\[1, 2, 3\]'):
    policy_stages(str(workdir), 7)
  proc = subprocess.run([sys.executable, '-m', 'grpo_jax.eval', f'--workdir={workdir}', '--iteration=7'], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'no checkpoint of outer iteration 7' in proc.stderr


def test_process_reward_model_is_trained_on_step_labels_and_scores_the_steps(tmp_path):
  train(tmp_path, '--config.rl.num_iterations=2', '--config.rl.supervision=process',
        '--config.rl.step_reward=reward_model')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['grpo_1', 'grpo_2', 'reward_model_0', 'reward_model_1',
                                                         'sft']
  rms = summary_without_wall(tmp_path)['reward_model']
  assert [r['train_outputs'] for r in rms] == [24, 24]  # 8 prompts x G=4, the first quarter of prompts held out
  assert all(0 <= r['heldout_accuracy'] <= 1 for r in rms)
  rows = [r for r in read_metrics(tmp_path) if r['stage'].startswith('grpo')]
  assert len(rows) == 4
  for r in rows:
    assert 0 < r['prm_step_score'] < 1 and 0 <= r['prm_step_agreement'] <= 1 and r['steps_per_output'] >= 1


def test_a_delimiter_absent_from_every_output_warns_once_and_each_output_is_one_step(tmp_path):
  stdout = train(tmp_path, '--config.rl.supervision=process', '--config.rl.step_delimiter=@')
  assert stdout.count("contains rl.step_delimiter='@'") == 1
  rows = [r for r in read_metrics(tmp_path) if r['stage'] == 'grpo']
  assert len(rows) == 4 and all(r['steps_per_output'] == 1 and r['delimiters'] == 0 for r in rows)
