"""Decoder-only transformer of the Llama / Mistral / Qwen2 / Qwen3 / Gemma family, in flax.nnx.

One module serves training (`model(tokens, positions, mask)`, the full causal forward) and sampling
(`model.forward_with_cache`: prefill + one-token decode against a KV cache). `hf.py` loads and saves Hugging
Face checkpoints of these architectures. Parameters carry *logical* axis names (`logical_axes=...`);
`sharding.py` maps them to mesh axes, so this file never mentions a mesh.

Adapters plug in from outside: each Attention and MLP has a `lora` dict (empty in the plain model), weight name ->
any callable x -> the update of that projection's output x . W, which the forward adds (`_plus_adapter`). This
file imports no adapter code; `lora.py` imports it and fills the dicts (`lora.transformer`), and the dict's name is
the `lora` in checkpoint paths such as `blocks/0/attn/lora/wq/a`.

Einsum letters: b batch, t query time, s key time, d model, n query heads, k kv heads, g queries per kv
head, q = (g, t) merged, h head dim, f mlp, v vocab, l layer, r a completion's index in its prompt's group (where b
counts prompts: Attention.grouped).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.core.logprobs import grouped_completion_positions, positions_from_mask
from grpo_jax.core.packing import PackedLayout
from grpo_jax.parallel.sharding import constrain

_NEG_INF = -1e30  # finite, so fully masked rows (left padding) give a uniform softmax instead of NaN

MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma')  # the HF architectures this module implements
ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True)}
ROPE_TYPES = ('default', 'llama3')
# Logical axes of activations, pinned with `constrain` (a no-op unless a mesh is active; sharding.py maps them).
RESIDUAL_AXES = ('batch', 'length', 'act_embed')  # [b, t, d]
KEY_AXES = ('batch', 'kv_heads', 'head_dim', 'length')  # [b, k, h, s]: keys, cached or not
VALUE_AXES = ('batch', 'kv_heads', 'length', 'head_dim')  # [b, k, s, h]: values
# What each block keeps for the backward pass of the training forward (`model(..., remat=name)`); the rest is
# recomputed. 'save_dots' keeps the weight matmuls and recomputes attention scores, softmax and elementwise ops.
REMAT_POLICIES = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
                  'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


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
  # Only JSON scalars below: the config is stored as dataclasses.asdict JSON in checkpoint meta.
  model_type: str = 'llama'  # the HF architecture this config corresponds to (hf.save_model writes it)
  activation: str = 'silu'  # of the gated MLP: 'silu' (SwiGLU) or 'gelu_tanh' (Gemma's GeGLU)
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + scale); Gemma: 1.0, with scales initialized to 0
  embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
  sliding_window: int = 0  # > 0: a query sees only the last sliding_window slots, itself included (Mistral)
  rope_type: str = 'default'  # or 'llama3' (Llama 3.1 frequency scaling, with the four fields below)
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  max_position_embeddings: int = 0  # informational (0 = unknown); carried into HF config.json

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
    for name, allowed in (('model_type', MODEL_TYPES), ('activation', tuple(ACTIVATIONS)), ('rope_type', ROPE_TYPES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'model.{name}={getattr(self, name)!r} is not one of {allowed}')
    for name in ('sliding_window', 'max_position_embeddings'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f'model.{name} must be an int >= 0 (0 = off / unknown), got {getattr(self, name)!r}')
    if self.rope_type == 'llama3':
      if not self.rope_factor > 0 or not self.rope_original_max_len > 0:
        raise ValueError(f'model.rope_factor={self.rope_factor} and model.rope_original_max_len='
                         f'{self.rope_original_max_len} must be positive for llama3 RoPE')
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        raise ValueError(f'llama3 RoPE needs 0 < model.rope_low_freq_factor={self.rope_low_freq_factor} < '
                         f'model.rope_high_freq_factor={self.rope_high_freq_factor}')


class KVCache(NamedTuple):
  """One buffer per layer: each is updated in place at the new slots and read whole by attention, so no
  token copies a layer's cache (slicing a layer out of one stacked buffer did, every decode step)."""
  # The layouts the two attention matmuls read as they are (q k^T: [h, s] per head; p v: [s, h] per head): a
  # [b, s, k, h] cache was transposed whole by XLA every decode step, and [b, k, s, h] keys were slower
  # (benchmarks/RESULTS.md).
  k: tuple[jax.Array, ...]  # num_layers x [b, k, h, s]
  v: tuple[jax.Array, ...]  # num_layers x [b, k, s, h]
  mask: jax.Array  # [b, s] bool: slot holds a real (non-pad) token

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    shapes = {KEY_AXES: (batch, cfg.num_kv_heads, cfg.head_dim, max_len),
              VALUE_AXES: (batch, cfg.num_kv_heads, max_len, cfg.head_dim)}
    # Constrained at creation, so each device allocates only its (batch, kv_heads) shard of the cache.
    layers = lambda axes: tuple(constrain(jnp.zeros(shapes[axes], cfg.dtype), axes)  # noqa: E731
                                for _ in range(cfg.num_layers))
    return cls(layers(KEY_AXES), layers(VALUE_AXES), constrain(jnp.zeros((batch, max_len), bool), ('batch', 'length')))

  def grow(self, max_len: int) -> KVCache:
    """The same cache with empty (masked) slots appended up to max_len slots."""
    def pad(x, axis, axes):
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, max_len - x.shape[axis])
      return constrain(jnp.pad(x, widths), axes)
    return KVCache(tuple(pad(k, 3, KEY_AXES) for k in self.k), tuple(pad(v, 2, VALUE_AXES) for v in self.v),
                   pad(self.mask, 1, ('batch', 'length')))


