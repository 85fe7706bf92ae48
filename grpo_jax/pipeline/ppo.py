"""The PPO baseline (the paper's ablation row): GRPO's data, sampler, reward and stage loop, with a learned critic in
place of the group baseline.

Each step: sample G outputs per prompt from pi_old (rollout.collect_rollout, as GRPO), read the critic's value of
every completion token's state, build RLHF PPO's per-token rewards (the outcome reward at the last token, minus
beta * (log pi_old - log pi_ref) at every token), run GAE(gamma, lambda) and whiten the advantages, then mu epochs x
minibatches of the clipped surrogate on those per-token advantages (core/losses.grpo_loss, no KL term: it is in the
reward) and of the clipped value loss on the critic. The math is core/value.py and core/gae.py; the critic
models/critic.py.

State by role: 'policy' (TrainState), 'reference' (frozen params), 'critic' (TrainState, its own optimizer, from
config.ppo).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.core.losses import LossConfig, grpo_micro_weight, grpo_objective
from grpo_jax.core.value import explained_variance, ppo_advantages
from grpo_jax.data.batches import batch_indices
from grpo_jax.models import critic as critic_lib, flops
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline import grpo, stages
from grpo_jax.pipeline.loop import Stage
from grpo_jax.pipeline.setup import Setup
from grpo_jax.pipeline.train_state import (
  TrainState,
  combine_metrics,
  init_state,
  learning_rate,
  make_optimizer,
  make_train_step,
  state_shardings,
)
from grpo_jax.rollout.rollout import Rollout, collect_rollout

NAME = stages.PPO.name


def loss_config(cfg) -> LossConfig:
  """GRPO's loss switches (grpo.loss_config) without the KL term: PPO puts the KL into the per-token reward."""
  return dataclasses.replace(grpo.loss_config(cfg), kl_penalty=False, kl_in_reward=False)


def raw_rewards(group_rewards: np.ndarray) -> np.ndarray:
  """collect_rollout's advantage_fn for PPO: the rewards [P, G] unchanged, so the rollout's 'advantages' field holds
  each output's outcome reward; the advantages are computed afterwards from the critic."""
  return np.asarray(group_rewards, np.float32)


def update(policy_step: Callable | None, critic_step: Callable, policy_state: TrainState, critic_state: TrainState,
           rollout: Rollout, values: critic_lib.ValueBatch, rng: jax.Array, *, num_epochs: int,
           num_minibatches: int, group_size: int = 1) -> tuple[TrainState, TrainState, dict, dict]:
  """mu epochs over the rollout, each a fresh shuffle split into minibatches; each minibatch updates the policy
  (unless policy_step is None: the critic's warm-up) and the critic on the same rows. pi_old and the old values stay
  fixed. group_size > 1 shuffles whole groups (the shared-prompt policy step's; grpo.shuffled_rows).
  Returns (policy_state, critic_state, policy metrics, critic metrics)."""
  n = rollout.completion_mask.shape[0]
  policy_metrics, critic_metrics = [], []
  # Each update is waited for before the next is dispatched: the policy's and the critic's steps share no data, so
  # XLA:CPU may run them at once, and with every pool thread of one device blocked in an all-reduce whose other
  # device has no thread left, the run aborts after the rendezvous timeout (seen with cpu_devices=2 under load).
  for epoch in range(num_epochs):
    order = grpo.shuffled_rows(jax.random.fold_in(rng, epoch), n, group_size)
    for idx in np.split(order, num_minibatches):
      if policy_step is not None:
        policy_state, metrics = policy_step(policy_state, Rollout(*(np.asarray(x)[idx] for x in rollout)), {})
        policy_metrics.append(jax.block_until_ready(metrics))
      critic_state, metrics = critic_step(critic_state, critic_lib.ValueBatch(*(np.asarray(x)[idx] for x in values)),
                                          {})
      critic_metrics.append(jax.block_until_ready(metrics))
  return (policy_state, critic_state, combine_metrics(policy_metrics) if policy_metrics else {},
          combine_metrics(critic_metrics))


