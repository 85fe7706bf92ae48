"""A learned reward model: the decoder's final hidden state at each sequence's last real token, times a
vector, plus a bias. It is trained on comparisons (chosen vs rejected) with the pairwise Bradley-Terry loss.

DeepSeekMath's iterative RL retrains a reward model on new comparisons each iteration (pipeline/reward_model.py).
Read at each reasoning step's last token instead and trained on step labels (`step_label_loss`), the same model is
a process reward model (Sec. 4.1.3). Laid out by the same logical-axis rules as the policy.
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
    last = jnp.max(jnp.where(mask.astype(bool), jnp.arange(tokens.shape[1]), 0), axis=1)  # [b]
    return self.scores_at(tokens, mask, last[:, None])[:, 0]

  def scores_at(self, tokens: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
    """tokens [b, t], mask [b, t], positions [b, s] (indices into t) -> scores [b, s] float32, read at each
    position: at each reasoning step's last token, a process reward model's step scores."""
    hidden = self.backbone.final_norm(self.backbone.hidden_states(tokens, mask=mask.astype(bool)))  # [b, t, d]
    at = jnp.take_along_axis(hidden, positions[:, :, None], axis=1).astype(jnp.float32)  # [b, s, d]
    return at @ self.head[...] + self.bias[...]


def pairwise_loss(model: RewardModel, batch: Comparisons, hparams: dict[str, jax.Array] | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry: mean over pairs of -log sigmoid(r_chosen - r_rejected); also the pairwise accuracy.
  hparams: unused (the train step's loss signature)."""
  del hparams
  margin = model(batch.chosen_tokens, batch.chosen_mask) - model(batch.rejected_tokens, batch.rejected_mask)
  return jnp.mean(jax.nn.softplus(-margin)), {'accuracy': jnp.mean(margin > 0), 'margin': jnp.mean(margin)}


class StepLabels(NamedTuple):
  """Outputs with a label per reasoning step: tokens, mask [n, t] (question ++ completion); step_positions [n, s]
  (each step's last token, an index into t), step_mask [n, s] (1 = a real step), labels [n, s] in [0, 1]."""
  tokens: jax.Array
  mask: jax.Array
  step_positions: jax.Array
  step_mask: jax.Array
  labels: jax.Array


def step_label_loss(model: RewardModel, batch: StepLabels, hparams: dict[str, jax.Array] | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A process reward model's loss: binary cross-entropy of sigmoid(score at each step's end) against the step's
  label, averaged over the real steps; also the accuracy of (score > 0) against (label > 0.5)."""
  del hparams
  logits = model.scores_at(batch.tokens, batch.mask, batch.step_positions)  # [n, s]
  labels, real = batch.labels.astype(jnp.float32), batch.step_mask.astype(jnp.float32)
  per_step = jax.nn.softplus(logits) - labels * logits  # -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
  count = jnp.maximum(real.sum(), 1.0)
  right = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
  return (per_step * real).sum() / count, {'accuracy': (right * real).sum() / count}


def make_step_score_fn(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                       rules: sharding.Rules = sharding.DEFAULT_RULES):
  """jit-compiled step_scores(params, tokens [b, t], mask [b, t], positions [b, s]) -> [b, s], laid out as
  make_score_fn's."""
  def step_scores(params, tokens, mask, positions):
    return nnx.merge(graphdef, params).scores_at(tokens, mask, positions)

  in_shardings = None if param_shardings is None else (param_shardings, 'batch', 'batch', 'batch')
  return sharding.jit_sharded(step_scores, mesh, rules, in_shardings, where='make_step_score_fn')


def make_score_fn(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                  rules: sharding.Rules = sharding.DEFAULT_RULES):
  """jit-compiled score(params, tokens [b, t], mask [b, t]) -> [b]: params keep their layout (`param_shardings`
  on `mesh`), rows shard over the batch axes and activations follow `rules`, as in the policy's forward."""
  def score(params, tokens, mask):
    return nnx.merge(graphdef, params)(tokens, mask)

  in_shardings = None if param_shardings is None else (param_shardings, 'batch', 'batch')
  return sharding.jit_sharded(score, mesh, rules, in_shardings, where='make_score_fn')
