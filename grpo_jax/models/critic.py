"""The PPO baseline's critic: a value model on its own backbone, initialized from the SFT policy's weights.

It is the reward model's network (models/reward_model.py: the decoder, a final norm and a scalar head, zero at
init) read at every completion position rather than at the last token: the value of the state before completion
token t is read where the policy's hidden state predicts token t (slot p - 1 + t of question ++ completion).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.core.value import value_loss
from grpo_jax.models.reward_model import RewardModel
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.parallel import sharding


class ValueBatch(NamedTuple):
  """The critic's regression batch; leading axis N as the rollout's."""
  prompt_tokens: jax.Array  # [N, p] left-padded
  prompt_mask: jax.Array  # [N, p]
  completion_tokens: jax.Array  # [N, c] right-padded
  completion_mask: jax.Array  # [N, c]
  old_values: jax.Array  # [N, c] the critic's values at rollout time
  returns: jax.Array  # [N, c] GAE's returns (targets)


class Critic(RewardModel):
  """RewardModel's parameters (backbone, head, bias) with a per-position value read-out."""

  def values(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, completion_tokens: jax.Array,
             completion_mask: jax.Array) -> jax.Array:
    """V(s_t) for every completion token t: [N, p], [N, p], [N, c], [N, c] -> [N, c] float32 (padding: garbage,
    masked by every consumer)."""
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    p, c = prompt_tokens.shape[1], completion_tokens.shape[1]
    # As core/logprobs.sequence_logprobs: the hidden state at slot j predicts the token at slot j + 1.
    positions = jnp.broadcast_to(p - 1 + jnp.arange(c), completion_tokens.shape)
    return self.scores_at(tokens, mask, positions)


def abstract_params(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The critic's graph and its params as shape/dtype structs (nothing allocated)."""
  return nnx.split(nnx.eval_shape(lambda: Critic(model_cfg, nnx.Rngs(0))), nnx.Param)


def params_from_policy(model_cfg: ModelConfig, policy_params: nnx.State, shardings=None) -> nnx.State:
  """Critic params: the backbone copied from the policy's transformer params (its LM head dropped), a zero head
  and bias (every value 0 until trained). Copies: the policy's buffers are donated to its train step."""
  backbone = dict(nnx.to_flat_state(policy_params))
  flat = []
  for key, var in nnx.to_flat_state(abstract_params(model_cfg)[1]):
    if key[0] == 'backbone':
      flat.append((key, var.replace(jnp.copy(backbone[key[1:]][...]))))
    else:
      flat.append((key, var.replace(jnp.zeros(var.shape, var.dtype))))
  params = nnx.from_flat_state(flat)
  return params if shardings is None else jax.device_put(params, shardings)


def value_objective(model: Critic, batch: ValueBatch, hparams: dict[str, jax.Array] | None = None, *,
                    clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped value loss (core/value.value_loss) of `model` on a batch; hparams unused (the train step's
  signature)."""
  del hparams
  values = model.values(batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens, batch.completion_mask)
  return value_loss(values, batch.old_values, batch.returns, batch.completion_mask, clip_eps=clip_eps)


def value_loss_fn(clip_eps: float):
  """value_objective with its clip fixed: a loss_fn for pipeline/train_state.make_train_step."""
  return functools.partial(value_objective, clip_eps=clip_eps)


def make_value_fn(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                  rules: sharding.Rules = sharding.DEFAULT_RULES):
  """jit-compiled values(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [N, c], laid out
  as the reward model's scorer (params in their layout, rows over the batch axes)."""
  def values(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    return nnx.merge(graphdef, params).values(prompt_tokens, prompt_mask, completion_tokens, completion_mask)

  in_shardings = None if param_shardings is None else (param_shardings, 'batch', 'batch', 'batch', 'batch')
  return sharding.jit_sharded(values, mesh, rules, in_shardings, where='make_value_fn')
