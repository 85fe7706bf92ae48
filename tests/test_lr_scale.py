"""hparams['lr_scale'] in the train step: the learning rate times a step input, for a KL controller that moves the lr
(config.rl.kl_adapt='lr'). A step with it equals a step of an optimizer built with that lr, and a new value is not
a new compile."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from conftest import count_compiles
from helpers import MESH, grpo_batch, host_params
from ml_collections import ConfigDict

from grpo_jax.core.losses import LossConfig, grpo_objective
from grpo_jax.parallel import sharding
from grpo_jax.pipeline.train_state import MasterState, init_state, make_optimizer, make_train_step, state_shardings

# Weight decay nonzero: the decoupled decay term must scale with the lr too.
OPT = dict(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.1, grad_clip=1.0, master_dtype='float32')
BETA = np.float32(0.04)


def _step(graphdef, params, lr, param_dtype, seen_keys=None):
  """(jitted train step, its fresh state) for AdamW at a constant `lr`, on the GRPO loss with a KL term."""
  grpo = functools.partial(grpo_objective, config=LossConfig(kl_penalty=True))

  def loss_fn(model, batch, hparams):
    if seen_keys is not None:
      seen_keys.append(sorted(hparams))  # at trace time: what the loss was handed
    return grpo(model, batch, hparams)

  tx = make_optimizer(ConfigDict(dict(OPT, lr=lr)), 10, param_dtype=param_dtype)
  state = init_state(params, tx, MESH)
  step = make_train_step(graphdef, tx, loss_fn, state_shardings(state, MESH), sharding.batch_sharding(MESH), MESH)
  return step, state


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])  # bfloat16: through the float32 master copy
def test_half_lr_scale_steps_like_an_optimizer_with_half_the_lr(param_dtype):
  graphdef, params = host_params(param_dtype=param_dtype, dtype=param_dtype)
  batch = grpo_batch(4, 5, 6)
  seen = []
  scaled_step, scaled_state = _step(graphdef, params, OPT['lr'], param_dtype, seen)
  half_step, half_state = _step(graphdef, params, OPT['lr'] / 2, param_dtype)
  assert isinstance(scaled_state.opt_state, MasterState) == (param_dtype == 'bfloat16')
  before = jax.tree.map(np.asarray, params)

  scaled, scaled_metrics = scaled_step(scaled_state, batch, {'beta': BETA, 'lr_scale': np.float32(0.5)})
  half, half_metrics = half_step(half_state, batch, {'beta': BETA})
  assert seen == [['beta', 'lr_scale']]  # the loss gets hparams as given, and the GRPO loss ignores the extra key
  np.testing.assert_array_equal(scaled_metrics['loss'], half_metrics['loss'])
  assert int(scaled.step) == int(half.step) == 1
  # A multiplication by 0.5 is exact in floating point, so the two steps agree bit for bit: params, Adam moments
  # and (bfloat16) the master copy.
  for x, y in zip(jax.tree.leaves((scaled.params, scaled.opt_state)), jax.tree.leaves((half.params, half.opt_state)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moved = [not np.array_equal(np.asarray(x), b) for x, b in zip(jax.tree.leaves(scaled.params), jax.tree.leaves(before),
                                                                  strict=True)]
  assert all(moved)  # every weight moved (grad or weight decay): the equality is not that of two no-ops


def test_two_lr_scales_one_compile():
  graphdef, params = host_params()
  batch = grpo_batch(4, 5, 6)
  step, state = _step(graphdef, params, OPT['lr'], 'float32')
  copy = lambda: jax.tree.map(lambda x: x.copy(), state)  # noqa: E731  (the step donates its state)
  (full, _), first = count_compiles(lambda: step(copy(), batch, {'beta': BETA, 'lr_scale': np.float32(1.0)}))
  (frozen, _), second = count_compiles(lambda: step(copy(), batch, {'beta': BETA, 'lr_scale': np.float32(0.0)}))
  assert first > 0 and second == 0, (first, second)
  # The value is used, not baked in: scale 0 leaves every param (weight decay included) as it was, 1 moves them.
  for x, y, p in zip(jax.tree.leaves(frozen.params), jax.tree.leaves(full.params), jax.tree.leaves(params),
                     strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(p))
    assert not np.array_equal(np.asarray(y), np.asarray(p))
  assert int(frozen.step) == 1  # a finite step with a zero lr still counts
