"""The GRPO stage: each step samples G outputs per prompt from pi_old, scores them, turns rewards into group
advantages, then runs mu epochs x minibatches of clipped updates with pi_old fixed (DeepSeekMath Alg. 1, inner
loop). The math is in core/ (advantages, losses, kl, logprobs); experience collection in rollout/.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.core.advantages import get_advantage_fn
from grpo_jax.core.kl import adaptive_kl_beta
from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.data.batches import batch_indices
from grpo_jax.models import flops, lora
from grpo_jax.parallel import distributed
from grpo_jax.pipeline.loop import Stage
from grpo_jax.pipeline.setup import Policy, Setup
from grpo_jax.pipeline.train_state import TrainState, init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rollout.rollout import Rollout, collect_rollout

NAME = 'grpo'  # setup.STAGES[1]


def loss_config(cfg) -> LossConfig:
  """The GRPO loss's static choices, from config.rl (and the forward's memory knobs from config.model)."""
  return LossConfig(clip_eps=cfg.rl.clip_eps, kl_estimator=cfg.rl.kl_estimator, kl_penalty=cfg.rl.beta > 0,
                    logprob_chunk=cfg.model.logprob_chunk, remat=cfg.model.remat)


def loss_hparams(cfg) -> dict[str, jax.Array]:
  """The loss's values that may change between steps, at their start values, as arrays (a new value is not a
  new compile): beta, which the KL controller moves when config.rl.kl_target > 0."""
  return {'beta': jnp.asarray(cfg.rl.beta, jnp.float32)}


def make_grpo_train_step(setup: Setup, policy: Policy, state: TrainState, tx):
  """The jitted, donated GRPO update on one minibatch: train_step(state, Rollout, hparams) -> (state, metrics)."""
  cfg = setup.cfg
  return make_train_step(policy.graphdef, tx, functools.partial(grpo_objective, config=loss_config(cfg)),
                         state_shardings(state, setup.mesh, setup.rules), setup.batch_sharding, setup.mesh,
                         setup.rules, grad_accum_steps=cfg.rl.grad_accum_steps,
                         trainable=None if policy.lora is None else lora.TRAINABLE)


def update(train_step: Callable, state: TrainState, rollout: Rollout, rng: jax.Array, hparams: dict, *,
           num_epochs: int, num_minibatches: int) -> tuple[TrainState, dict]:
  """mu epochs over the rollout, each a fresh shuffle split into minibatches; pi_old stays fixed."""
  n = rollout.advantages.shape[0]
  all_metrics = []
  for epoch in range(num_epochs):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n))
    for idx in np.split(order, num_minibatches):
      state, metrics = train_step(state, Rollout(*(np.asarray(x)[idx] for x in rollout)), hparams)
      all_metrics.append(metrics)
  mean = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *all_metrics)
  return state, mean


def make_stage(setup: Setup, params, *, name: str = NAME) -> Stage:
  """GRPO from `params`, which are also the frozen reference (config.rl). State: {'policy': TrainState,
  'reference': params, 'kl_controller': {'beta'}}; with LoRA no 'reference', the reference being the policy's
  own frozen base."""
  cfg, rl, train = setup.cfg, setup.cfg.rl, setup.splits['train']
  policy = setup.policy(name)
  tx = make_optimizer(rl, rl.num_steps, param_dtype=setup.model_cfg.param_dtype)
  roles = {'kl_controller': loss_hparams(cfg)}  # saved with the checkpoints: a resumed run continues its beta
  if policy.lora is None:
    roles['reference'] = jax.tree.map(jnp.copy, params)  # frozen: the policy's params are donated each step
  else:  # the reference is the frozen base inside the policy's params: no copy
    params = setup.with_adapters(name, params, policy, jax.random.fold_in(setup.rng, 1001))
  state = init_state(params, tx, setup.mesh, setup.rules, trainable=None if policy.lora is None else lora.TRAINABLE)
  train_step = make_grpo_train_step(setup, policy, state, tx)
  train_step = distributed.host_io(train_step, setup.batch_sharding, batch_argnums=(1,), gather=False)
  advantage_fn = get_advantage_fn(rl.advantage)
  rng = jax.random.fold_in(setup.rng, 1)

  def step(state, i):
    policy_state = state['policy']
    reference = state['reference'] if policy.lora is None else lora.base_params(policy_state.params)
    sample_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, i))
    prompts = train.take(batch_indices(len(train), rl.num_prompts, i, seed=cfg.seed, stream='grpo'))
    rollout, stats = collect_rollout(policy.sampler, setup.reference_forward, policy_state.params, reference,
                                     prompts, sample_rng, group_size=rl.group_size, tokenizer=setup.tokenizer,
                                     reward_fn=setup.reward_fn, advantage_fn=advantage_fn, verifier=setup.verifier)
    beta = state['kl_controller']['beta']
    policy_state, metrics = update(train_step, policy_state, rollout, shuffle_rng, {'beta': beta},
                                   num_epochs=rl.num_epochs, num_minibatches=rl.num_minibatches)
    if rl.kl_target > 0:  # measure, then adjust: the step's KL to the reference moves beta for the next step
      beta = adaptive_kl_beta(beta, metrics['kl'], target=rl.kl_target, horizon=rl.kl_horizon,
                              batch_size=rl.num_prompts * rl.group_size)
    work = flops.grpo_step_work(setup.model_cfg, rollout.prompt_mask, rollout.completion_mask,
                                group_size=rl.group_size, reference=setup.reference_forward is not None,
                                num_epochs=rl.num_epochs)
    return ({**state, 'policy': policy_state, 'kl_controller': {'beta': beta}},
            {**stats, **metrics, **work, 'beta': beta})

  def finish(state):
    held_out = setup.evaluate(state['policy'].params, 'test', policy)
    return {'test_accuracy': held_out['accuracy'], 'test_reward': held_out['reward'], 'sample': held_out['sample']}

  return Stage(name, rl.num_steps, {'policy': state, **roles}, step, finish, meta=setup.checkpoint_meta(policy))
