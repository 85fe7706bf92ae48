"""Tests of the decoder (models/transformer.py): padding, causality, KV cache, options, GQA, RoPE, config checks,
and a numpy re-implementation of the whole forward pass (the stand-in for a transformers logit match)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.models.transformer import (
  KVCache,
  ModelConfig,
  RMSNorm,
  Transformer,
  positions_from_mask,
  rope,
  rope_inv_freq,
)

TINY = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def tiny_cfg(**overrides) -> ModelConfig:
  return ModelConfig(**{**TINY, **overrides})


def randomize(model: Transformer, seed: int) -> Transformer:
  """Give every parameter a random value of a size that makes every term matter.

  The default init (std 0.02, unit norm scales, zero biases) would let a missing norm scale or bias, or a
  mixed-up head, hide below the tolerance; here all of them move the logits by O(1).
  """
  _, state = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = str(path[-1].key)
    if name == 'scale':  # effective multiplier offset + scale around 1
      return jnp.asarray(1.0 - model.cfg.norm_offset + 0.3 * rng.standard_normal(x.shape), x.dtype)
    std = 1.0 if name == 'embed' else 0.3 if name.startswith('b') else 0.25
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


def make_model(seed: int = 0, **overrides) -> Transformer:
  """Built abstractly (eager init on CPU costs seconds), then filled with random values."""
  cfg = tiny_cfg(**overrides)
  return randomize(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed))), seed + 100)


def pure_params(model: Transformer) -> dict:
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, mask):
  return nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)


def forward(model, tokens, mask) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)))


@functools.partial(jax.jit, static_argnums=0)
def _cached_forward(graphdef, state, tokens, positions, mask, cache, cache_index):
  return nnx.merge(graphdef, state).forward_with_cache(tokens, positions, mask, cache, cache_index)


def cached_forward(model, tokens, positions, mask, cache, cache_index):
  graphdef, state = nnx.split(model)
  return _cached_forward(graphdef, state, tokens, positions, mask, cache, jnp.int32(cache_index))


def left_padded_batch(rng: np.random.Generator, lengths, total: int, vocab: int = 40):
  tokens = rng.integers(0, vocab, (len(lengths), total))
  mask = np.zeros((len(lengths), total), bool)
  for i, n in enumerate(lengths):
    mask[i, total - n:] = True
  return tokens, mask


@pytest.fixture(scope='module')
def model():
  return make_model(0)


# ----------------------------------------------------------------------------------------- padding, causality

def test_left_padding_invariance(model):
  rng = np.random.default_rng(1)
  lengths = [7, 3, 5, 1]
  tokens, mask = left_padded_batch(rng, lengths, total=9)
  batch_logits = forward(model, tokens, mask)
  assert batch_logits.shape == (4, 9, 40) and batch_logits.dtype == np.float32
  assert np.all(np.isfinite(batch_logits))  # fully masked pad rows must not produce NaN
  for i, n in enumerate(lengths):
    alone = forward(model, tokens[i:i + 1, -n:], np.ones((1, n), bool))[0]
    np.testing.assert_allclose(batch_logits[i, -n:], alone, atol=1e-5, rtol=0)


def test_pad_token_ids_do_not_matter(model):
  rng = np.random.default_rng(2)
  tokens, mask = left_padded_batch(rng, [4, 6], total=8)
  other = np.where(mask, tokens, rng.integers(0, 40, tokens.shape))
  assert np.any(other != tokens)
  a, b = forward(model, tokens, mask), forward(model, other, mask)
  np.testing.assert_allclose(a[mask], b[mask], atol=1e-6, rtol=0)


def test_causality(model):
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 40, (2, 10))
  mask = np.ones_like(tokens, bool)
  base = forward(model, tokens, mask)
  for j in (0, 4, 9):
    changed = tokens.copy()
    changed[:, j] = (changed[:, j] + 7) % 40
    out = forward(model, changed, mask)
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    # ... and the change is visible from position j on (otherwise this test could not fail).
    assert np.all(np.abs(out[:, j:] - base[:, j:]).max(axis=-1) > 1e-3)


# ------------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize('lengths, hole, window', [([6, 6, 6], False, 0), ([6, 2, 4, 1], False, 0),
                                                   ([6, 2, 4, 1], True, 0), ([6, 2, 4, 1], False, 3)])
def test_kv_cache_prefill_then_decode_matches_full_forward(model, lengths, hole, window):
  if window:  # the window applies to cached slots too
    model = make_model(0, sliding_window=window)
  rng = np.random.default_rng(4)
  prompt_len, decode_len = 6, 5
  total = prompt_len + decode_len
  tokens, mask = left_padded_batch(rng, [n + decode_len for n in lengths], total=total)
  if hole:  # a masked-out token mid-decode (what the sampler feeds for finished rows) is never attended to
    mask[1, prompt_len + 1] = mask[3, prompt_len + 3] = False
  full = forward(model, tokens, mask)
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)
  positions = positions_from_mask(mask)

  # Larger than needed: slots never written must stay masked out.
  cache = KVCache.zeros(model.cfg, len(lengths), total + 3)
  logits, cache = cached_forward(model, tokens[:, :prompt_len], positions[:, :prompt_len], mask[:, :prompt_len],
                                 cache, 0)
  real = np.asarray(mask[:, :prompt_len])
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt_len][real], atol=1e-5, rtol=0)
  for j in range(prompt_len, total):
    logits, cache = cached_forward(model, tokens[:, j:j + 1], positions[:, j:j + 1], mask[:, j:j + 1], cache, j)
    assert logits.shape == (len(lengths), 1, 40)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, j], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.mask[:, :total]), np.asarray(mask))
  assert not np.asarray(cache.mask[:, total:]).any()
  assert len(cache.k) == len(cache.v) == 2  # one buffer per layer
  assert all(k.shape == (len(lengths), 2, 8, total + 3) for k in cache.k)  # [b, kv_heads, h, s]
  assert all(v.shape == (len(lengths), 2, total + 3, 8) for v in cache.v)  # [b, kv_heads, s, h]


def test_call_defaults_to_an_unpadded_batch(model):
  tokens = np.random.default_rng(15).integers(0, 40, (2, 7))
  got = np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(got, forward(model, tokens, np.ones_like(tokens, bool)), atol=1e-5, rtol=0)


def test_kv_cache_multi_token_chunks(model):
  """Chunks of several tokens written at a traced cache_index (chunked prefill)."""
  rng = np.random.default_rng(5)
  tokens, mask = left_padded_batch(rng, [9, 5], total=9)
  full = forward(model, tokens, mask)
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)
  positions = positions_from_mask(mask)
  cache = KVCache.zeros(model.cfg, 2, 9)
  outs = []
  for start, stop in ((0, 3), (3, 6), (6, 9)):
    logits, cache = cached_forward(model, tokens[:, start:stop], positions[:, start:stop], mask[:, start:stop],
                                   cache, start)
    outs.append(np.asarray(logits))
  got = np.concatenate(outs, axis=1)
  m = np.asarray(mask)
  np.testing.assert_allclose(got[m], full[m], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- options

OPTIONS = {
    'base': {},
    'qkv_bias': dict(qkv_bias=True),
    'qk_norm': dict(qk_norm=True),
    'tie_embeddings': dict(tie_embeddings=True),
    'mha': dict(num_kv_heads=4),
    'mqa': dict(num_kv_heads=1),
    'all': dict(qkv_bias=True, qk_norm=True, tie_embeddings=True, rope_theta=500.0),
    'gemma': dict(activation='gelu_tanh', norm_offset=1.0, embed_scale=True, tie_embeddings=True),
    'sliding_window': dict(sliding_window=3),
    'llama3_rope': dict(rope_type='llama3', rope_original_max_len=16, rope_factor=4.0),
}


def test_default_init():
  """One real (non-abstract) construction: norm scales 1, biases 0, weights ~ N(0, init_std)."""
  cfg = tiny_cfg(qkv_bias=True, qk_norm=True, init_std=0.05)
  m = Transformer(cfg, nnx.Rngs(0))
  attn = m.blocks[1].attn
  np.testing.assert_array_equal(np.asarray(m.final_norm.scale[...]), np.ones(32, np.float32))
  np.testing.assert_array_equal(np.asarray(attn.q_norm.scale[...]), np.ones(8, np.float32))
  np.testing.assert_array_equal(np.asarray(attn.bq[...]), np.zeros((4, 8), np.float32))
  assert abs(float(jnp.std(m.embed[...])) - 0.05) < 0.005
  assert m.embed[...].dtype == jnp.float32
  # Different layers get different weights.
  assert not np.allclose(np.asarray(m.blocks[0].attn.wq[...]), np.asarray(attn.wq[...]))
  # Gemma-style norms multiply by (1 + scale): scales start at 0.
  gemma_norm = RMSNorm(8, tiny_cfg(norm_offset=1.0), nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(gemma_norm.scale[...]), np.zeros(8, np.float32))


@pytest.mark.parametrize('name', list(OPTIONS))
def test_options_build_and_run(name):
  m = make_model(1, **OPTIONS[name])
  pure = nnx.to_pure_dict(nnx.split(m, nnx.Param)[1])
  attn = pure['blocks'][0]['attn']
  cfg = m.cfg
  assert attn['wk'].shape == (cfg.d_model, cfg.num_kv_heads, cfg.head_dim)
  assert attn['wq'].shape == (cfg.d_model, cfg.num_heads, cfg.head_dim)
  assert ('bq' in attn) == cfg.qkv_bias and ('bk' in attn) == cfg.qkv_bias
  assert ('q_norm' in attn) == cfg.qk_norm and ('k_norm' in attn) == cfg.qk_norm
  assert ('lm_head' in pure) == (not cfg.tie_embeddings)
  assert hasattr(m, 'lm_head') == (not cfg.tie_embeddings)
  tokens, mask = left_padded_batch(np.random.default_rng(6), [8, 5, 2], total=8)  # shape shared with the test below
  logits = forward(m, tokens, mask)
  assert logits.shape == (3, 8, 40) and np.all(np.isfinite(logits))


def test_tied_embeddings_use_the_embedding_as_head():
  m = make_model(2, tie_embeddings=True)
  untied = make_model(2)
  count = lambda mod: sum(x.size for x in jax.tree.leaves(nnx.split(mod, nnx.Param)[1]))
  assert count(untied) - count(m) == 32 * 40
  tokens, mask = left_padded_batch(np.random.default_rng(7), [4], total=4)
  before = forward(m, tokens, mask)
  # Changing the embedding row of a token that is not in the input changes only that token's logit.
  unused = int(np.setdiff1d(np.arange(40), tokens)[0])
  m.embed[...] = m.embed[...].at[unused].multiply(3.0)
  after = forward(m, tokens, mask)
  np.testing.assert_allclose(np.delete(after, unused, -1), np.delete(before, unused, -1), atol=1e-6)
  np.testing.assert_allclose(after[..., unused], 3.0 * before[..., unused], rtol=1e-5, atol=1e-6)


def test_qkv_bias_and_qk_norm_params_are_used():
  tokens, mask = left_padded_batch(np.random.default_rng(8), [5], total=5)
  for opts, path in ((dict(qkv_bias=True), ('bv',)), (dict(qk_norm=True), ('q_norm', 'scale'))):
    m = make_model(3, **opts)
    before = forward(m, tokens, mask)
    var = m.blocks[0].attn
    for key in path:
      var = getattr(var, key)
    var[...] = var[...] * 2.0 + 0.5
    assert np.abs(forward(m, tokens, mask) - before).max() > 1e-3, opts


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = make_model(4, num_kv_heads=2, qkv_bias=True)
  mha = make_model(9, num_kv_heads=4, qkv_bias=True)
  groups = 4 // 2
  src = nnx.to_pure_dict(nnx.split(gqa, nnx.Param)[1])
  _, dst_state = nnx.split(mha, nnx.Param)
  dst = jax.tree.map(lambda x: x, src)
  for i in src['blocks']:
    a = src['blocks'][i]['attn']
    for name, axis in (('wk', 1), ('wv', 1), ('bk', 0), ('bv', 0)):
      # Query head n reads kv head n // groups (HF repeat_kv order).
      dst['blocks'][i]['attn'][name] = jnp.repeat(a[name], groups, axis=axis)
  nnx.replace_by_pure_dict(dst_state, dst)
  nnx.update(mha, dst_state)
  tokens, mask = left_padded_batch(np.random.default_rng(10), [6, 4], total=6)
  np.testing.assert_allclose(forward(mha, tokens, mask), forward(gqa, tokens, mask), atol=1e-5, rtol=0)
  # The other repeat order (np.tile) is a different model: the check above is discriminating.
  for i in src['blocks']:
    for name in ('wk', 'wv'):
      dst['blocks'][i]['attn'][name] = jnp.tile(src['blocks'][i]['attn'][name], (1, groups, 1))
  nnx.replace_by_pure_dict(dst_state, dst)
  nnx.update(mha, dst_state)
  assert np.abs(forward(mha, tokens, mask) - forward(gqa, tokens, mask)).max() > 1e-3


# ----------------------------------------------------------------------------------------------------- RoPE

def np_inv_freq(h: int, theta: float, llama3: dict | None = None) -> np.ndarray:
  """Default RoPE frequencies; with llama3 = dict(factor, low, high, old_len), Meta's Llama 3.1 apply_scaling loop."""
  inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  if not llama3:
    return inv_freq
  out = []
  for f in inv_freq:
    wavelen = 2 * np.pi / f
    if wavelen < llama3['old_len'] / llama3['high']:
      out.append(f)
    elif wavelen > llama3['old_len'] / llama3['low']:
      out.append(f / llama3['factor'])
    else:
      smooth = (llama3['old_len'] / wavelen - llama3['low']) / (llama3['high'] - llama3['low'])
      out.append((1 - smooth) * f / llama3['factor'] + smooth * f)
  return np.asarray(out)