def dense(x: jax.Array, w: jax.Array, num_in: int = 1) -> jax.Array:
  """x [..., *in] . w [*in, *out] -> [..., *out], contracting x's last num_in dims with w's first num_in.

  On XLA:CPU it runs as one 2-D matmul: with 3-D activations the compiler transposes whole activations in
  the backward pass (benchmarks/RESULTS.md has the cost). Other backends get the
  einsum as written, whose batch dims their matmul units take as they are.
  """
  if jax.default_backend() != 'cpu':
    return jnp.tensordot(x, w, num_in)
  lead, inner, outer = x.shape[:x.ndim - num_in], w.shape[:num_in], w.shape[num_in:]
  y = x.reshape(-1, math.prod(inner)) @ w.reshape(math.prod(inner), -1)
  return y.reshape(*lead, *outer)


def _plus_adapter(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """y = x . W for the weight `name` of `module`, plus module.lora[name](x) when an adapter is registered for it."""
  if name not in module.lora:
    return y
  return y + module.lora[name](x).astype(y.dtype)


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init=None) -> nnx.Param:
  init = init or jax.nn.initializers.normal(cfg.init_std)
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    # Initialized so that the effective multiplier (offset + scale) starts at 1.
    init = jax.nn.initializers.constant(1.0 - cfg.norm_offset) if cfg.norm_offset else jax.nn.initializers.ones
    self.scale = _param(rngs, cfg, (dim,), ('norm',), init)
    self.eps = cfg.rms_eps
    self.offset = cfg.norm_offset

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (x32 * (scale + self.offset if self.offset else scale)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """[head_dim / 2] float32 RoPE inverse frequencies, as transformers' rope init functions compute them
  (`_compute_default_rope_parameters`, `_compute_llama3_parameters`)."""
  h = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if cfg.rope_type == 'llama3':
    old_len, low, high, factor = (cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_factor)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x [b, t, n, h], positions [b, t], inv_freq [h/2]."""
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
    self.lora = nnx.Dict()  # weight name -> adapter (x -> update), added by lora.py; empty: the plain model

  def __call__(self, x, positions, key_mask, q_slots, layer_cache=None, cache_index=None):
    """x [b, t, d]; key_mask [b, s]; q_slots [t] = the key slot each query sits in (for causality).

    layer_cache: (k [b, s, k, h], v [b, s, k, h]) of this layer, or None. With a cache, this step's keys
    and values are written into slots cache_index.. (in place) and attention runs over all s slots.
    """
    dt = jnp.dtype(self.cfg.dtype)
    q, k, v = self._project(x, positions)
    if layer_cache is not None:
      k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), cache_index, 3)
      v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v.astype(layer_cache[1].dtype), cache_index, 2)
      k_all, v_all = constrain(k_all, KEY_AXES), constrain(v_all, VALUE_AXES)  # the decode loop's carry
      new_cache = (k_all, v_all)
    else:
      k_all, v_all, new_cache = k, v, None
    b, t, n, h = q.shape
    s = k_all.shape[3]
    q = self._query_rows(q)
    scores = jnp.einsum('bkqh,bkhs->bkqs', q, k_all.astype(dt)).astype(jnp.float32) * h ** -0.5
    allowed = key_mask[:, None, :] & self._visible(q_slots, jnp.arange(s))[None]  # [b, t, s]
    probs = self._softmax(scores, allowed)
    out = jnp.einsum('bkqs,bksh->bkqh', probs, v_all.astype(dt))
    return self._output(out, t), new_cache

  def grouped(self, xp, xc, group_size: int, prompt_positions, completion_positions, prompt_mask, completion_mask,
              completion_slots=None, completion_segments=None):
    """Attention of prompts [P, p] run once and their completions [N, c] (N = P * group_size, each group's rows
    contiguous): the prompts attend causally among themselves; each completion row attends to its group's prompt
    keys and, causally, to its own earlier completion keys, as if it were the row prompt ++ completion (prompt
    slots 0 .. p-1, completion slot j at p + j). The prompt keys and values are never repeated over the group:
    the completion-to-prompt scores contract queries [P, G, ...] with keys [P, ...], so autodiff sums each
    prompt key's and value's gradient over its group.

    Packed rows (core/packing.py): completion_slots and completion_segments [N, c] give each column's slot j in its
    own completion and which completion it belongs to; a column then attends only to earlier slots of its own
    segment (and the prompt), so a row holds several completions. None: column j is slot j of one completion.

    xp [P, p, d], xc [N, c, d]; positions and masks [P, p] / [N, c]. Returns ([P, p, d], [N, c, d]).
    """
    dt = jnp.dtype(self.cfg.dtype)
    qp, kp, vp = self._project(xp, prompt_positions)  # [P, p, n, h], [P, k, h, p], [P, k, p, h]
    qc, kc, vc = self._project(xc, completion_positions)  # [N, c, n, h], [N, k, h, c], [N, k, c, h]
    p, (big_p, g), (n_rows, c, _, h) = xp.shape[1], (xp.shape[0], group_size), qc.shape
    kp, vp, kc, vc = kp.astype(dt), vp.astype(dt), kc.astype(dt), vc.astype(dt)
    # The prompts among themselves: the plain causal attention.
    p_slots = jnp.arange(p)
    scores = jnp.einsum('bkqh,bkhs->bkqs', self._query_rows(qp), kp).astype(jnp.float32) * h ** -0.5
    probs = self._softmax(scores, prompt_mask[:, None, :] & self._visible(p_slots, p_slots)[None])
    out_p = jnp.einsum('bkqs,bksh->bkqh', probs, vp)
    # Completions: scores against the group's prompt keys and their own keys, one softmax over both.
    q = self._query_rows(qc)  # [N, k, q, h]
    kv, qlen = q.shape[1], q.shape[2]
    to_prompt = jnp.einsum('brkqh,bkhs->brkqs', q.reshape(big_p, g, kv, qlen, h), kp).reshape(n_rows, kv, qlen, p)
    to_self = jnp.einsum('bkqh,bkhs->bkqs', q, kc)  # [N, k, q, c]
    scores = jnp.concatenate([to_prompt, to_self], axis=-1).astype(jnp.float32) * h ** -0.5  # [N, k, q, p + c]
    key_mask = jnp.concatenate([jnp.repeat(prompt_mask, g, axis=0), completion_mask], axis=1)  # [N, p + c] bool
    if completion_segments is None:
      c_slots = p + jnp.arange(c)
      visible = self._visible(c_slots, jnp.concatenate([p_slots, c_slots]))[None]  # [1, c, p + c]
    else:
      c_slots = p + completion_slots  # [N, c]
      visible = self._visible(c_slots, jnp.concatenate([jnp.broadcast_to(p_slots, (n_rows, p)), c_slots], 1))
      same_segment = completion_segments[:, :, None] == completion_segments[:, None, :]  # [N, c, c]
      visible &= jnp.concatenate([jnp.ones((n_rows, c, p), bool), same_segment], axis=-1)  # [N, c, p + c]
    probs = self._softmax(scores, key_mask[:, None, :] & visible)
    from_prompt = jnp.einsum('brkqs,bksh->brkqh', probs[..., :p].reshape(big_p, g, kv, qlen, p), vp)
    out_c = from_prompt.reshape(n_rows, kv, qlen, h) + jnp.einsum('bkqs,bksh->bkqh', probs[..., p:], vc)
    return self._output(out_p, p), self._output(out_c, c)

  def _project(self, x, positions):
    """x [b, t, d] -> q [b, t, n, h], keys [b, k, h, t], values [b, k, t, h] (biases, qk-norm, RoPE applied)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q = _plus_adapter(self, 'wq', x, dense(x, self.wq[...].astype(dt)))  # [b, t, n, h]
    k = _plus_adapter(self, 'wk', x, dense(x, self.wk[...].astype(dt)))  # [b, t, k, h]
    v = _plus_adapter(self, 'wv', x, dense(x, self.wv[...].astype(dt)))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(cfg)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    # Heads stay split like wq / wk / wv (tensor parallel), so attention itself needs no communication.
    q = constrain(q, ('batch', 'length', 'q_heads', 'head_dim'))
    # Head-major from here on (keys [b, k, h, s], values [b, k, s, h], as cached): both attention matmuls are
    # plain batched matmuls over (b, k) and the cache is read in place, with no transpose of it per token.
    return q, constrain(k.transpose(0, 2, 3, 1), KEY_AXES), constrain(v.transpose(0, 2, 1, 3), VALUE_AXES)

  def _query_rows(self, q):
    """[b, t, n, h] -> [b, k, g * t, h]: each kv head's queries as the rows of one matmul."""
    b, t, n, h = q.shape
    kv = self.cfg.num_kv_heads
    return q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, n // kv * t, h)

  def _visible(self, q_slots, k_slots):
    """q_slots [..., t], k_slots [..., s] -> [..., t, s] bool: causal, and within sliding_window slots when set."""
    visible = k_slots[..., None, :] <= q_slots[..., :, None]
    if self.cfg.sliding_window:
      # On slots, not positions: a row's real tokens are contiguous (left padding; the sampler only appends
      # masked slots after EOS), so slot distance is position distance, as in transformers' mask.
      visible &= q_slots[..., :, None] - k_slots[..., None, :] < self.cfg.sliding_window
    return visible

  def _softmax(self, scores, allowed):
    """scores [b, k, g * t, s] float32, allowed [b, t, s] -> probs [b, k, g * t, s] in the compute dtype."""
    b, kv, _, s = scores.shape
    t = allowed.shape[1]
    scores = jnp.where(allowed[:, None, None], scores.reshape(b, kv, -1, t, s), _NEG_INF)
    return jax.nn.softmax(scores, axis=-1).astype(self.cfg.dtype).reshape(b, kv, -1, s)

  def _output(self, out, t):
    """[b, k, g * t, h] attention outputs -> [b, t, d] through wo."""
    dt = jnp.dtype(self.cfg.dtype)
    b, kv, _, h = out.shape
    out = out.reshape(b, kv, -1, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, h)
    return _plus_adapter(self, 'wo', out, dense(out, self.wo[...].astype(dt), 2))


class MLP(nnx.Module):
  """Gated MLP: SwiGLU, or GeGLU with activation='gelu_tanh'."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.activation = cfg.activation
    self.gate = _param(rngs, cfg, (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'))
    self.up = _param(rngs, cfg, (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'))
    self.down = _param(rngs, cfg, (cfg.mlp_dim, cfg.d_model), ('mlp', 'embed'))
    self.lora = nnx.Dict()  # weight name -> adapter (x -> update), added by lora.py; empty: the plain model

  def __call__(self, x):
    dt = self.dtype
    gate = _plus_adapter(self, 'gate', x, dense(x, self.gate[...].astype(dt)))
    hidden = ACTIVATIONS[self.activation](gate) * _plus_adapter(self, 'up', x, dense(x, self.up[...].astype(dt)))
    hidden = constrain(hidden, ('batch', 'length', 'mlp'))  # [b, t, f], split like gate / up
    return _plus_adapter(self, 'down', hidden, dense(hidden, self.down[...].astype(dt)))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, key_mask, q_slots, layer_cache=None, cache_index=None):
    attn_out, new_cache = self.attn(self.attn_norm(x), positions, key_mask, q_slots, layer_cache, cache_index)
    x = x + attn_out
    return constrain(x + self.mlp(self.mlp_norm(x)), RESIDUAL_AXES), new_cache

  def grouped(self, xp, xc, group_size: int, *masks):
    """The block on prompts [P, p, d] run once and their completions [N, c, d] (Attention.grouped: masks are its
    positions, masks, slots and segments)."""
    ap, ac = self.attn.grouped(self.attn_norm(xp), self.attn_norm(xc), group_size, *masks)
    xp, xc = xp + ap, xc + ac
    return (constrain(xp + self.mlp(self.mlp_norm(xp)), RESIDUAL_AXES),
            constrain(xc + self.mlp(self.mlp_norm(xc)), RESIDUAL_AXES))


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    """The plain model. lora.transformer adds adapters after it, drawing from the same `rngs`: the base weights
    stay this model's, and a draw added here would shift the adapters of every seed (test_lora pins them)."""
    self.cfg = cfg
    self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None, *, remat: str = 'none') -> jax.Array:
    """Causal forward, no cache: `model(tokens)` gives the logits of unpadded sequences.

    Args:
      tokens: [b, t] int token ids.
      positions: [b, t] RoPE positions; default positions_from_mask(mask) (0 .. t-1 without padding).
      mask: [b, t] bool, False on (left) padding; default all True.
      remat: a REMAT_POLICIES name: what each block saves for a backward pass (same values, less memory).
    Returns:
      logits [b, t, v] float32.
    """
    return self.logits_from_hidden(self.hidden_states(tokens, positions, mask, remat=remat))

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    mask: jax.Array | None = None, *, remat: str = 'none') -> jax.Array:
    """__call__ without the final norm and LM head: [b, t] -> [b, t, d] in the compute dtype, so a caller can
    apply the head to a few positions at a time (logprobs.sequence_logprobs with chunk_size)."""
    mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
    positions = positions_from_mask(mask) if positions is None else positions
    return self._forward(tokens, positions, mask, None, 0, remat)[0]

  def grouped_hidden_states(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, completion_tokens: jax.Array,
                            completion_mask: jax.Array, *, remat: str = 'none', layout: PackedLayout | None = None
                            ) -> tuple[jax.Array, jax.Array]:
    """hidden_states of the rows prompt ++ completion when each prompt is shared by a group of completions, with
    each prompt run through the blocks once (not once per row): the training forward of a GRPO batch.

    Args:
      prompt_tokens, prompt_mask: [P, p] left-padded prompts, one per group.
      completion_tokens, completion_mask: [N, c] right-padded completions, N = P * G, group i's G rows contiguous
        (rows i * G .. i * G + G - 1 follow prompt i).
      remat: as in __call__.
      layout: packed rows (core/packing.py): the completion rows each hold several completions of their group, at
        the positions, slots and segments it gives; G is then the packed rows per prompt.
    Returns:
      (last_prompt_hidden [P, d], completion_hidden [N, c, d]): what hidden_states of the N rows prompt ++
      completion (positions from their mask) holds at the last prompt slot (it predicts completion token 0) and at
      the completion slots, in the compute dtype (packed: each completion's hidden states in its columns).
    """
    num_prompts, n_rows = prompt_tokens.shape[0], completion_tokens.shape[0]
    if n_rows % num_prompts:
      raise ValueError(f'{n_rows} completion rows are not a whole number of groups of {num_prompts} prompts')
    g = n_rows // num_prompts
    prompt_mask, completion_mask = prompt_mask.astype(bool), completion_mask.astype(bool)
    prompt_positions = positions_from_mask(prompt_mask)
    if layout is None:
      completion_positions = grouped_completion_positions(prompt_mask, completion_mask)
      slots = segments = None
    else:
      completion_positions, slots, segments = layout
    xp, xc = self._embed(prompt_tokens), self._embed(completion_tokens)
    masks = (prompt_positions, completion_positions, prompt_mask, completion_mask, slots, segments)
    policy = REMAT_POLICIES[remat]
    for block in self.blocks:
      if policy is None:
        xp, xc = block.grouped(xp, xc, g, *masks)
      else:
        xp, xc = _remat_grouped_block(block, xp, xc, masks, g, policy)
    return xp[:, -1], xc

  def logits_from_hidden(self, x: jax.Array) -> jax.Array:
    """Final norm + LM head: [..., d] hidden states -> [..., v] float32 logits."""
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return dense(self.final_norm(x), head.astype(self.cfg.dtype)).astype(jnp.float32)

  def forward_with_cache(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache,
                         cache_index: jax.Array | int, *, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Causal forward of t new tokens that occupy cache slots cache_index .. cache_index + t - 1 (prefill or
    decode); they attend to the earlier slots in `cache`.

    Args:
      tokens, positions, mask: [b, t] as in __call__ (all required).
      cache: KVCache with s >= cache_index + t slots.
      last_only: the LM head on the last position only (a prefill needs no more): [b, t, v] float32 logits of a
        512-token prompt batch and a 49k vocabulary are gigabytes, and XLA does not cut the head's matmul to the
        slice that is read.
    Returns:
      (logits [b, t, v] float32 ([b, 1, v] with last_only), the updated cache).
    """
    x, cache = self._forward(tokens, positions, mask.astype(bool), cache, cache_index)
    return self.logits_from_hidden(x[:, -1:] if last_only else x), cache

  def _forward(self, tokens, positions, mask, cache, cache_index, remat='none'):
    x = self._embed(tokens)
    t = tokens.shape[1]
    q_slots = cache_index + jnp.arange(t)
    key_mask = mask if cache is None else jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, cache_index, 1)
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      if cache is None and REMAT_POLICIES[remat] is not None:  # the training forward; never the sampler's
        x = _remat_block(block, x, positions, key_mask, q_slots, REMAT_POLICIES[remat])
        continue
      x, new_layer = block(x, positions, key_mask, q_slots, layer_cache, cache_index)
      if cache is not None:
        new_k.append(new_layer[0])
        new_v.append(new_layer[1])
    new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), key_mask)
    return x, new_cache

  def _embed(self, tokens):
    """[b, t] ids -> [b, t, d] embeddings in the compute dtype."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    # The table whole along d first (an fsdp all-gather, as for any weight): gathering rows of the d-split table
    # gave a d-split [b, t, d] that XLA could only re-split by batch by replicating it.
    x = constrain(self.embed[...], ('vocab', 'act_embed')).astype(dt)[tokens]
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)  # the normalizer rounded to the compute dtype, as in HF
    return constrain(x, RESIDUAL_AXES)  # batch-split, d whole: the gather from the fsdp-split table is all-gathered


def _remat_block(block: Block, x, positions, key_mask, q_slots, policy):
  """One block's uncached forward under jax.checkpoint: its backward recomputes what `policy` did not save.

  The block's state goes in as an argument (jax.checkpoint of a pure function, not nnx.remat): with LoRA its
  frozen weights and trained adapters are tracers of different levels, and nnx.remat's write-back of the state
  refused to update Variables across them. The forward mutates nothing, so there is nothing to write back."""
  graphdef, state = nnx.split(block)

  @functools.partial(jax.checkpoint, policy=policy)
  def run(state, x, positions, key_mask, q_slots):
    return nnx.merge(graphdef, state)(x, positions, key_mask, q_slots)[0]
  return run(state, x, positions, key_mask, q_slots)


def _remat_grouped_block(block: Block, xp, xc, masks, group_size: int, policy):
  """Block.grouped under jax.checkpoint, as _remat_block (the same reason for passing the state in)."""
  graphdef, state = nnx.split(block)

  @functools.partial(jax.checkpoint, policy=policy)
  def run(state, xp, xc, masks):
    return nnx.merge(graphdef, state).grouped(xp, xc, group_size, *masks)
  return run(state, xp, xc, masks)
