"""Training state as one pytree and the generic jitted, donated, sharded update step."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.parallel import sharding


class TrainState(NamedTuple):
  step: jax.Array  # scalar int32
  params: nnx.State  # policy parameters
  opt_state: optax.OptState


def make_optimizer(opt_cfg, total_steps: int, *, param_dtype='float32') -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay (or constant) and global-norm gradient clipping.

  Params stored narrower than opt_cfg.master_dtype (default float32; '' = off) are trained through a master
  copy of that dtype kept in the optimizer state (`with_master_weights`), so moments, clipping and the
  update all run in it.
  """
  lr = _schedule(opt_cfg, total_steps)
  tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), optax.adamw(lr, weight_decay=opt_cfg.weight_decay))
  master = opt_cfg.master_dtype
  if master and jnp.dtype(param_dtype).itemsize < jnp.dtype(master).itemsize:
    tx = with_master_weights(tx, master)
  return tx


def _schedule(opt_cfg, total_steps: int) -> optax.Schedule | float:
  if opt_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps,
                                              max(total_steps, opt_cfg.warmup_steps + 1), end_value=0.1 * opt_cfg.lr)
  if opt_cfg.schedule == 'constant':
    return optax.warmup_constant_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps) if opt_cfg.warmup_steps else opt_cfg.lr
  raise ValueError(f"unknown schedule {opt_cfg.schedule!r}; known: 'cosine', 'constant'")


def learning_rate(opt_cfg, total_steps: int) -> optax.Schedule:
  """The schedule make_optimizer builds, as a function of the update count (for logging)."""
  lr = _schedule(opt_cfg, total_steps)
  return lr if callable(lr) else (lambda count: jnp.asarray(lr, jnp.float32))


class MasterState(NamedTuple):
  master: optax.Params  # the params in the master dtype: the values the optimizer really updates
  inner: optax.OptState  # the wrapped optimizer's state, built on `master` (so its moments share that dtype)


def with_master_weights(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """Run `inner` on a `dtype` (e.g. float32) copy of narrower (bfloat16) params.

  Adding a small update to a bfloat16 weight rounds it away (8 mantissa bits: lr 5e-5 times an O(1) Adam step
  is below half an ulp of any weight above ~0.01), and optax keeps Adam's second moment in the param dtype.
  So the master copy accumulates the updates, and the update returned moves the params onto master rounded
  to their dtype. Grads arrive in the param dtype and are upcast first.

  update takes an optional lr_scale (see scaled_update), hence the ExtraArgs type: optax.chain passes it on.
  """
  def init(params):
    master = jax.tree.map(lambda p: p.astype(dtype), params)
    return MasterState(master, inner.init(master))

  def update(grads, state, params=None, *, lr_scale: jax.Array | None = None):
    grads = jax.tree.map(lambda g: g.astype(dtype), grads)
    updates, inner_state = inner.update(grads, state.inner, state.master)
    if lr_scale is not None:  # here, not on the returned move: the master copy must take the scaled step
      updates = scale_updates(updates, lr_scale)
    master = optax.apply_updates(state.master, updates)
    # In `dtype`: rounded(master) - params is exact there, so apply_updates lands on rounded(master).
    to_master = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(dtype) - p.astype(dtype), master, params)
    return to_master, MasterState(master, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def scale_updates(updates: optax.Updates, lr_scale: jax.Array) -> optax.Updates:
  """updates * lr_scale (a scalar), computed in float32 at least and returned in each update's dtype."""
  return jax.tree.map(lambda u: (u * lr_scale.astype(jnp.promote_types(u.dtype, jnp.float32))).astype(u.dtype),
                      updates)


def scaled_update(tx: optax.GradientTransformation, grads: optax.Updates, opt_state: optax.OptState,
                  params: optax.Params, lr_scale: jax.Array | None = None) -> tuple[optax.Updates, optax.OptState]:
  """tx.update with its learning rate multiplied by `lr_scale` (a scalar array; None: tx.update unchanged).

  For make_optimizer's AdamW this is exactly a learning rate of lr_scale * lr: optax.adamw (0.2.8,
  optax/_src/alias.py) is chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate), so the decoupled
  weight decay is added before the -lr scaling and the whole update is linear in lr; the global-norm clip comes
  before all of it, and no state (moments, schedule count) depends on lr. With master weights the scale goes
  to the master copy's update (with_master_weights), not to the rounded move of the params onto it.
  """
  if lr_scale is None:
    return tx.update(grads, opt_state, params)
  lr_scale = jnp.asarray(lr_scale)
  if isinstance(opt_state, MasterState):
    return tx.update(grads, opt_state, params, lr_scale=lr_scale)
  updates, opt_state = tx.update(grads, opt_state, params)
  return scale_updates(updates, lr_scale), opt_state


def split_trainable(params: nnx.State, trainable=None) -> tuple[nnx.State, tuple[nnx.State, ...]]:
  """(trained params, (frozen params,)) by the nnx filter `trainable`; None: all trained, nothing frozen."""
  if trainable is None:
    return params, ()
  train, frozen = nnx.split_state(params, trainable, ...)
  return train, (frozen,)


def init_state(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
               rules: sharding.Rules = sharding.DEFAULT_RULES, *, trainable=None) -> TrainState:
  """Place params and a fresh optimizer state on the mesh. Init runs outside jit: a jitted tx.init
  returned unsharded state that the compiled step then rejected (ENV_FACTS).

  trainable: an nnx filter (e.g. nnx.LoRAParam, grpo_jax/models/lora.py): the optimizer state is built for those params
  only; the others are frozen (make_train_step with the same filter). None: all params train."""
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(split_trainable(params, trainable)[0]))
  return jax.device_put(state, state_shardings(state, mesh, rules))