def np_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
  """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, [b, t, n, h] layout."""
  h = x.shape[-1]
  freqs = positions[..., None].astype(np.float64) * inv_freq
  emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = np.cos(emb), np.sin(emb)

  def rotate_half(v):
    v1, v2 = v[..., : h // 2], v[..., h // 2:]
    return np.concatenate([-v2, v1], axis=-1)

  return x * cos + rotate_half(x) * sin


def np_cfg_inv_freq(cfg: ModelConfig) -> np.ndarray:
  llama3 = dict(factor=cfg.rope_factor, low=cfg.rope_low_freq_factor, high=cfg.rope_high_freq_factor,
                old_len=cfg.rope_original_max_len) if cfg.rope_type == 'llama3' else None
  return np_inv_freq(cfg.head_dim, cfg.rope_theta, llama3)


@pytest.mark.parametrize('theta', [10000.0, 1e6, 50.0])
def test_rope_matches_hf_rotate_half(theta):
  rng = np.random.default_rng(11)
  x = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 40, (2, 6))
  inv_freq = rope_inv_freq(tiny_cfg(rope_theta=theta))
  got = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))
  np.testing.assert_allclose(got, np_rope(x.astype(np.float64), positions, np_inv_freq(8, theta)), atol=2e-5, rtol=0)
  # Rotation: norms preserved; position 0 is the identity.
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  zero = np.asarray(rope(jnp.asarray(x), jnp.zeros((2, 6), jnp.int32), inv_freq))
  np.testing.assert_allclose(zero, x, atol=1e-7)


