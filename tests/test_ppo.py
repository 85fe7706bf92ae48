"""The PPO baseline: its value-side math against numpy loops, the critic's read-out, the zero-critic / REINFORCE
equivalence on a tiny model, the config preset and checks, and a tiny end-to-end run that checkpoints the critic and
resumes to the same trajectory."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from flax import nnx

from grpo_jax.core.logprobs import sequence_logprobs
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.core.value import explained_variance, ppo_advantages, token_rewards, value_loss, whiten
from grpo_jax.models import critic as critic_lib
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.pipeline import checkpoint, run as runner
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.metrics import read_metrics
from grpo_jax.rollout.rollout import Rollout

TIMING_KEYS = {'step_time', 'sample_time', 'sampled_tokens_per_s', 'tokens_per_s_per_device', 'mfu', 'compiles'}


def _batch(seed, n=6, t=8):
  """Random [n, t] inputs with garbage (not zeros) in the padding, and lengths 0 .. t (an empty output included)."""
  rng = np.random.default_rng(seed)
  lengths = np.array([0, t, *rng.integers(1, t + 1, n - 2)])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  garbage = lambda: rng.normal(size=(n, t)).astype(np.float32) * 3  # noqa: E731
  return rng, lengths, mask, garbage


# --- the math against numpy loops --------------------------------------------------------------------------------


def test_value_loss_and_clip_fraction_match_a_numpy_loop():
  rng, lengths, mask, garbage = _batch(0, n=7)
  values, old_values, returns = garbage(), garbage(), garbage()
  old_values[:, :3] = values[:, :3] + 0.05  # some tokens inside the clip range, so both branches occur
  eps = 0.2
  total, clipped_count, count = 0.0, 0, 0
  for i in range(values.shape[0]):
    for t in range(lengths[i]):
      v, vo, r = values[i, t], old_values[i, t], returns[i, t]
      vc = vo + min(max(v - vo, -eps), eps)
      total += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
      clipped_count += (vc - r) ** 2 > (v - r) ** 2
      count += 1
  loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=eps)
  np.testing.assert_allclose(loss, total / count, rtol=1e-5)
  np.testing.assert_allclose(metrics['value_clip_frac'], clipped_count / count, rtol=1e-6)
  assert 0 < clipped_count < count


def test_value_loss_gradient_is_zero_where_the_clipped_error_wins():
  """d loss / d V_t = (V_t - R_t) / count where the unclipped error is the larger, 0 where the clipped one is (V moved
  past eps from V_old, away from R): the critic gains nothing from moving a value further than eps."""
  _, lengths, mask, garbage = _batch(1)
  values, old_values, returns = garbage(), garbage(), garbage()
  eps = 0.2
  grad = np.asarray(jax.grad(lambda v: value_loss(v, old_values, returns, mask, clip_eps=eps)[0])(values))
  count = mask.sum()
  for i in range(values.shape[0]):
    for t in range(values.shape[1]):
      v, vo, r = values[i, t], old_values[i, t], returns[i, t]
      vc = vo + min(max(v - vo, -eps), eps)
      if t >= lengths[i] or (vc - r) ** 2 > (v - r) ** 2:
        assert grad[i, t] == 0, (i, t)
      else:
        np.testing.assert_allclose(grad[i, t], (v - r) / count, rtol=1e-4)


def test_token_rewards_match_a_numpy_loop():
  rng, lengths, mask, garbage = _batch(2)
  outcome = rng.normal(size=mask.shape[0]).astype(np.float32)
  old, ref = garbage(), garbage()
  beta = 0.3
  expected = np.zeros_like(mask)
  for i in range(mask.shape[0]):
    for t in range(lengths[i]):
      expected[i, t] = -beta * (old[i, t] - ref[i, t]) + (outcome[i] if t == lengths[i] - 1 else 0.0)
  np.testing.assert_allclose(token_rewards(outcome, old, ref, mask, beta=beta), expected, rtol=1e-5, atol=1e-6)


def test_whiten_and_explained_variance_match_numpy_over_valid_tokens():
  _, lengths, mask, garbage = _batch(3)
  x, y = garbage(), garbage()
  valid_x = np.concatenate([x[i, :lengths[i]] for i in range(len(lengths))])
  valid_y = np.concatenate([y[i, :lengths[i]] for i in range(len(lengths))])
  expected = np.zeros_like(x)
  for i in range(x.shape[0]):
    for t in range(lengths[i]):
      expected[i, t] = (x[i, t] - valid_x.mean()) / (valid_x.std() + 1e-8)
  np.testing.assert_allclose(whiten(x, mask), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(explained_variance(y, x, mask), 1 - np.var(valid_x - valid_y) / np.var(valid_x),
                             rtol=1e-4)
  np.testing.assert_allclose(explained_variance(x, x, mask), 1.0)
  assert np.isnan(explained_variance(x, np.ones_like(x), mask))  # returns with no variance


# --- the critic ----------------------------------------------------------------------------------------------------


def _tiny_model(seed=0):
  cfg = ModelConfig(vocab_size=11, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(seed)), nnx.Param)
  return cfg, graphdef, params


def _tiny_rollout(seed, n=4, p=3, c=5):
  rng = np.random.default_rng(seed)
  prompt_mask = np.ones((n, p), np.int32)
  prompt_mask[0, 0] = 0  # left padding
  lengths = np.array([c, 1, 3, 4])[:n]
  completion_mask = (np.arange(c)[None, :] < lengths[:, None]).astype(np.int32)
  return (rng.integers(0, 11, (n, p)).astype(np.int32), prompt_mask, rng.integers(0, 11, (n, c)).astype(np.int32),
          completion_mask, lengths)


def test_critic_starts_from_the_policy_backbone_with_zero_values_and_reads_the_state_before_each_token():
  cfg, _, params = _tiny_model()
  critic_params = critic_lib.params_from_policy(cfg, params)
  policy_flat = dict(nnx.to_flat_state(params))
  for key, var in nnx.to_flat_state(critic_params):
    if key[0] == 'backbone':
      np.testing.assert_array_equal(var[...], policy_flat[key[1:]][...])
  graphdef = critic_lib.abstract_params(cfg)[0]
  pt, pm, ct, cm, _ = _tiny_rollout(0)
  values_fn = critic_lib.make_value_fn(graphdef)
  np.testing.assert_array_equal(values_fn(critic_params, pt, pm, ct, cm), 0.0)  # the zero head

  # A random head: V_t reads the hidden state at slot p - 1 + t, which sees the completion up to token t - 1 only.
  flat = [(k, v.replace(jax.random.normal(jax.random.key(1), v.shape)) if k[0] in ('head', 'bias') else v)
          for k, v in nnx.to_flat_state(critic_params)]
  critic_params = nnx.from_flat_state(flat)
  values = np.asarray(values_fn(critic_params, pt, pm, ct, cm))
  model = nnx.merge(graphdef, critic_params)
  tokens, mask = np.concatenate([pt, ct], 1), np.concatenate([pm, cm], 1).astype(bool)
  hidden = np.asarray(model.backbone.final_norm(model.backbone.hidden_states(tokens, mask=mask)))  # [n, p + c, d]
  head, bias = np.asarray(model.head[...]), float(model.bias[...])
  p = pt.shape[1]
  for i in range(ct.shape[0]):
    for t in range(ct.shape[1]):
      np.testing.assert_allclose(values[i, t], hidden[i, p - 1 + t] @ head + bias, rtol=1e-5, atol=1e-5)
  changed = ct.copy()
  changed[:, 2] = (changed[:, 2] + 1) % 11
  other = np.asarray(values_fn(critic_params, pt, pm, changed, np.ones_like(cm)))
  full = np.asarray(values_fn(critic_params, pt, pm, ct, np.ones_like(cm)))
  np.testing.assert_allclose(other[:, :3], full[:, :3], rtol=1e-5, atol=1e-6)  # token 2 is not in V_0 .. V_2
  assert np.abs(other[:, 3:] - full[:, 3:]).max() > 1e-4  # it is in V_3 onward


# --- PPO with lambda = gamma = 1, a zero critic and no KL is REINFORCE without a baseline -------------------------


def test_ppo_with_a_zero_critic_and_lambda_gamma_one_is_reinforce_without_a_baseline():
  _, graphdef, params = _tiny_model(3)
  pt, pm, ct, cm, lengths = _tiny_rollout(1)
  outcome = np.array([1.0, 0.0, 0.5, -2.0], np.float32)
  model = nnx.merge(graphdef, params)
  logprobs = np.asarray(sequence_logprobs(model, pt, pm, ct, cm))
  ref = logprobs + np.random.default_rng(0).normal(size=logprobs.shape).astype(np.float32)  # ignored at beta 0
  advantages, returns, raw = ppo_advantages(outcome, logprobs, ref, np.zeros(cm.shape, np.float32), cm, beta=0.0,
                                            gamma=1.0, lam=1.0, whiten_advantages=False)
  expected = outcome[:, None] * cm  # the raw outcome reward at every valid token, 0 on padding
  np.testing.assert_allclose(advantages, expected, atol=1e-6)
  np.testing.assert_allclose(returns, expected, atol=1e-6)
  np.testing.assert_allclose(raw, expected, atol=1e-6)

  # The policy gradient at ratio 1 (pi_old = pi_theta) of the PPO loss on these advantages, with no KL term...
  config = LossConfig(kl_penalty=False)
  batch = Rollout(pt, pm, ct, cm, logprobs, ref, np.asarray(advantages))
  ppo_grad = nnx.grad(lambda m: grpo_objective(m, batch, {}, config=config)[0])(model)

  # ...equals that of REINFORCE's surrogate -mean_i (1/|o_i|) sum_t R_i log pi(o_it).
  def reinforce(m):
    lp = sequence_logprobs(m, pt, pm, ct, cm)
    return -jnp.mean((outcome[:, None] * lp * cm).sum(1) / lengths)

  reinforce_grad = nnx.grad(reinforce)(nnx.merge(graphdef, params))
  flat_ppo, flat_reinforce = jax.tree.leaves(ppo_grad), jax.tree.leaves(reinforce_grad)
  assert len(flat_ppo) == len(flat_reinforce)
  assert max(float(jnp.abs(g).max()) for g in flat_ppo) > 1e-4  # a real gradient, not two zeros
  for a, b in zip(flat_ppo, flat_reinforce, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


# --- config ----------------------------------------------------------------------------------------------------------


def test_ppo_preset_is_the_default_with_the_algorithm_its_reward_kl_and_critic_warmup():
  default, ppo = load_config().to_dict(), load_config('ppo').to_dict()
  differ = {(section, k) for section in default for k in (default[section] if isinstance(default[section], dict)
                                                           else [None])
            if (default[section] if k is None else default[section][k]) != (
                ppo[section] if k is None else ppo[section][k])}
  assert differ == {('rl', 'algorithm'), ('rl', 'beta'), ('ppo', 'critic_warmup_steps')}
  assert ppo['rl']['algorithm'] == 'ppo' and ppo['rl']['beta'] > 0 and default['rl']['algorithm'] == 'grpo'
  check_config(load_config('ppo'), 2)


@pytest.mark.parametrize('path, value, match', [
    ('rl.algorithm', 'a2c', r"rl.algorithm='a2c' is unknown; known: \['grpo', 'ppo'\]"),
    ('ppo.lam', 1.5, r'ppo.lam must be a number in \[0, 1\]'),
    ('ppo.gamma', -0.1, r'ppo.gamma must be a number in \[0, 1\]'),
    ('ppo.value_clip', 0.0, 'ppo.value_clip must be a positive number'),
    ('ppo.critic_warmup_steps', -1, r'ppo.critic_warmup_steps must be an int >= 0'),
    ('ppo.critic_warmup_steps', 200, 'leaves none of rl.num_steps=200'),
    ('ppo.lr', 0.0, 'ppo.lr must be positive'),
    ('ppo.schedule', 'linear', r"ppo.schedule='linear' is unknown; known: \['constant', 'cosine'\]"),
    ('rl.num_iterations', 2, r"rl.num_iterations=2 is not supported with rl.algorithm='ppo'"),
    ('rl.reward_source', 'reward_model', r"rl.reward_source='reward_model' is not supported"),
    ('rl.supervision', 'process', r"rl.supervision='process' is not supported"),
    ('rl.kl_target', 0.01, 'rl.kl_target=0.01 is not supported'),
    ('lora.rank', 4, r'lora.rank > 0 on the RL stage is not supported'),
    ('rl.kl_estimator', 'exact', r"rl.kl_estimator='exact' is a loss term; with rl.algorithm='ppo'"),
    ('rl.importance_ratio', 'sequence', r"rl.importance_ratio='sequence' \(GSPO\) with rl.algorithm='ppo'"),
    ('rl.dynamic_sampling', True, r"rl.dynamic_sampling is a GRPO stage switch; rl.algorithm='ppo' does not"),
])
def test_bad_ppo_config_values_are_refused_naming_the_field(path, value, match):
  cfg = load_config('ppo')
  section, key = path.split('.')
  cfg[section][key] = value
  with pytest.raises(ValueError, match=match):
    check_config(cfg, 2)


def test_grpo_ignores_the_ppo_only_restrictions():
  cfg = load_config()
  cfg.rl.num_iterations, cfg.rl.num_steps = 2, 200  # fine for GRPO
  check_config(cfg, 2)


# --- end to end: a tiny PPO run, its critic checkpoint, and a resume -----------------------------------------------


def _tiny_ppo():
  cfg = load_config('tiny')
  cfg.cpu_devices = 0  # in-process runs: this process has its devices already
  cfg.rl.algorithm = 'ppo'
  cfg.ppo.critic_warmup_steps = 1  # step 1 trains the critic only, steps 2-4 both
  cfg.checkpoint_every, cfg.checkpoint_keep = 2, 10
  return cfg


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]


@pytest.fixture(scope='module')
def ppo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ppo')
  summary = runner.run(_tiny_ppo(), str(workdir))
  return workdir, summary


def test_tiny_ppo_run_logs_its_metrics_and_checkpoints_the_critic_by_role(ppo_run):
  workdir, summary = ppo_run
  assert summary['rl_algorithm'] == 'ppo' and summary['rl_steps'] == 4
  assert 0 <= summary['rl_accuracy'] <= 1 and summary['rl_pass_at_g'] is not None
  rows = [r for r in _rows(workdir) if r['stage'] == 'ppo']
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for key in ('value_loss', 'value_clip_frac', 'explained_variance', 'advantage_mean', 'advantage_std', 'reward',
              'accuracy', 'completion_len', 'frac_groups_no_signal', 'critic_grad_norm', 'model_flops'):
    assert all(key in r for r in rows), key
  assert rows[0]['policy_frozen'] == 1 and 'loss' not in rows[0]  # the critic's warm-up step
  for r in rows[1:]:
    assert r['policy_frozen'] == 0 and 'clip_frac' in r and r['grad_norm'] > 0
  assert rows[0]['value_mean'] == 0.0  # the zero head, before any critic update
  assert rows[-1]['value_mean'] != 0.0
  mngr = checkpoint.manager(str(workdir), 'ppo', max_to_keep=10)
  assert mngr.all_steps() == [2, 4]
  assert {p.name for p in (workdir / 'checkpoints' / 'ppo' / '4').iterdir()} >= {'policy', 'reference', 'critic',
                                                                                   'meta'}


def test_tiny_ppo_run_interrupted_after_a_checkpoint_resumes_to_the_same_trajectory(ppo_run, tmp_path):
  """A SIGKILL after step 2's save leaves checkpoints up to step 2 and metric rows past it; the rerun restores the
  policy, reference and critic from step 2 and must log what the uninterrupted run logged."""
  reference, summary = ppo_run
  workdir = tmp_path / 'w'
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / 'checkpoints' / 'ppo' / '4')
  (workdir / 'summary.json').unlink()
  resumed = runner.run(_tiny_ppo(), str(workdir))
  assert _rows(workdir) == _rows(reference)
  strip = lambda s: {k: v for k, v in s.items() if 'wall' not in k}  # noqa: E731
  assert strip(resumed) == strip(summary)
  assert strip(json.loads((workdir / 'summary.json').read_text())) == strip(summary)


def test_eval_and_report_read_the_ppo_stage(ppo_run, tmp_path):
  """`eval --workdir` loads the PPO policy (not the SFT one), and `report` plots the PPO stage as the RL stage."""
  from grpo_jax import report
  from grpo_jax.pipeline.evaluate import load_policy, policy_stages
  workdir, _ = ppo_run
  assert policy_stages(str(workdir)) == ('grpo', 'ppo', 'sft') and policy_stages(str(workdir), 1) == ('ppo',)
  _, params, _, _ = load_policy(workdir=str(workdir))
  mngr = checkpoint.manager(str(workdir), 'ppo', max_to_keep=10)
  saved = checkpoint.restore_subtree(mngr, 4, 'policy', {'params': params})['params']
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  run = report.load_run(str(workdir), 'ppo')
  assert [r['step'] for r in run.grpo] == [1, 2, 3, 4] and {r['stage'] for r in run.grpo} == {'ppo'}
  assert report.main([str(workdir), '--out', str(tmp_path / 'plots')]) == 0
  assert (tmp_path / 'plots' / 'grpo_reward.png').is_file()


def test_step_work_is_grpo_work_plus_the_critic_and_drops_the_policy_update_in_warmup():
  import dataclasses

  from grpo_jax.models import flops
  from grpo_jax.pipeline.ppo import step_work
  cfg = ModelConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  prompt_mask = np.ones((8, 5), np.int32)
  completion_mask = (np.arange(7)[None, :] < np.array([7, 3, 4, 1, 6, 2, 5, 5])[:, None]).astype(np.int32)
  kw = dict(group_size=4, num_epochs=2)
  grpo = flops.grpo_step_work(cfg, prompt_mask, completion_mask, reference=True, **kw)
  critic_forward = flops.forward_flops(dataclasses.replace(cfg, vocab_size=1), batch=8, new_tokens=12)
  policy_forward = flops.forward_flops(cfg, batch=8, new_tokens=12)
  on = step_work(cfg, prompt_mask, completion_mask, train_policy=True, **kw)
  off = step_work(cfg, prompt_mask, completion_mask, train_policy=False, **kw)
  np.testing.assert_allclose(on['model_flops'], grpo['model_flops'] + (1 + 3 * 2) * critic_forward)
  np.testing.assert_allclose(on['model_flops'] - off['model_flops'], 3 * 2 * policy_forward)
  assert on['step_tokens'] == grpo['step_tokens'] == 40 + completion_mask.sum()


def test_ppo_command_on_two_cpu_devices(tmp_path):
  """The README's command path: a fresh process, the tiny preset's two XLA devices (batches and updates sharded over
  both, where concurrent policy and critic updates once deadlocked in their all-reduces)."""
  import os
  import subprocess

  from conftest import ROOT, train_command
  proc = subprocess.run(train_command(tmp_path, '--config.rl.algorithm=ppo', '--config.rl.num_steps=6'), cwd=ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "devices: 2 (1 processes)" in proc.stdout and 'ppo' in proc.stdout
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['rl_algorithm'] == 'ppo' and summary['rl_steps'] == 6
  assert [r['step'] for r in _rows(tmp_path) if r['stage'] == 'ppo'] == list(range(1, 7))


@pytest.mark.parametrize('group_size', [1, 4])
def test_ppo_update_minibatches_hold_whole_groups_in_order(group_size):
  from grpo_jax.pipeline import ppo
  n, seen = 16, {'policy': [], 'critic': []}

  def recording(name):
    def step(state, batch, hparams):
      seen[name].append(np.asarray(batch[0])[:, 0])  # each row's id, stored in its first prompt token
      return state, {'loss': jnp.float32(0.0)}
    return step

  ids = np.arange(n)[:, None]
  rollout = Rollout(ids, ids, ids, ids, ids, ids, np.arange(n))
  values = critic_lib.ValueBatch(ids, ids, ids, ids, ids, ids)
  ppo.update(recording('policy'), recording('critic'), None, None, rollout, values, jax.random.key(0), num_epochs=2,
             num_minibatches=2, group_size=group_size)
  assert len(seen['policy']) == len(seen['critic']) == 4
  assert all(np.array_equal(a, b) for a, b in zip(seen['policy'], seen['critic'], strict=True))
  for rows in seen['policy']:
    groups = rows.reshape(-1, group_size)
    assert (groups % group_size == np.arange(group_size)).all()  # each group's rows contiguous and in order
    assert (groups // group_size == groups[:, :1] // group_size).all()
  assert sorted(np.concatenate(seen['policy'][:2])) == list(range(n))  # an epoch visits every row once


@pytest.mark.slow  # two PPO stages built and stepped; the test above checks the shuffle fast
def test_ppo_step_with_the_shared_prompt_forward_equals_the_repeated_one():
  # The policy's shared-prompt step reads each group's prompt from its first row, so the PPO update must shuffle whole
  # groups as GRPO's does: row-shuffled minibatches would pair completions with other rows' prompts.
  from grpo_jax.pipeline import ppo
  from grpo_jax.pipeline.setup import build_setup
  rows = {}
  for shared in (False, True):
    cfg = _tiny_ppo()
    cfg.ppo.critic_warmup_steps, cfg.rl.shared_prompt = 0, shared
    cfg.rl.num_minibatches = 1  # whole-batch updates: the two shuffles then differ only in row order
    setup = build_setup(cfg)
    stage = ppo.make_stage(setup, setup.init_params)
    _, metrics = stage.step(stage.state, 0)
    rows[shared] = {k: float(metrics[k]) for k in ('loss', 'ratio', 'clip_frac', 'entropy', 'value_loss')}
  assert rows[True] == pytest.approx(rows[False], rel=1e-4, abs=1e-6)
