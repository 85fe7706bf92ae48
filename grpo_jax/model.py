"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 family, in flax.nnx.

One module serves training (full causal forward) and sampling (prefill + one-token decode against a KV
cache). Parameters carry *logical* axis names (`logical_axes=...`); `sharding.py` maps them to mesh axes,
so this file never mentions a mesh.

Einsum letters: b batch, t query time, s key time, d model, n query heads, k kv heads, g queries per kv
head, h head dim, f mlp, v vocab, l layer.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

_NEG_INF = -1e30  # finite, so fully masked rows (left padding) give a uniform softmax instead of NaN


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  tie_embeddings: bool = False
  param_dtype: str = 'float32'
  dtype: str = 'float32'  # compute dtype; logits are always returned in float32
  init_std: float = 0.02

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim'):
      if getattr(self, name) <= 0:
        raise ValueError(f'model.{name} must be positive, got {getattr(self, name)}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must be a multiple of '
                       f'model.num_kv_heads={self.num_kv_heads} (grouped-query attention)')
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even for RoPE')
    for name in ('param_dtype', 'dtype'):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f'model.{name}={getattr(self, name)!r} is not a dtype') from e


class KVCache(NamedTuple):
  """One buffer per layer: each is updated in place at the new slots and read whole by attention, so no
  token copies a layer's cache (slicing a layer out of one stacked buffer did, every decode step)."""
  k: tuple[jax.Array, ...]  # num_layers x [b, s, k, h]
  v: tuple[jax.Array, ...]  # num_layers x [b, s, k, h]
  mask: jax.Array  # [b, s] bool: slot holds a real (non-pad) token

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    layers = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))  # noqa: E731
    return cls(layers(), layers(), jnp.zeros((batch, max_len), bool))


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init=None) -> nnx.Param:
  init = init or jax.nn.initializers.normal(cfg.init_std)
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = _param(rngs, cfg, (dim,), ('norm',), jax.nn.initializers.ones)
    self.eps = cfg.rms_eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x [b, t, n, h], positions [b, t]."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, h/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.wq = _param(rngs, cfg, (d, n, h), ('embed', 'q_heads', 'head_dim'))
    self.wk = _param(rngs, cfg, (d, k, h), ('embed', 'kv_heads', 'head_dim'))
    self.wv = _param(rngs, cfg, (d, k, h), ('embed', 'kv_heads', 'head_dim'))
    self.wo = _param(rngs, cfg, (n, h, d), ('q_heads', 'head_dim', 'embed'))
    if cfg.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.bq = _param(rngs, cfg, (n, h), ('q_heads', 'head_dim'), zeros)
      self.bk = _param(rngs, cfg, (k, h), ('kv_heads', 'head_dim'), zeros)
      self.bv = _param(rngs, cfg, (k, h), ('kv_heads', 'head_dim'), zeros)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg, rngs)
      self.k_norm = RMSNorm(h, cfg, rngs)

  def __call__(self, x, positions, key_mask, q_slots, layer_cache=None, cache_index=None):
    """x [b, t, d]; key_mask [b, s]; q_slots [t] = the key slot each query sits in (for causality).

    layer_cache: (k [b, s, k, h], v [b, s, k, h]) of this layer, or None. With a cache, this step's keys
    and values are written into slots cache_index.. (in place) and attention runs over all s slots.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dt))
    k = jnp.einsum('btd,dkh->btkh', x, self.wk[...].astype(dt))
    v = jnp.einsum('btd,dkh->btkh', x, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    if layer_cache is not None:
      k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), cache_index, 1)
      v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v.astype(layer_cache[1].dtype), cache_index, 1)
      new_cache = (k_all, v_all)
    else:
      k_all, v_all, new_cache = k, v, None
    b, t, n, h = q.shape
    groups = n // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, h)
    scores = jnp.einsum('btkgh,bskh->bkgts', q, k_all.astype(dt)).astype(jnp.float32) * h ** -0.5
    k_slots = jnp.arange(k_all.shape[1])
    allowed = key_mask[:, None, :] & (k_slots[None, :] <= q_slots[:, None])[None]  # [b, t, s]
    scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum('bkgts,bskh->btkgh', probs, v_all.astype(dt)).reshape(b, t, n, h)
    return jnp.einsum('btnh,nhd->btd', out, self.wo[...].astype(dt)), new_cache


class MLP(nnx.Module):
  """SwiGLU."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.gate = _param(rngs, cfg, (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'))
    self.up = _param(rngs, cfg, (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'))
    self.down = _param(rngs, cfg, (cfg.mlp_dim, cfg.d_model), ('mlp', 'embed'))

  def __call__(self, x):
    dt = self.dtype
    hidden = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return hidden @ self.down[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, key_mask, q_slots, layer_cache=None, cache_index=None):
    attn_out, new_cache = self.attn(self.attn_norm(x), positions, key_mask, q_slots, layer_cache, cache_index)
    x = x + attn_out
    return x + self.mlp(self.mlp_norm(x)), new_cache


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'))

  def __call__(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0):
    """Causal forward.

    Args:
      tokens: [b, t] int token ids.
      positions: [b, t] RoPE positions (left padding means they do not start at 0 in the slot axis).
      mask: [b, t] bool, False on padding.
      cache: optional KV cache; if given, the t tokens occupy slots cache_index .. cache_index + t - 1.
    Returns:
      (logits [b, t, v] float32, updated cache or None).
    """
    dt = jnp.dtype(self.cfg.dtype)
    x = self.embed[...].astype(dt)[tokens]
    t = tokens.shape[1]
    q_slots = cache_index + jnp.arange(t)
    key_mask = mask if cache is None else jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, cache_index, 1)
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, new_layer = block(x, positions, key_mask, q_slots, layer_cache, cache_index)
      if cache is not None:
        new_k.append(new_layer[0])
        new_v.append(new_layer[1])
    x = self.final_norm(x)
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum('btd,dv->btv', x, head.astype(dt)).astype(jnp.float32)
    new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), key_mask)
    return logits, new_cache


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """[b, t] bool -> [b, t] int positions counting only real tokens (0 on left padding)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
