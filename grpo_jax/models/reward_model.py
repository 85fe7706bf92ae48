"""A learned reward model: the decoder's final hidden state at each sequence's last real token, times a
vector, plus a bias. It is trained on comparisons (chosen vs rejected) with the pairwise Bradley-Terry loss.

DeepSeekMath's iterative RL retrains a reward model on new comparisons each iteration. Here the trainer's
rewards still come from rule verifiers (grpo_jax/rewards/verifiers.py): this module holds the model, its loss and a
sharded scoring function, laid out by the same logical-axis rules as the policy, but nothing calls it yet.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.parallel import sharding


class Comparisons(NamedTuple):
  """Pairs of sequences, the first of each pair preferred: tokens [n, t] int32 and masks [n, t] (1 = real;
  padding on either side)."""
  chosen_tokens: jax.Array
  chosen_mask: jax.Array
  rejected_tokens: jax.Array
  rejected_mask: jax.Array


class RewardModel(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    # Tied: the backbone's LM head is never used, and tying means it holds no weights of its own.
    self.backbone = Transformer(dataclasses.replace(cfg, tie_embeddings=True), rngs)
    self.head = nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32), logical_axes=('embed',))
    self.bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """tokens [b, t], mask [b, t] -> scores [b] float32, read at each row's last real token."""
    mask = mask.astype(bool)
    hidden = self.backbone.final_norm(self.backbone.hidden_states(tokens, mask=mask))  # [b, t, d]
    last = jnp.max(jnp.where(mask, jnp.arange(tokens.shape[1]), 0), axis=1)  # [b]
    at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [b, d]
    return at_last @ self.head[...] + self.bias[...]


def pairwise_loss(model: RewardModel, batch: Comparisons, hparams: dict[str, jax.Array] | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry: mean over pairs of -log sigmoid(r_chosen - r_rejected); also the pairwise accuracy.
  hparams: unused (the train step's loss signature)."""
  del hparams
  margin = model(batch.chosen_tokens, batch.chosen_mask) - model(batch.rejected_tokens, batch.rejected_mask)
  return jnp.mean(jax.nn.softplus(-margin)), {'accuracy': jnp.mean(margin > 0), 'margin': jnp.mean(margin)}


def make_score_fn(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                  rules: sharding.Rules = sharding.DEFAULT_RULES):
  """jit-compiled score(params, tokens [b, t], mask [b, t]) -> [b]: params keep their layout (`param_shardings`
  on `mesh`), rows shard over the batch axes and activations follow `rules`, as in the policy's forward."""
  def score(params, tokens, mask):
    return nnx.merge(graphdef, params)(tokens, mask)

  in_shardings = None if param_shardings is None else (param_shardings, 'batch', 'batch')
  return sharding.jit_sharded(score, mesh, rules, in_shardings, where='make_score_fn')
