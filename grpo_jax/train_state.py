"""Training state as one pytree and the generic jitted, donated, sharded update step."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import sharding


class TrainState(NamedTuple):
  step: jax.Array  # scalar int32
  params: nnx.State  # policy parameters
  opt_state: optax.OptState


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay (or constant) and global-norm gradient clipping."""
  if opt_cfg.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps,
                                            max(total_steps, opt_cfg.warmup_steps + 1), end_value=0.1 * opt_cfg.lr)
  elif opt_cfg.schedule == 'constant':
    lr = optax.warmup_constant_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps) if opt_cfg.warmup_steps else opt_cfg.lr
  else:
    raise ValueError(f"unknown schedule {opt_cfg.schedule!r}; known: 'cosine', 'constant'")
  return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip),
                     optax.adamw(lr, weight_decay=opt_cfg.weight_decay))


def init_state(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """Place params and a fresh optimizer state on the mesh. Init runs outside jit: a jitted tx.init
  returned unsharded state that the compiled step then rejected (ENV_FACTS)."""
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return jax.device_put(state, state_shardings(state, mesh))


def state_shardings(state: TrainState, mesh: Mesh):
  return sharding.tree_shardings(state, mesh)


LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    state_sharding, batch_sharding, mesh: Mesh):
  """jit(train_step(state, batch) -> (state, metrics)) with donated state and pinned shardings."""

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    def loss_of(params):
      return loss_fn(nnx.merge(graphdef, params), batch)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
