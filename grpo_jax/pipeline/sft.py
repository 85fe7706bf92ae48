"""The SFT stage: supervised warm-start on worked solutions, stopped early on validation accuracy.

The loss is core.losses.sft_loss; this module builds the stage the loop runs (`make_stage`).
"""
from __future__ import annotations

import functools

import jax

from grpo_jax.core.losses import completion_token_count, sft_loss
from grpo_jax.data.batches import SFTBatch, batch_indices
from grpo_jax.models import lora
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.loop import Stage
from grpo_jax.pipeline.setup import Setup
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings

NAME = stages.SFT.name


def make_stage(setup: Setup, params, *, name: str = NAME) -> Stage:
  """SFT from `params` on the train split's solutions, config.sft: batch, steps, validation every eval_every
  steps, stop once validation accuracy reaches target_accuracy. State: {'policy': TrainState}."""
  cfg, train = setup.cfg, setup.splits['train']
  policy = setup.policy(name)
  tx = make_optimizer(cfg.sft, cfg.sft.max_steps, param_dtype=setup.model_cfg.param_dtype)
  trainable = None
  if policy.lora is not None:  # the state holds the frozen base once plus the adapters; optimizer state for those
    params, trainable = setup.with_adapters(name, params, policy, jax.random.fold_in(setup.rng, 1000)), lora.TRAINABLE
  state = init_state(params, tx, setup.mesh, setup.rules, trainable=trainable)
  loss_fn = functools.partial(sft_loss, logprob_chunk=cfg.model.logprob_chunk, remat=cfg.model.remat)
  train_step = make_train_step(policy.graphdef, tx, loss_fn, state_shardings(state, setup.mesh, setup.rules),
                               setup.batch_sharding, setup.mesh, setup.rules, grad_accum_steps=cfg.sft.grad_accum_steps,
                               micro_weight=completion_token_count,  # sft_loss is a token mean
                               trainable=trainable)
  train_step = distributed.host_io(train_step, setup.batch_sharding, batch_argnums=(1,), gather=False)

  def step(state, i):
    b = train.take(batch_indices(len(train), cfg.sft.batch_size, i, seed=cfg.seed, stream='sft'))
    policy_state, metrics = train_step(state['policy'], SFTBatch(b.prompt_tokens, b.prompt_mask,
                                                                 b.completion_tokens, b.completion_mask), {})
    if (i + 1) % cfg.sft.eval_every == 0:
      metrics = dict(metrics, val_accuracy=setup.evaluate(policy_state.params, 'val', policy)['accuracy'])
    return {'policy': policy_state}, metrics

  def finish(state):
    held_out = setup.evaluate(state['policy'].params, 'test', policy, keep_scores=True)
    return {'test_accuracy': held_out['accuracy'], 'test_reward': held_out['reward'], 'sample': held_out['sample'],
            'test_scores': held_out['scores']}

  def should_stop(metrics):
    return 'val_accuracy' in metrics and metrics['val_accuracy'] >= cfg.sft.target_accuracy

  return Stage(name, cfg.sft.max_steps, {'policy': state}, step, finish, should_stop, setup.checkpoint_meta(policy))

