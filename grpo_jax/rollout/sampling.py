"""Group sampling: prefill the prompts once, then decode all completions in a compiled `while_loop`.

`sample` is a pure function of (model, prompts, rng); jit it with `jax.jit(sample, static_argnames=...)`
or through `make_sampler`. It compiles once per (batch, prompt length, max_new_tokens) shape.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.core.logprobs import positions_from_mask, token_logprobs
from grpo_jax.models.transformer import KVCache, Transformer
from grpo_jax.parallel import sharding


class Completions(NamedTuple):
  tokens: jax.Array  # [b, c] int32; pad_id after EOS
  mask: jax.Array  # [b, c] int32; 1 on generated tokens, the EOS included
  logprobs: jax.Array  # [b, c] float32; log pi(token) under the model's own (temperature 1) distribution


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Temperature, then top-k (0 = off), then nucleus top-p (1.0 = off). logits [b, v] -> [b, v]."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
           max_new_tokens: int, eos_id: int | tuple[int, ...], pad_id: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, greedy: bool = False, group_size: int = 1,
           decode_block: int = 0, stop_check_every: int = 8) -> Completions:
  """Sample `group_size` completions per prompt; each prompt's prefill runs once and its KV cache is shared.

  Args:
    model: the policy.
    prompt_tokens: [num_prompts, p] left-padded prompt ids.
    prompt_mask: [num_prompts, p] 1 on real tokens.
    rng: PRNG key.
    eos_id: the token (or tuple of tokens: instruct models often end a turn with several) that ends a row.
    greedy: argmax decoding (temperature / top-k / top-p ignored).
    group_size: G, completions per prompt.
    decode_block: 0: one loop, attending over all p + max_new_tokens cache slots at every step. k > 0: one loop
      per k new tokens, the cache grown by k slots between them, so attention reads about half the slots on
      average over a long completion (same tokens). Costs one more compiled loop per block and memory: XLA
      gives each loop its own cache buffer (the 7B plan's numbers: benchmarks/RESULTS.md).
    stop_check_every: decode up to this many tokens between checks for "every row has ended" (same completions;
      at most this many - 1 steps run after the last EOS). On a batch split over devices each check is an
      all-reduce that syncs them, so checking less often is faster (benchmarks/RESULTS.md).
  Returns:
    Completions with arrays [num_prompts * G, max_new_tokens]; rows i*G .. i*G + G-1 answer prompt i (groups
    contiguous). Rows stop at their own EOS.
  """
  if not isinstance(stop_check_every, int) or stop_check_every < 1:
    raise ValueError(f'stop_check_every must be an int >= 1, got {stop_check_every!r}')
  num_prompts, p = prompt_tokens.shape
  b = num_prompts * group_size
  prompt_mask = prompt_mask.astype(bool)
  ends = [max_new_tokens]  # each loop's last step (exclusive): its cache holds p + end slots
  if decode_block:
    ends = list(range(decode_block, max_new_tokens, decode_block)) + [max_new_tokens]
  cache = KVCache.zeros(model.cfg, num_prompts, p + ends[0])
  positions = positions_from_mask(prompt_mask)
  logits, cache = model.forward_with_cache(prompt_tokens, positions, prompt_mask, cache, 0, last_only=True)
  next_position = positions[:, -1] + 1  # [num_prompts]
  if group_size > 1:  # the group's G samples continue from one prefill
    logits, cache, next_position = jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0),
                                                (logits, cache, next_position))

  def pick(logits, key):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

  keys = jax.random.split(rng, max_new_tokens)
  empty = jnp.zeros((b, max_new_tokens), jnp.int32)

  def keep_going(carry, end):
    step, done = carry[3] - p, carry[4]
    return (step < end) & ~jnp.all(done)  # stop early once every row has emitted EOS

  def decode_one(carry):
    last_logits, cache, position, slot, done, tokens, live, logprobs = carry
    step = slot - p
    token = pick(last_logits, keys[step])
    logprob = token_logprobs(last_logits, token)
    alive = ~done
    token = jnp.where(alive, token, pad_id)
    logits, cache = model.forward_with_cache(token[:, None], position[:, None], alive[:, None], cache, slot)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, 1)
    live = jax.lax.dynamic_update_index_in_dim(live, alive.astype(jnp.int32), step, 1)
    logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, jnp.where(alive, logprob, 0.0), step, 1)
    done = done | jnp.isin(token, jnp.asarray(eos_id))
    return logits[:, -1], cache, position + 1, slot + 1, done, tokens, live, logprobs

  init = (logits[:, -1], cache, next_position, jnp.int32(p), jnp.zeros((b,), bool),
          jnp.full_like(empty, pad_id), empty, empty.astype(jnp.float32))

  def decode_some(carry, end):
    # Up to stop_check_every tokens between checks of all(done): over a batch split across devices that check is
    # an all-reduce, and each one makes every device wait for the slowest. Steps past the last EOS change nothing.
    count = jnp.minimum(stop_check_every, end - (carry[3] - p))
    return jax.lax.fori_loop(0, count, lambda _, c: decode_one(c), carry)

  carry = init
  for i, end in enumerate(ends):
    if i:  # the next block's slots; a loop that stopped early (all rows done) leaves the rest to stop at once
      carry = (carry[0], carry[1].grow(p + end), *carry[2:])
    carry = jax.lax.while_loop(lambda c, end=end: keep_going(c, end), lambda c, end=end: decode_some(c, end), carry)
  *_, tokens, live, logprobs = carry
  return Completions(tokens, live, logprobs)


def make_sampler(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES, **static):
  """jit-compiled sample(params, prompt_tokens, prompt_mask, rng) with the keyword options (max_new_tokens,
  eos_id, pad_id, temperature, top_k, top_p, greedy, group_size) fixed.

  With `param_shardings` and `mesh`: prompts shard over the batch axes, activations and the KV cache follow
  `rules`, and params are first moved to `param_shardings` (sharding.reshard; a no-op when already there). So
  the sampler may keep its own layout, e.g. weights not split over fsdp: no all-gather per decoded token.
  """
  def sampler(params, prompt_tokens, prompt_mask, rng):
    return sample(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, rng, **static)

  if param_shardings is None:
    return sharding.jit_sharded(sampler, mesh, rules)
  jitted = sharding.jit_sharded(sampler, mesh, rules, (param_shardings, 'batch', 'batch', 'replicated'),
                                where='make_sampler')
  return lambda params, *args: jitted(sharding.reshard(params, param_shardings), *args)