def test_llama3_rope_frequencies_match_the_reference_loop():
  # theta and old_len chosen so the 8 frequencies fall in all three bands (kept, interpolated, stretched).
  cfg = tiny_cfg(head_dim=16, rope_type='llama3', rope_theta=10000.0, rope_factor=8.0, rope_low_freq_factor=1.0,
                 rope_high_freq_factor=4.0, rope_original_max_len=64)
  want = np_cfg_inv_freq(cfg)
  base = np_inv_freq(16, 10000.0)
  assert np.sum(want == base) >= 1 and np.sum(np.isclose(want, base / 8)) >= 1
  assert np.sum(~np.isclose(want, base) & ~np.isclose(want, base / 8)) >= 1
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(rope_inv_freq(tiny_cfg(head_dim=16))), base, rtol=1e-6)


def test_rope_relative_position_property():
  rng = np.random.default_rng(12)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32)

  def score(m, n):
    rq = rope(q, jnp.full((1, 1), m), rope_inv_freq(tiny_cfg()))
    rk = rope(k, jnp.full((1, 1), n), rope_inv_freq(tiny_cfg()))
    return np.asarray(jnp.sum(rq * rk, axis=-1))[0, 0]  # one dot product per head

  for m, n in ((5, 2), (3, 3), (2, 9)):
    for shift in (1, 17, 60):
      np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), atol=2e-5, rtol=0)
  # It does depend on the difference.
  assert np.abs(score(5, 2) - score(5, 4)).max() > 1e-3


