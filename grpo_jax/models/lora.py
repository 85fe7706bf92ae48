"""LoRA (Hu et al. 2021, arXiv:2106.09685): train a low-rank update scale * A @ B of chosen projections while the
base weights stay frozen; scale = alpha / rank.

This module builds on transformer.py, never the reverse (the model knows no LoRA): `transformer(model_cfg, rngs,
lora_cfg)` builds the plain `Transformer`, then `add_adapters` puts one `LoraAdapter` per targeted weight into its
module's `lora` dict (`blocks/0/attn/lora/wq/{a,b}`), the generic hook whose callables the forward adds to their
projection's output. The adapters draw from the rngs after the base weights, so those are exactly the plain
model's of the same seed. The adapters are separate `nnx.LoRAParam` leaves of that one model. Hence:
- the train step differentiates only them (`train_state.make_train_step(..., trainable=TRAINABLE)`): the base
  gets no gradient and the optimizer state (AdamW moments, master copy) exists for the adapters alone;
- the params minus the adapters are exactly a plain Transformer's (`base_params`, a view, no copy), so the frozen
  reference policy is the plain model on the very same arrays: no second copy of the weights;
- training and the sampler run the adapters unmerged, x W + scale * (x A) B (two thin matmuls per projection;
  no merged copy of any weight is ever held). `merge_params` folds them in, W + scale * A @ B, where a plain
  model is wanted: at the end of a LoRA stage (the next stage's base, the HF export, eval from a workdir).
A [*in, r] starts uniform(+-1 / sqrt(fan_in)) and B [r, *out] at zero, as in HF PEFT, so a fresh adapter leaves
the model unchanged.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models.transformer import ModelConfig, Transformer

# config name -> the weight it adapts (attribute of transformer.Attention or transformer.MLP)
TARGETS = {'q': 'wq', 'k': 'wk', 'v': 'wv', 'o': 'wo', 'gate': 'gate', 'up': 'up', 'down': 'down'}
# The weights of each module that can take an adapter -> how many leading (input) dims the forward contracts x with.
ATTENTION_WEIGHTS = {'wq': 1, 'wk': 1, 'wv': 1, 'wo': 2}
MLP_WEIGHTS = {'gate': 1, 'up': 1, 'down': 1}
TRAINABLE = nnx.LoRAParam  # the nnx filter of the adapter leaves


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int  # r
  alpha: float  # scale = alpha / r
  targets: tuple[str, ...]  # keys of TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_json(self) -> dict:
    return {'rank': self.rank, 'alpha': self.alpha, 'targets': list(self.targets)}

  @classmethod
  def from_json(cls, d: dict) -> LoraConfig:
    return cls(int(d['rank']), float(d['alpha']), tuple(d['targets']))


def parse_names(value: str | Iterable[str], known: Iterable[str], where: str) -> tuple[str, ...]:
  """'q, v' or ('q', 'v') -> ('q', 'v'); an unknown name is an error naming it."""
  names = value.split(',') if isinstance(value, str) else list(value)
  names = tuple(str(n).strip() for n in names if str(n).strip())
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'{where}: unknown {unknown}; known: {list(known)}')
  return names


class LoraAdapter(nnx.Module):
  """scale * (x A) B, the update of a weight W [*in, *out] that the model contracts with x over its n_in leading
  dims. A [*in, r] and B [r, *out] share W's logical axes on those dims, so they shard like W; r replicates."""

  def __init__(self, weight: nnx.Param, n_in: int, lora: LoraConfig, rngs: nnx.Rngs):
    shape, axes, r = tuple(weight.shape), tuple(weight.logical_axes), lora.rank
    # PEFT's kaiming_uniform(a=sqrt(5)): uniform with bound 1 / sqrt(fan_in).
    init_a = jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=tuple(range(n_in)),
                                                  out_axis=n_in)
    self.a = nnx.LoRAParam(init_a(rngs.params(), (*shape[:n_in], r), weight.dtype),
                           logical_axes=(*axes[:n_in], 'lora_rank'))
    self.b = nnx.LoRAParam(jnp.zeros((r, *shape[n_in:]), weight.dtype), logical_axes=('lora_rank', *axes[n_in:]))
    self.scale = lora.scale

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., *in] -> [..., *out] in x's dtype."""
    a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
    xa = jnp.tensordot(x, a, a.ndim - 1) * jnp.asarray(self.scale, x.dtype)  # [..., r]: scaled where it is small
    return jnp.tensordot(xa, b, 1)


