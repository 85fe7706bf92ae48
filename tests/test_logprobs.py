"""Tests for grpo_jax.core.logprobs: token_logprobs and token_entropy against numpy; chunked sequence_logprobs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.core import logprobs
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.rollout.reference import make_sequence_logprobs_fn

# Jitted: one compile per shape instead of one per primitive (op-by-op dispatch is slow to warm up on CPU).
token_logprobs = jax.jit(logprobs.token_logprobs)
token_entropy = jax.jit(logprobs.token_entropy)


def _np_log_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_token_logprobs(logits, tokens):
  logp = _np_log_softmax(logits)
  return np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def _np_entropy(logits):
  logp = _np_log_softmax(logits)
  return -(np.exp(logp) * logp).sum(axis=-1)


@pytest.mark.parametrize('shape', [(1, 1, 2), (2, 5, 11), (3, 4, 37)])
def test_token_logprobs_matches_numpy(shape):
  rng = np.random.default_rng(shape[-1])
  logits = (3.0 * rng.normal(size=shape)).astype(np.float32)
  tokens = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
  got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  assert got.shape == shape[:-1]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _np_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)
  assert np.all(got <= 0)


def test_token_logprobs_probabilities_sum_to_one():
  # Scoring every token of the vocabulary at one position gives a full distribution.
  rng = np.random.default_rng(0)
  v = 13
  logits = rng.normal(size=(1, 1, v)).astype(np.float32)
  all_tokens = np.arange(v, dtype=np.int32).reshape(1, v)
  got = np.asarray(token_logprobs(jnp.asarray(np.repeat(logits, v, axis=1)), jnp.asarray(all_tokens)))
  np.testing.assert_allclose(np.exp(got).sum(), 1.0, rtol=1e-5)


def test_token_logprobs_shift_invariant_and_stable_for_large_logits():
  logits = np.array([[[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]]], np.float32)
  tokens = np.array([[0, 2]], np.int32)
  got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, [[0.0, -np.log(3.0)]], rtol=1e-6, atol=1e-6)
  shifted = np.asarray(token_logprobs(jnp.asarray(logits + 123.0), jnp.asarray(tokens)))
  np.testing.assert_allclose(shifted, got, atol=1e-4)


def test_token_logprobs_bfloat16_input_computes_in_float32():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = token_logprobs(bf16, jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  # Exact w.r.t. the bf16-rounded logits.
  np.testing.assert_allclose(np.asarray(got), _np_token_logprobs(np.asarray(bf16.astype(jnp.float32)), tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(1, 1, 2), (2, 5, 11), (3, 4, 37)])
def test_token_entropy_matches_numpy(shape):
  rng = np.random.default_rng(100 + shape[-1])
  logits = (2.0 * rng.normal(size=shape)).astype(np.float32)
  got = np.asarray(token_entropy(jnp.asarray(logits)))
  assert got.shape == shape[:-1]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, _np_entropy(logits), rtol=1e-5, atol=1e-5)
  assert np.all(got >= -1e-6) and np.all(got <= np.log(shape[-1]) + 1e-5)


def test_token_entropy_extremes():
  v = 8
  uniform = np.zeros((1, 1, v), np.float32)
  np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(uniform))), [[np.log(v)]], rtol=1e-6)
  peaked = np.full((1, 1, v), -1e4, np.float32)
  peaked[..., 3] = 1e4
  np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(peaked))), [[0.0]], atol=1e-6)
  # Two equally likely tokens: log 2.
  two = np.full((1, 1, v), -1e4, np.float32)
  two[..., [1, 5]] = 0.0
  np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(two))), [[np.log(2.0)]], rtol=1e-6)


# --- sequence_logprobs(chunk_size=...): the LM head a few positions at a time -------------------------------


def _model_and_batch(vocab, b, p, c, num_layers=1):
  """A tiny Transformer (abstract build + random numpy weights: eager init is slow on CPU) and a padded batch."""
  cfg = ModelConfig(vocab_size=vocab, d_model=32, num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(vocab)
  draw = lambda path, x: (1.0 + 0.1 * rng.standard_normal(x.shape) if str(path[-1].key) == 'scale'  # noqa: E731
                          else 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params)))
  prompt_mask = (np.arange(p)[None] >= rng.integers(0, p - 1, (b, 1))).astype(np.int32)
  completion_mask = (np.arange(c)[None] < rng.integers(1, c + 1, (b, 1))).astype(np.int32)
  batch = (rng.integers(1, vocab, (b, p)).astype(np.int32), prompt_mask,
           rng.integers(1, vocab, (b, c)).astype(np.int32), completion_mask)
  return graphdef, params, batch


def _logprob_loss(graphdef, chunk_size):
  """(params, batch) -> (sum of masked logprobs, (logprobs, entropy)), for value_and_grad."""
  def loss(params, batch):
    lp, ent = logprobs.sequence_logprobs(nnx.merge(graphdef, params), *batch, return_entropy=True,
                                         chunk_size=chunk_size)
    return (lp * batch[3]).sum(), (lp, ent)
  return jax.value_and_grad(loss, has_aux=True)


def test_chunked_sequence_logprobs_match_unchunked():
  # c = 7 completion positions in chunks of 3: the last chunk is padded.
  graphdef, params, batch = _model_and_batch(vocab=50, b=3, p=5, c=7)

  def both(params, batch):
    # The last: without the entropy (the path the SFT loss takes).
    only = logprobs.sequence_logprobs(nnx.merge(graphdef, params), *batch, chunk_size=3)
    return _logprob_loss(graphdef, 0)(params, batch), _logprob_loss(graphdef, 3)(params, batch), only

  ((_, (lp, ent)), grads), ((_, (lp_c, ent_c)), grads_c), only = jax.jit(both)(params, batch)
  assert lp_c.shape == ent_c.shape == (3, 7)
  np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent), rtol=1e-5, atol=1e-5)
  for g_c, g in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(g_c), np.asarray(g), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(only), np.asarray(lp), rtol=1e-5, atol=1e-5)


def test_chunked_logprobs_never_hold_the_full_logits():
  # 4 x 128 completion positions x 8192 vocab: their float32 logits alone are 16 MiB.
  b, c, v = 4, 128, 8192
  graphdef, params, batch = _model_and_batch(vocab=v, b=b, p=8, c=c)
  temp = {chunk: jax.jit(_logprob_loss(graphdef, chunk)).lower(params, batch).compile().memory_analysis()
          .temp_size_in_bytes for chunk in (0, 8)}
  print(f'logprobs + grad temp bytes by chunk size: {temp}')
  logits_bytes = b * c * v * 4
  assert temp[0] > logits_bytes  # unchunked: the logits (and their gradient) exist
  # Chunked: a few [b, 8, v] chunks at a time. Measured 73.0 MB unchunked, 5.8 MB chunked (jax 0.10.2).
  assert temp[8] < logits_bytes / 2, temp


# --- make_sequence_logprobs_fn(num_micro_batches=...): the reference forward a few rows at a time --------------


@pytest.mark.parametrize('k,chunk_size', [(2, 0), (3, 3), (12, 0)])
def test_micro_batched_reference_forward_matches_whole_batch(k, chunk_size):
  graphdef, params, batch = _model_and_batch(vocab=50, b=12, p=5, c=7)
  whole = make_sequence_logprobs_fn(graphdef)(params, *batch)
  micro = make_sequence_logprobs_fn(graphdef, num_micro_batches=k, chunk_size=chunk_size)(params, *batch)
  assert micro.shape == (12, 7)
  np.testing.assert_allclose(np.asarray(micro), np.asarray(whole), rtol=1e-5, atol=1e-5)  # rows in their order


def test_micro_batched_reference_forward_holds_one_micro_batch():
  graphdef, params, batch = _model_and_batch(vocab=4096, b=16, p=8, c=64)
  temp = {k: make_sequence_logprobs_fn(graphdef, num_micro_batches=k).lower(params, *batch).compile()
          .memory_analysis().temp_size_in_bytes for k in (1, 8)}
  logits_bytes = 16 * 64 * 4096 * 4  # the whole batch's float32 completion logits
  # Measured 35.7 MB whole, 4.5 MB in 8 micro-batches (jax 0.10.2).
  assert temp[1] > logits_bytes and temp[8] < min(temp[1] / 4, logits_bytes / 2), temp


def test_micro_batches_must_split_the_rows():
  graphdef, params, batch = _model_and_batch(vocab=50, b=12, p=5, c=7)
  with pytest.raises(ValueError, match='12 rows .* num_micro_batches=5'):
    make_sequence_logprobs_fn(graphdef, num_micro_batches=5)(params, *batch)