# ------------------------------------------------------------------------------------------- config checks

@pytest.mark.parametrize('overrides, field', [
    (dict(num_heads=4, num_kv_heads=3), 'num_heads'),
    (dict(head_dim=7), 'head_dim'),
    (dict(d_model=0), 'd_model'),
    (dict(vocab_size=-1), 'vocab_size'),
    (dict(num_layers=0), 'num_layers'),
    (dict(num_kv_heads=0), 'num_kv_heads'),
    (dict(mlp_dim=0), 'mlp_dim'),
    (dict(dtype='float33'), 'dtype'),
    (dict(param_dtype='float33'), 'param_dtype'),
    (dict(model_type='gpt2'), 'model_type'),
    (dict(activation='relu'), 'activation'),
    (dict(rope_type='yarn'), 'rope_type'),
    (dict(sliding_window=-1), 'sliding_window'),
    (dict(rope_type='llama3', rope_factor=0.0), 'rope_factor'),
    (dict(rope_type='llama3', rope_low_freq_factor=4.0), 'rope_low_freq_factor'),
])
def test_bad_model_config_raises_value_error_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf'model\.{field}\b'):
    tiny_cfg(**overrides)


def test_good_model_config_is_frozen():
  cfg = tiny_cfg()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 64  # type: ignore[misc]


