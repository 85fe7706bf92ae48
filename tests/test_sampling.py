"""Tests of the KV-cached sampler (grpo_jax/rollout/sampling.py) against full forward passes of the same model."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax.core.logprobs import positions_from_mask, sequence_logprobs
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.rollout.sampling import filter_logits, make_sampler

VOCAB, PAD = 40, 0
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
EOS = 5
NEVER = -1  # an eos_id no token equals: rows run to max_new_tokens


def build_model(seed: int = 0) -> Transformer:
  """Abstract build (fast) filled with random weights big enough for peaked, position-dependent logits."""
  model = nnx.eval_shape(lambda: Transformer(CFG, nnx.Rngs(seed)))
  _, state = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = str(path[-1].key)
    if name == 'scale':
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray((1.0 if name == 'embed' else 0.3) * rng.standard_normal(x.shape), x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


@pytest.fixture(scope='module')
def model():
  return build_model(0)


@pytest.fixture(scope='module')
def split(model):
  return nnx.split(model, nnx.Param)


# Each distinct set of static options compiles the sampler once (seconds on CPU); the tests share a few.
DEFAULTS = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=1.0, top_k=0, top_p=1.0, greedy=False)


@functools.cache
def _sampler(graphdef, static: tuple):
  return make_sampler(graphdef, **dict(static))


def run(split, prompts, mask, seed=0, **static):
  graphdef, params = split
  sampler = _sampler(graphdef, tuple(sorted({**DEFAULTS, **static}.items())))
  return jax.tree.map(np.asarray, sampler(params, prompts, mask, jax.random.key(seed)))


def prompts_batch(seed=1, lengths=(6, 2, 4, 1, 5, 3, 6, 2), p=6):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (len(lengths), p)).astype(np.int32)
  mask = np.zeros((len(lengths), p), np.int32)
  for i, n in enumerate(lengths):
    mask[i, p - n:] = 1
  return np.where(mask, tokens, PAD).astype(np.int32), mask


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, tokens, mask):
  mask = mask.astype(bool)
  return nnx.merge(graphdef, params)(tokens, positions_from_mask(mask), mask)


def completion_logits(split, prompts, prompt_mask, out) -> np.ndarray:
  """Full-forward logits that predict each completion token: [b, c, v]."""
  tokens = np.concatenate([prompts, out.tokens], axis=1)
  mask = np.concatenate([prompt_mask, out.mask], axis=1)
  logits = np.asarray(_full_logits(split[0], split[1], tokens, mask))
  return logits[:, prompts.shape[1] - 1:-1]


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------------------------- logprobs

FILTERS = {
    'plain': dict(temperature=1.0),
    'filtered': dict(temperature=0.7, top_k=5, top_p=0.9),
}


@pytest.mark.parametrize('name', list(FILTERS))
def test_sampler_logprobs_match_full_forward(model, split, name):
  """Completions.logprobs is documented as log pi(token) under the model's own temperature-1 distribution, with
  no top-k / top-p, whatever the sampling filters: that is the pi_old of the GRPO ratio."""
  prompts, prompt_mask = prompts_batch()
  out = run(split, prompts, prompt_mask, **FILTERS[name])
  assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (8, 10)
  assert out.tokens.dtype == np.int32 and out.logprobs.dtype == np.float32
  full = np.asarray(sequence_logprobs(model, jnp.asarray(prompts), jnp.asarray(prompt_mask), jnp.asarray(out.tokens),
                                      jnp.asarray(out.mask)))
  m = out.mask.astype(bool)
  np.testing.assert_allclose(out.logprobs[m], full[m], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out.logprobs[~m], 0.0)
  assert np.all(out.logprobs[m] < 0)

  logits = completion_logits(split, prompts, prompt_mask, out)
  np.testing.assert_allclose(np.take_along_axis(log_softmax(logits), out.tokens[..., None], -1)[..., 0][m], full[m],
                             atol=1e-4)
  if name == 'filtered':
    f = FILTERS[name]
    # Every sampled token lies in the top-k of its step ...
    rank = (logits > np.take_along_axis(logits, out.tokens[..., None], -1)).sum(-1)
    assert np.all(rank[m] < f['top_k'])
    # ... and in the nucleus of the temperature-scaled, top-k-truncated distribution.
    scaled = logits / f['temperature']
    kth = np.sort(scaled, axis=-1)[..., -f['top_k']][..., None]
    probs = np.exp(log_softmax(np.where(scaled < kth, -np.inf, scaled)))
    order = np.argsort(-probs, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
    pos = np.argmax(order == out.tokens[..., None], axis=-1)
    assert np.all(np.take_along_axis(mass_before, pos[..., None], -1)[..., 0][m] < f['top_p'])
    # The filtered distribution's logprobs are different numbers, so the first check above discriminates.
    filtered_lp = np.take_along_axis(log_softmax(np.asarray(filter_logits(
        jnp.asarray(logits.reshape(-1, VOCAB)), **f))).reshape(logits.shape), out.tokens[..., None], -1)[..., 0]
    assert np.abs(filtered_lp[m] - full[m]).max() > 1e-2


# --------------------------------------------------------------------------------------------------- greedy

def naive_greedy(split, prompts, prompt_mask, *, max_new_tokens, eos_id, pad_id):
  """No cache: re-run the full forward over [prompt | generated so far] each step and take the argmax.

  The buffer has a fixed width so the forward compiles once; not-yet-generated slots are masked out and lie
  after the query (causal), so they cannot influence it.
  """
  b, p = prompts.shape
  tokens = np.concatenate([prompts, np.full((b, max_new_tokens), pad_id, np.int32)], axis=1)
  mask = np.concatenate([prompt_mask, np.zeros((b, max_new_tokens), np.int32)], axis=1)
  done = np.zeros(b, bool)
  for i in range(max_new_tokens):
    logits = np.asarray(_full_logits(split[0], split[1], tokens, mask))[:, p + i - 1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-4), 'near tie: pick another seed'
    token = np.where(done, pad_id, logits.argmax(-1))
    tokens[:, p + i] = token
    mask[:, p + i] = ~done
    done |= token == eos_id
  return tokens[:, p:], mask[:, p:]


def test_greedy_with_cache_equals_greedy_without_cache(split):
  prompts, prompt_mask = prompts_batch(seed=2)
  want_tokens, want_mask = naive_greedy(split, prompts, prompt_mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD)
  # The data covers both rows that stop at EOS and rows that run to the end.
  assert 0 < (want_mask.sum(-1) < 10).sum() < 8
  out = run(split, prompts, prompt_mask, greedy=True)
  np.testing.assert_array_equal(out.tokens, want_tokens)
  np.testing.assert_array_equal(out.mask, want_mask)
  # Greedy is deterministic: the rng does not matter.
  again = run(split, prompts, prompt_mask, seed=123, greedy=True)
  np.testing.assert_array_equal(again.tokens, out.tokens)


@pytest.mark.parametrize('block', [3, 4])  # 10 new tokens: blocks of 3,3,3,1 and 4,4,2
def test_decode_blocks_give_the_same_completions(split, block):
  """A cache grown block by block (attention over fewer slots) changes nothing but float rounding."""
  prompts, prompt_mask = prompts_batch(seed=2)
  want_tokens, want_mask = naive_greedy(split, prompts, prompt_mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD)
  greedy = run(split, prompts, prompt_mask, greedy=True, decode_block=block)
  np.testing.assert_array_equal(greedy.tokens, want_tokens)
  np.testing.assert_array_equal(greedy.mask, want_mask)
  sampled = run(split, prompts, prompt_mask, seed=5, decode_block=block)
  whole = run(split, prompts, prompt_mask, seed=5)
  np.testing.assert_array_equal(sampled.tokens, whole.tokens)
  np.testing.assert_array_equal(sampled.mask, whole.mask)
  np.testing.assert_allclose(sampled.logprobs, whole.logprobs, rtol=0, atol=1e-5)
  assert 0 < (whole.mask.sum(-1) < 10).sum()  # some rows stop at EOS inside a block


@pytest.mark.parametrize('check_every', [1, 3, 16])  # 10 new tokens: checks at every step, mid-block, never
@pytest.mark.parametrize('block', [0, 4])
def test_how_often_the_all_done_check_runs_changes_nothing(split, block, check_every):
  """Decoding a few steps between checks of all(done) only adds steps after the last EOS: same completions."""
  prompts, prompt_mask = prompts_batch(seed=2)
  want = run(split, prompts, prompt_mask, seed=5, decode_block=block, stop_check_every=1)
  got = run(split, prompts, prompt_mask, seed=5, decode_block=block, stop_check_every=check_every)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert 0 < (want.mask.sum(-1) < 10).sum()  # some rows stop at EOS
  # One row whose EOS is its second token (or first): every row is done early, and the loop runs on to its check.
  free = run(split, prompts[:1], prompt_mask[:1], seed=5, decode_block=block, eos_id=NEVER)
  stopped = run(split, prompts[:1], prompt_mask[:1], seed=5, decode_block=block, stop_check_every=check_every,
                eos_id=int(free.tokens[0, 1]))
  n = int(stopped.mask.sum())
  assert 1 <= n <= 2 and np.all(stopped.tokens[0, :n] == free.tokens[0, :n])
  assert np.all(stopped.tokens[0, n:] == PAD) and np.all(stopped.logprobs[0, n:] == 0)


def test_stop_check_every_must_be_positive(split):
  prompts, prompt_mask = prompts_batch(seed=2)
  with pytest.raises(ValueError, match='stop_check_every must be an int >= 1'):
    run(split, prompts, prompt_mask, stop_check_every=0)  # 0 would never advance the decode loop


def test_top_k_1_equals_greedy(split):
  prompts, prompt_mask = prompts_batch(seed=3)
  greedy = run(split, prompts, prompt_mask, greedy=True)
  top1 = run(split, prompts, prompt_mask, seed=9, temperature=0.5, top_k=1)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_array_equal(top1.mask, greedy.mask)
  np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ EOS

def test_per_sequence_eos_stop(split):
  """Rows stop at their own first EOS; the others are unaffected (same rng => same draws as without EOS)."""
  prompts, prompt_mask = prompts_batch(seed=4)
  free = run(split, prompts, prompt_mask, seed=5, eos_id=NEVER)
  assert np.all(free.mask == 1)
  # An EOS that row 0 draws early, so at least one row stops (whatever the platform's random numbers).
  eos = int(next(t for i, t in enumerate(free.tokens[0]) if i >= 2 and t not in free.tokens[0, :i]))
  pad_id = 7
  out = run(split, prompts, prompt_mask, seed=5, eos_id=eos, pad_id=pad_id)
  stopped = 0
  for row in range(prompts.shape[0]):
    hits = np.flatnonzero(free.tokens[row] == eos)
    end = hits[0] + 1 if hits.size else 10  # tokens kept, the EOS included
    stopped += end < 10
    np.testing.assert_array_equal(out.tokens[row, :end], free.tokens[row, :end])
    np.testing.assert_allclose(out.logprobs[row, :end], free.logprobs[row, :end], atol=1e-6)
    assert np.all(out.mask[row, :end] == 1)  # the EOS itself is part of the completion
    assert np.all(out.tokens[row, end:] == pad_id)
    assert np.all(out.mask[row, end:] == 0)
    assert np.all(out.logprobs[row, end:] == 0)
    if hits.size:
      assert out.tokens[row, end - 1] == eos and eos not in out.tokens[row, :end - 1]
  assert stopped >= 1


def test_any_of_several_stop_tokens_ends_a_row(split):
  """eos_id as a tuple (EOS plus e.g. an end-of-turn token): a row ends at the first of any of them."""
  prompts, prompt_mask = prompts_batch(seed=4)
  free = run(split, prompts, prompt_mask, seed=5, eos_id=NEVER)
  stops = (int(free.tokens[0, 2]), int(free.tokens[1, 3]))
  out = run(split, prompts, prompt_mask, seed=5, eos_id=stops)
  for row in range(prompts.shape[0]):
    hits = np.flatnonzero(np.isin(free.tokens[row], stops))
    end = hits[0] + 1 if hits.size else 10
    np.testing.assert_array_equal(out.tokens[row, :end], free.tokens[row, :end])
    assert out.mask[row].sum() == end
  assert out.mask[0].sum() <= 3 and out.mask[1].sum() <= 4


def test_max_new_tokens_respected(split):
  prompts, prompt_mask = prompts_batch(seed=6)
  short = run(split, prompts, prompt_mask, greedy=True, max_new_tokens=3)
  assert short.tokens.shape == short.mask.shape == short.logprobs.shape == (8, 3)
  long = run(split, prompts, prompt_mask, greedy=True)
  assert long.tokens.shape == (8, 10)
  # Greedy does not use the rng, so a shorter run is a prefix of a longer one.
  np.testing.assert_array_equal(short.tokens, long.tokens[:, :3])
  np.testing.assert_array_equal(short.mask, long.mask[:, :3])


# ----------------------------------------------------------------------------------------------- randomness

def test_determinism(split):
  prompts, prompt_mask = prompts_batch(seed=7)
  a = run(split, prompts, prompt_mask, seed=11)
  b = run(split, prompts, prompt_mask, seed=11)
  c = run(split, prompts, prompt_mask, seed=12)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert np.mean(a.tokens != c.tokens) > 0.3


def test_samples_follow_the_model_distribution(split):
  """Many draws of the first token of one prompt: empirical frequencies match softmax(logits / T)."""
  prompts, prompt_mask = prompts_batch(seed=8, lengths=(4,))
  n, temperature = 4096, 0.7
  out = run(split, np.repeat(prompts, n, 0), np.repeat(prompt_mask, n, 0), seed=13, max_new_tokens=1,
            temperature=temperature, eos_id=NEVER)
  logits = np.asarray(_full_logits(split[0], split[1], prompts, prompt_mask))[0, -1]
  probs = np.exp(log_softmax(logits / temperature))
  freq = np.bincount(out.tokens[:, 0], minlength=VOCAB) / n
  assert np.abs(freq - probs).max() < 4 * np.sqrt(probs.max() / n) + 1e-3
  # Temperature 1 would give detectably different frequencies (the check discriminates).
  probs1 = np.exp(log_softmax(logits))
  assert np.abs(probs1 - probs).max() > 8 * np.sqrt(probs.max() / n)


# ----------------------------------------------------------------------------------------------- filtering

def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0]
  np.testing.assert_array_equal(keep(temperature=1.0), [1, 1, 1, 1, 1])
  np.testing.assert_array_equal(keep(temperature=1.0, top_k=2), [1, 1, 0, 0, 0])
  # Smallest prefix whose mass reaches top_p.
  np.testing.assert_array_equal(keep(temperature=1.0, top_p=0.45), [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(keep(temperature=1.0, top_p=0.6), [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(keep(temperature=1.0, top_p=0.8), [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(keep(temperature=1.0, top_k=2, top_p=0.99), [1, 1, 0, 0, 0])
  scaled = np.asarray(filter_logits(logits, temperature=0.5))
  np.testing.assert_allclose(scaled, np.asarray(logits) / 0.5, rtol=1e-6)


def test_group_sampling_shares_the_prefill_and_equals_repeated_prompts(model, split):
  # group_size=G prefills each prompt once and repeats its cache; that must be the same as sampling from the
  # prompts repeated G times (greedy: same tokens; sampled: same logprobs as a full forward pass).
  prompts, mask = prompts_batch(lengths=(6, 2, 4))
  group = 3
  grouped = run(split, prompts, mask, greedy=True, group_size=group)
  repeated = run(split, np.repeat(prompts, group, 0), np.repeat(mask, group, 0), greedy=True)
  assert grouped.tokens.shape == (9, DEFAULTS['max_new_tokens'])
  np.testing.assert_array_equal(grouped.tokens, repeated.tokens)
  np.testing.assert_allclose(grouped.logprobs, repeated.logprobs, atol=1e-5)

  sampled = run(split, prompts, mask, seed=4, group_size=group)
  assert len({tuple(row) for row in sampled.tokens[:group]}) > 1  # the G samples of a prompt differ
  forward = sequence_logprobs(model, np.repeat(prompts, group, 0), np.repeat(mask, group, 0), sampled.tokens,
                              sampled.mask)
  live = sampled.mask.astype(bool)
  np.testing.assert_allclose(sampled.logprobs[live], np.asarray(forward)[live], atol=1e-4)


def test_sampler_with_param_shardings_needs_the_mesh(model):
  from grpo_jax.parallel import sharding
  graphdef, params = nnx.split(model, nnx.Param)
  shardings = sharding.tree_shardings(params, sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}))
  with pytest.raises(ValueError, match='param_shardings needs the mesh'):
    make_sampler(graphdef, param_shardings=shardings, max_new_tokens=2, eos_id=1, pad_id=0)