def _masked_stats(x: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  valid = x[mask.astype(bool)]
  return (float(valid.mean()), float(valid.std())) if valid.size else (0.0, 0.0)


def step_work(model_cfg: ModelConfig, prompt_mask: np.ndarray, completion_mask: np.ndarray, *, group_size: int,
              num_epochs: int, train_policy: bool, shared_prompt: bool = False) -> dict[str, float]:
  """The logged work of one PPO step (models/flops.py's convention): GRPO's phases (sampling, the reference forward,
  the policy's mu forward + backward passes, none in the critic's warm-up) plus the critic's value forward and its mu
  forward + backward passes, on a model whose LM head is the scalar value head. prompt_mask [N, p],
  completion_mask [N, c]."""
  rows, prompt_len = prompt_mask.shape
  shape = dict(num_prompts=rows // group_size, group_size=group_size, prompt_len=prompt_len,
               completion_len=completion_mask.shape[1])
  phases = flops.grpo_step_flops(model_cfg, **shape, decode_len=int(completion_mask.sum(-1).max()), reference=True,
                                 num_epochs=num_epochs, shared_prompt=shared_prompt)
  value_model = dataclasses.replace(model_cfg, vocab_size=1)
  full = flops.forward_flops(value_model, batch=rows, new_tokens=prompt_len + completion_mask.shape[1])
  total = phases['total'] - (0.0 if train_policy else phases['policy_forward_backward']) + (1 + 3 * num_epochs) * full
  return {'model_flops': total, 'step_tokens': float(prompt_mask.sum() + completion_mask.sum())}


def make_stage(setup: Setup, params, *, reference=None) -> Stage:
  """PPO for rl.num_steps steps from `params` (the SFT policy), the critic's backbone copied from them; the first
  ppo.critic_warmup_steps steps update the critic only. `reference`: the frozen reference's params (default
  `params`)."""
  cfg, rl, pc = setup.cfg, setup.cfg.rl, setup.cfg.ppo
  train = setup.splits['train']
  policy = setup.policy()  # PPO trains every weight (config_checks refuses LoRA on the RL stage)
  param_dtype = setup.model_cfg.param_dtype
  mesh, rules = setup.mesh, setup.rules

  critic_graphdef, critic_abstract = critic_lib.abstract_params(setup.model_cfg)
  critic_shardings = sharding.tree_shardings(critic_abstract, mesh, rules)
  critic_tx = make_optimizer(pc, rl.num_steps, param_dtype=param_dtype)
  # The copy comes first: the policy's buffers are donated by its train step.
  critic_state = init_state(critic_lib.params_from_policy(setup.model_cfg, params, critic_shardings), critic_tx,
                            mesh, rules)
  tx = make_optimizer(rl, rl.num_steps, param_dtype=param_dtype)
  lr_at, critic_lr_at = learning_rate(rl, rl.num_steps), learning_rate(pc, rl.num_steps)
  reference = jax.tree.map(jnp.copy, params if reference is None else reference)  # frozen
  state = init_state(params, tx, mesh, rules)

  config = loss_config(cfg)
  policy_step = make_train_step(policy.graphdef, tx, functools.partial(grpo_objective, config=config),
                                state_shardings(state, mesh, rules), setup.batch_sharding, mesh, rules,
                                grad_accum_steps=rl.grad_accum_steps, micro_weight=grpo_micro_weight(config),
                                group_size=config.shared_prompt_group)
  policy_step = distributed.host_io(policy_step, setup.batch_sharding, batch_argnums=(1,), gather=False)
  critic_step = make_train_step(critic_graphdef, critic_tx, critic_lib.value_loss_fn(pc.value_clip),
                                state_shardings(critic_state, mesh, rules), setup.batch_sharding, mesh, rules,
                                grad_accum_steps=rl.grad_accum_steps)
  critic_step = distributed.host_io(critic_step, setup.batch_sharding, batch_argnums=(1,), gather=False)
  value_fn = critic_lib.make_value_fn(critic_graphdef, param_shardings=critic_shardings, mesh=mesh, rules=rules)
  value_fn = distributed.host_io(value_fn, setup.batch_sharding, batch_argnums=(1, 2, 3, 4))
  advantages_fn = jax.jit(functools.partial(ppo_advantages, beta=rl.beta, gamma=pc.gamma, lam=pc.lam,
                                            whiten_advantages=pc.whiten_advantages))
  rng = jax.random.fold_in(setup.rng, 1)  # GRPO's: the same prompts and, from the same policy, the same samples

  def step(state, i):
    policy_state, critic_state = state['policy'], state['critic']
    sample_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, i))
    prompts = train.take(batch_indices(len(train), rl.num_prompts, i, seed=cfg.seed, stream='grpo'))
    rollout, stats = collect_rollout(
        policy.sampler, setup.reference_forward, policy_state.params, state['reference'], prompts, sample_rng,
        group_size=rl.group_size, tokenizer=setup.tokenizer, reward_fn=setup.reward_fn, advantage_fn=raw_rewards,
        verifier=setup.verifier, reward_source=rl.reward_source, reward_mix=rl.reward_mix,
        length_buckets=grpo.length_buckets(cfg))
    mask = np.asarray(rollout.completion_mask)
    jax.block_until_ready(rollout.ref_logprobs)  # the reference forward, before the critic's (see update)
    old_values = np.asarray(value_fn(critic_state.params, *rollout[:4]), np.float32)  # [N, c]
    advantages, returns, raw = (np.asarray(x) for x in advantages_fn(
        np.asarray(rollout.advantages), rollout.old_logprobs, rollout.ref_logprobs, old_values, mask))
    rollout = rollout._replace(advantages=advantages)  # [N, c] per token
    values = critic_lib.ValueBatch(*rollout[:4], np.where(mask > 0, old_values, 0.0), returns)
    warming_up = i < pc.critic_warmup_steps
    policy_state, critic_state, policy_metrics, critic_metrics = update(
        None if warming_up else policy_step, critic_step, policy_state, critic_state, rollout, values, shuffle_rng,
        num_epochs=rl.num_epochs, num_minibatches=rl.num_minibatches, group_size=config.shared_prompt_group)
    work = step_work(setup.model_cfg, np.asarray(rollout.prompt_mask), mask, group_size=rl.group_size,
                     num_epochs=rl.num_epochs, train_policy=not warming_up,
                     shared_prompt=config.shared_prompt_group > 1)
    advantage_mean, advantage_std = _masked_stats(raw, mask)
    nonfinite = critic_metrics['nonfinite']
    if policy_metrics:
      nonfinite = jnp.maximum(nonfinite, policy_metrics['nonfinite'])
    logged = {
        'value_loss': critic_metrics['value_loss'], 'value_clip_frac': critic_metrics['value_clip_frac'],
        'critic_grad_norm': critic_metrics['grad_norm'], 'critic_nonfinite': critic_metrics['nonfinite'],
        'explained_variance': float(explained_variance(old_values, returns, mask)),
        'value_mean': _masked_stats(old_values, mask)[0], 'return_mean': _masked_stats(returns, mask)[0],
        'advantage_mean': advantage_mean, 'advantage_std': advantage_std, 'policy_frozen': float(warming_up),
        'lr': lr_at(policy_state.step), 'critic_lr': critic_lr_at(critic_state.step), 'beta': rl.beta,
        'iteration': 1}
    return ({**state, 'policy': policy_state, 'critic': critic_state},
            {**stats, **policy_metrics, **logged, **work, 'nonfinite': nonfinite})

  def finish(state):
    held_out = setup.evaluate(state['policy'].params, 'test', policy, keep_scores=True)
    return {'test_accuracy': held_out['accuracy'], 'test_reward': held_out['reward'], 'sample': held_out['sample'],
            'test_scores': held_out['scores'], 'iteration': 1}

  meta: dict[str, Any] = {**setup.checkpoint_meta(policy), 'iteration': 1, 'data_offset': 0, 'algorithm': NAME}
  return Stage(NAME, rl.num_steps, {'policy': state, 'reference': reference, 'critic': critic_state}, step, finish,
               meta=meta)