def transformer(model_cfg: ModelConfig, rngs: nnx.Rngs, lora_cfg: LoraConfig | None) -> Transformer:
  """Transformer(model_cfg, rngs) with adapters on lora_cfg's targets (None: the plain model). Its base weights are
  the plain model's of the same rngs: the adapters draw their random numbers after them."""
  model = Transformer(model_cfg, rngs)
  return model if lora_cfg is None else add_adapters(model, lora_cfg, rngs)


def add_adapters(model: Transformer, lora_cfg: LoraConfig, rngs: nnx.Rngs) -> Transformer:
  """Give every block's attention and MLP a fresh adapter (A from `rngs`, B zero) for each of lora_cfg's targets,
  in place; returns `model`. The order (block by block; wq, wk, wv, wo, then gate, up, down) fixes which random
  numbers each adapter draws, so changing it changes the adapters of a seed."""
  wanted = {TARGETS[t] for t in lora_cfg.targets}
  for block in model.blocks:
    for module, weights in ((block.attn, ATTENTION_WEIGHTS), (block.mlp, MLP_WEIGHTS)):
      for name, n_in in weights.items():
        if name in wanted:
          module.lora[name] = LoraAdapter(getattr(module, name), n_in, lora_cfg, rngs)
  return model


def split_params(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(adapters, base): the LoRAParam leaves and the rest, a plain Transformer's params. Same arrays, no copy."""
  return nnx.split_state(params, TRAINABLE, ...)


def base_params(params: nnx.State) -> nnx.State:
  """The params without adapters (the frozen base): what the plain model's graphdef merges with."""
  return split_params(params)[1]


def merge_params(params: nnx.State, scale: float) -> nnx.State:
  """Plain Transformer params with each adapter folded in: W + scale * A @ B, rounded to W's dtype.

  params: a LoRA model's params (base + adapters at `.../lora/<weight>/{a,b}`), possibly sharded; the result keeps
  W's metadata (logical axes). merge_into_base runs it without a second copy of the weights."""
  adapters, base = split_params(params)
  flat = dict(nnx.to_flat_state(base))
  groups: dict[tuple, dict[str, nnx.Variable]] = {}
  for path, var in nnx.to_flat_state(adapters):
    groups.setdefault(path[:-1], {})[path[-1]] = var
  for path, ab in groups.items():  # path = (..., 'lora', weight name)
    weight_path = (*path[:-2], path[-1])
    w = flat[weight_path]
    delta = jnp.tensordot(ab['a'][...].astype(jnp.float32), ab['b'][...].astype(jnp.float32), 1)
    flat[weight_path] = w.replace((w[...].astype(jnp.float32) + scale * delta).astype(w.dtype))
  return nnx.from_flat_state(flat)


def merge_into_base(params: nnx.State, scale: float, out_shardings=None) -> nnx.State:
  """merge_params under jit, donating the base: the merged weights reuse its buffers, so merging does not hold a
  second copy of the weights. `params` must not be used afterwards."""
  adapters, base = split_params(params)
  merge = jax.jit(lambda base, adapters: merge_params(nnx.merge_state(base, adapters), scale),
                  out_shardings=out_shardings, donate_argnums=0)
  return merge(base, adapters)


def init_adapters(model_cfg: ModelConfig, lora_cfg: LoraConfig, rng: jax.Array, shardings=None) -> nnx.State:
  """Fresh adapters (A random, B zero) of transformer(model_cfg, nnx.Rngs(rng), lora_cfg), in `shardings` if given.
  Built under jit, so the base weights the constructor also draws are dead code and never allocated."""
  def build(rng):
    return split_params(nnx.state(transformer(model_cfg, nnx.Rngs(rng), lora_cfg), nnx.Param))[0]
  return jax.jit(build, out_shardings=shardings)(rng)


def abstract_adapters(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> nnx.State:
  """The adapters' shapes and dtypes (ShapeDtypeStructs in LoRAParams), e.g. as a restore target."""
  model = nnx.eval_shape(lambda: transformer(model_cfg, nnx.Rngs(0), lora_cfg))
  return split_params(nnx.state(model, nnx.Param))[0]
