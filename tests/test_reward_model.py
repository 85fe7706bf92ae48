"""grpo_jax.models.reward_model: scores read at the last real token, the Bradley-Terry loss against numpy, and a few
training steps that learn a preference."""
import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from grpo_jax.models.reward_model import Comparisons, RewardModel, make_score_fn, pairwise_loss
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.parallel import sharding
from grpo_jax.pipeline.train_state import init_state, make_optimizer, make_train_step, state_shardings

CFG = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def _model(seed: int = 0) -> RewardModel:
  model = RewardModel(CFG, nnx.Rngs(seed))
  model.head[...] = jax.random.normal(jax.random.key(seed + 1), (CFG.d_model,))  # zero at init: make it score
  return model


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
  model = _model()
  graphdef, params = nnx.split(model, nnx.Param)
  score = make_score_fn(graphdef)
  seq = np.array([[3, 7, 2, 9, 4]], np.int32)
  base = score(params, seq, np.ones_like(seq))
  left = np.concatenate([np.zeros((1, 3), np.int32), seq], 1)  # three pad slots in front
  right = np.concatenate([seq, np.full((1, 2), 11, np.int32)], 1)  # two masked tokens after
  np.testing.assert_allclose(score(params, left, (np.arange(8) >= 3)[None].astype(np.int32)), base, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(score(params, right, (np.arange(7) < 5)[None].astype(np.int32)), base, rtol=1e-5,
                             atol=1e-5)
  # ... and it depends on that token: a different last token gives a different score.
  other = seq.copy()
  other[0, -1] = 5
  assert abs(float(score(params, other, np.ones_like(other))[0] - base[0])) > 1e-4


def test_pairwise_loss_matches_numpy():
  model = _model()
  rng = np.random.default_rng(0)
  batch = Comparisons(*(rng.integers(1, 16, (6, 5)).astype(np.int32), np.ones((6, 5), np.int32)) * 2)
  loss, metrics = pairwise_loss(model, batch)
  margin = np.asarray(model(batch.chosen_tokens, batch.chosen_mask) - model(batch.rejected_tokens,
                                                                               batch.rejected_mask))
  np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margin))), rtol=1e-6)
  assert float(metrics['accuracy']) == pytest.approx(np.mean(margin > 0))


def test_training_learns_a_preference():
  """Chosen sequences end in token 5, rejected ones in token 6; held-out pairs are ranked right afterwards."""
  rng = np.random.default_rng(0)

  def pairs(n):
    prefix = rng.integers(1, 16, (n, 5)).astype(np.int32)
    chosen, rejected = prefix.copy(), prefix.copy()
    chosen[:, -1], rejected[:, -1] = 5, 6
    mask = np.ones((n, 5), np.int32)
    return Comparisons(chosen, mask, rejected, mask)

  graphdef, params = nnx.split(RewardModel(CFG, nnx.Rngs(0)), nnx.Param)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  tx = make_optimizer(ConfigDict(dict(lr=3e-3, warmup_steps=0, schedule='constant', weight_decay=0.0,
                                      grad_clip=1.0, master_dtype='float32')), 40)
  state = init_state(params, tx, mesh)
  step = make_train_step(graphdef, tx, pairwise_loss, state_shardings(state, mesh), sharding.batch_sharding(mesh),
                         mesh)
  held_out = pairs(32)
  _, before = pairwise_loss(nnx.merge(graphdef, state.params), held_out)
  for _ in range(40):
    state, metrics = step(state, pairs(16), {})
  _, after = pairwise_loss(nnx.merge(graphdef, state.params), held_out)
  assert float(before['accuracy']) == 0.0  # the head starts at zero: every margin is 0
  assert float(after['accuracy']) == 1.0 and float(after['margin']) > 1.0


def test_score_fn_with_shardings_needs_the_mesh():
  graphdef, params = nnx.split(_model(), nnx.Param)
  shardings = sharding.tree_shardings(params, sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}))
  with pytest.raises(ValueError, match='needs the mesh'):
    make_score_fn(graphdef, param_shardings=shardings)




def test_step_label_loss_is_the_masked_binary_cross_entropy_at_each_step_end():
  from grpo_jax.models.reward_model import StepLabels, step_label_loss
  model = _model(3)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 16, (3, 7)).astype(np.int32)
  mask = np.ones((3, 7), np.int32)
  mask[2, :2] = 0  # left padding
  positions = np.array([[2, 6, 0], [3, 5, 6], [4, 6, 0]], np.int32)
  step_mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]], np.int32)
  labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], np.float32)
  loss, metrics = step_label_loss(model, StepLabels(tokens, mask, positions, step_mask, labels))
  scores = np.asarray(model.scores_at(tokens, mask, positions))  # [3, 3]
  # The same scores as __call__ on each row cut after that position.
  for i in range(3):
    for j in range(3):
      if step_mask[i, j]:
        cut = positions[i, j] + 1
        np.testing.assert_allclose(scores[i, j], np.asarray(model(tokens[i:i + 1, :cut], mask[i:i + 1, :cut]))[0],
                                   rtol=1e-4, atol=1e-5)
  p = 1 / (1 + np.exp(-scores))
  bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  np.testing.assert_allclose(float(loss), (bce * step_mask).sum() / step_mask.sum(), rtol=1e-5)
  right = ((scores > 0) == (labels > 0.5)) * step_mask
  np.testing.assert_allclose(float(metrics['accuracy']), right.sum() / step_mask.sum(), rtol=1e-6)