def state_shardings(state: TrainState, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES):
  return sharding.tree_shardings(state, mesh, rules)


def metric_reduction(name: str) -> str:
  """How a step's metric combines over micro-batches and minibatches: 'min' for names ending in '_min' (e.g.
  ratio_min), 'max' for '_max', else 'mean' (the losses' token means, the loss itself)."""
  return 'min' if name.endswith('_min') else 'max' if name.endswith('_max') else 'mean'


def combine_metrics(metrics: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """One dict from several updates' metrics (a GRPO step's minibatches and epochs): equal-weight means, except
  that '_min' / '_max' metrics are the min / max of their values (metric_reduction)."""
  ops = {'min': jnp.min, 'max': jnp.max, 'mean': jnp.mean}
  return {k: ops[metric_reduction(k)](jnp.stack([m[k] for m in metrics])) for k in metrics[0]}


# loss_fn(model, batch, hparams) -> (scalar loss, metrics): hparams are scalar arrays a controller may change
# between steps (beta), so new values need no recompile.
LossFn = Callable[[nnx.Module, Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    state_sharding, batch_sharding, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES, *,
                    grad_accum_steps: int = 1, micro_weight: Callable[[Any], jax.Array] | None = None,
                    trainable=None, group_size: int = 1):
  """jit(train_step(state, batch, hparams) -> (state, metrics)) with donated state and pinned shardings;
  activations follow `rules` (sharding.constrain). hparams: a dict of scalar arrays for loss_fn (replicated).
  If it holds 'lr_scale', the optimizer's learning rate is multiplied by it this step (scaled_update): a KL
  controller can move the lr without a recompile. loss_fn still gets all of hparams, 'lr_scale' included.

  grad_accum_steps = k > 1 splits each batch (leading axis B, divisible by k) into k micro-batches of B / k
  rows and scans over them inside the one jitted step, so only one micro-batch's activations are live; loss,
  metrics and gradients are combined with weights micro_weight(micro_batch) / their sum (default equal), then
  one optimizer update is applied. That equals the k = 1 step when loss_fn is a weighted mean over the
  micro-batches with those weights: equal weights for GRPO (a mean over outputs), token counts for SFT (a
  mean over tokens). Metrics that are token means of GRPO (kl, ratio, clip_frac, entropy) become means of the
  micro-batch values with those weights; metrics named '*_min' / '*_max' (ratio_min, ratio_max) become the min / max
  over the micro-batches (metric_reduction).

  group_size: G > 1 keeps each group of G contiguous rows (one prompt's outputs, which a shared-prompt loss_fn
  reads as such) inside one micro-batch (sharding.split_micro_batches); B must then divide by k * G.

  trainable: an nnx filter as in init_state: only those params get gradients and updates; the rest pass through
  the step unchanged and, being constants of the differentiated function, have no weight gradient computed.

  A step whose loss, gradient norm or update norm is not finite changes nothing (metrics['nonfinite'] = 1; the
  state's step counts applied updates only).
  """
  def grads_of(params, batch, hparams, frozen=()):
    def loss_of(params):
      return loss_fn(nnx.merge(graphdef, params, *frozen), batch, hparams)
    return jax.value_and_grad(loss_of, has_aux=True)(params)

  def accumulated_grads_of(params, batch, hparams, frozen=()):
    k = grad_accum_steps
    micro = sharding.split_micro_batches(batch, k, group_size)  # each keeps an equal share of every device's rows
    weights = jax.vmap(micro_weight)(micro) if micro_weight else jnp.ones(k)  # [k]
    total = weights.sum()
    weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0).astype(jnp.float32)

    def add_micro_batch(acc, xs):
      batch, weight = xs
      (loss, metrics), grads = grads_of(params, jax.lax.with_sharding_constraint(batch, batch_sharding), hparams,
                                        frozen)
      (acc_loss, acc_metrics), acc_grads = acc
      add = lambda a, x: a + weight * x.astype(jnp.float32)  # noqa: E731
      combine = {'min': lambda a, x: jnp.minimum(a, x.astype(jnp.float32)),
                 'max': lambda a, x: jnp.maximum(a, x.astype(jnp.float32)), 'mean': add}
      metrics = {k: combine[metric_reduction(k)](acc_metrics[k], v) for k, v in metrics.items()}
      return ((add(acc_loss, loss), metrics), jax.tree.map(add, acc_grads, grads)), None

    shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), hparams, frozen)
    initial = {'min': jnp.inf, 'max': -jnp.inf, 'mean': 0.0}
    (loss_shape, metric_shapes), grad_shapes = shapes
    zeros = ((jnp.zeros(loss_shape.shape, jnp.float32),
              {k: jnp.full(v.shape, initial[metric_reduction(k)], jnp.float32) for k, v in metric_shapes.items()}),
             jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), grad_shapes))
    (loss, metrics), grads = jax.lax.scan(add_micro_batch, zeros, (micro, weights))[0]
    return (loss, metrics), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

  def train_step(state: TrainState, batch, hparams) -> tuple[TrainState, dict[str, jax.Array]]:
    params, frozen = split_trainable(state.params, trainable)
    if grad_accum_steps > 1:
      (loss, metrics), grads = accumulated_grads_of(params, batch, hparams, frozen)
    else:
      (loss, metrics), grads = grads_of(params, batch, hparams, frozen)
    updates, opt_state = scaled_update(tx, grads, state.opt_state, params, hparams.get('lr_scale'))
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))  # bf16 grads: in fp32
    # A non-finite loss, gradient or update (an infinite learning rate) would poison the params and the Adam
    # moments for good: skip the update (params, optimizer state and step count stay as they were) and report it;
    # the stage loop stops the run after config.max_nonfinite_steps in a row.
    update_norm = optax.global_norm(jax.tree.map(lambda u: u.astype(jnp.float32), updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep_if_finite(new_params, params), keep_if_finite(opt_state, state.opt_state)
    if frozen:
      params = nnx.merge_state(params, *frozen)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return TrainState(state.step + finite.astype(state.step.dtype), params, opt_state), metrics

  return sharding.jit_sharded(train_step, mesh, rules, (state_sharding, batch_sharding, 'replicated'),
                              out_shardings=(state_sharding, 'replicated'), donate_argnums=0, where='make_train_step')