# ------------------------------------------------------------------------------- numpy reference forward

def np_rms(x, scale, eps, offset=0.0):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + scale)


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_forward(params: dict, cfg: ModelConfig, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The Llama / Mistral / Qwen2 / Qwen3 / Gemma decoder in float64 numpy, written from the HF modeling code, not
  from model.py."""
  b, t = tokens.shape
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  groups = cfg.num_heads // cfg.num_kv_heads
  causal = np.tril(np.ones((t, t), bool))
  if cfg.sliding_window:  # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window
    causal &= np.arange(t)[None, :] > np.arange(t)[:, None] - cfg.sliding_window
  allowed = causal[None, None] & mask[:, None, None, :].astype(bool)  # [b, 1, q, k]
  rms = functools.partial(np_rms, eps=cfg.rms_eps, offset=cfg.norm_offset)
  act = np_gelu_tanh if cfg.activation == 'gelu_tanh' else lambda g: g / (1.0 + np.exp(-g))
  inv_freq = np_cfg_inv_freq(cfg)
  x = params['embed'][tokens] * (np.sqrt(cfg.d_model) if cfg.embed_scale else 1.0)
  for i in range(cfg.num_layers):
    p = params['blocks'][i]
    a = p['attn']
    h = rms(x, p['attn_norm']['scale'])
    q = np.einsum('btd,dnh->btnh', h, a['wq'])
    k = np.einsum('btd,dkh->btkh', h, a['wk'])
    v = np.einsum('btd,dkh->btkh', h, a['wv'])
    if cfg.qkv_bias:
      q, k, v = q + a['bq'], k + a['bk'], v + a['bv']
    if cfg.qk_norm:
      q, k = rms(q, a['q_norm']['scale']), rms(k, a['k_norm']['scale'])
    q, k = np_rope(q, positions, inv_freq), np_rope(k, positions, inv_freq)
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # repeat_kv
    scores = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(allowed, scores, -1e9)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum('bnqk,bknh->bqnh', probs, v)
    x = x + np.einsum('bqnh,nhd->bqd', out, a['wo'])
    h = rms(x, p['mlp_norm']['scale'])
    x = x + (act(h @ p['mlp']['gate']) * (h @ p['mlp']['up'])) @ p['mlp']['down']
  x = rms(x, params['final_norm']['scale'])
  head = params['embed'].T if cfg.tie_embeddings else params['lm_head']
  return x @ head


@pytest.mark.parametrize('name', list(OPTIONS))
def test_matches_numpy_reference_forward(name):
  m = make_model(5, **OPTIONS[name])
  tokens, mask = left_padded_batch(np.random.default_rng(13), [8, 5, 2], total=8)
  got = forward(m, tokens, mask)
  want = np_forward(pure_params(m), m.cfg, tokens, mask)
  assert np.abs(want[mask]).max() > 1.0  # logits of a size where a wrong term would show
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=1e-5)


def test_numpy_reference_is_discriminating():
  """Sanity check of the reference test itself: a small perturbation of one weight is detected."""
  m = make_model(5)
  tokens, mask = left_padded_batch(np.random.default_rng(13), [8], total=8)
  params = pure_params(m)
  params['blocks'][1]['mlp_norm']['scale'] = params['blocks'][1]['mlp_norm']['scale'] * 1.01
  diff = np.abs(forward(m, tokens, mask) - np_forward(params, m.cfg, tokens, mask)).max()
  assert diff > 1e-3


def test_bfloat16_compute_returns_float32_logits_close_to_fp32():
  m32 = make_model(6)
  m16 = make_model(0, dtype='bfloat16')
  nnx.update(m16, nnx.split(m32, nnx.Param)[1])
  tokens, mask = left_padded_batch(np.random.default_rng(14), [6, 3], total=6)
  a, b = forward(m32, tokens, mask), forward(m16, tokens, mask)
  assert b.dtype == np.float32
  scale = np.abs(a[mask]).max()
  assert np.abs(a[mask] - b[mask]).max() < 0.1 * scale


def test_positions_from_mask():
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], bool)
  want = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0]]
  np.testing.assert_array_equal(np.asarray(positions_from_mask(mask)), want)


def test_prefill_last_only_is_the_last_position_of_the_full_head(model):
  # The sampler's prefill (last_only): a [b, 1, v] head on the last slot, the same numbers as the full head's last row.
  rng = np.random.default_rng(7)
  tokens, mask = left_padded_batch(rng, [6, 2, 4], total=6)
  positions = positions_from_mask(jnp.asarray(mask))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=0)
  def prefill(last_only, state, tokens, positions, mask):
    m = nnx.merge(graphdef, state)
    return m.forward_with_cache(tokens, positions, mask, KVCache.zeros(m.cfg, tokens.shape[0], 10), 0,
                                last_only=last_only)

  full, full_cache = prefill(False, state, jnp.asarray(tokens, jnp.int32), positions, jnp.asarray(mask))
  last, last_cache = prefill(True, state, jnp.asarray(tokens, jnp.int32), positions, jnp.asarray(mask))
  assert last.shape == (3, 1, full.shape[-1])
  np.testing.assert_array_equal(np.asarray(last[:, 0]), np.asarray(full[:, -1]))
  for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(last_cache), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
