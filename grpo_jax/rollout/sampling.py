"""Group sampling: prefill the prompts once, then decode all completions in compiled `while_loop`s.

`sample` is a pure function of (model, prompts, rng); jit it with `jax.jit(sample, static_argnames=...)`
or through `make_sampler`. It compiles once per (batch, prompt length, max_new_tokens) shape.

`make_sampler(..., decode_buckets=k)` with k > 1 and decode blocks: the host drives the blocks, and at each block
boundary moves the rows still decoding into the smallest of k batch sizes (b, b/2, b/4, ...) that holds them, so
rows that have ended stop costing decode steps. Same tokens as `sample` for greedy and for a given key; at most
k x (number of blocks) decode programs (CompactingSampler).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.core.logprobs import positions_from_mask, token_logprobs
from grpo_jax.models.transformer import KEY_AXES, VALUE_AXES, KVCache, Transformer
from grpo_jax.parallel import sharding


class Completions(NamedTuple):
  tokens: jax.Array  # [b, c] int32; pad_id after EOS
  mask: jax.Array  # [b, c] int32; 1 on generated tokens, the EOS included
  logprobs: jax.Array  # [b, c] float32; log pi(token) under the model's own (temperature 1) distribution


class Options(NamedTuple):
  """The sampler's static options (hashable: a jit static argument)."""
  max_new_tokens: int
  eos_id: int | tuple[int, ...]
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_check_every: int = 8


class DecodeState(NamedTuple):
  """The decode loop's carry over the n rows it holds: the whole batch, or a bucket of its rows."""
  logits: jax.Array  # [n, v] float32: each row's next-token logits
  cache: KVCache  # n rows, p + (the current block's end) slots
  position: jax.Array  # [n] int32: each row's next position
  done: jax.Array  # [n] bool: the row has ended (EOS, or its length cap)
  cap: jax.Array | None  # [n] int32: tokens the row may emit (None: max_new_tokens)
  slot: jax.Array  # [] int32: the cache slot of the next token (p + step)
  step: jax.Array  # [] int32: new tokens decoded so far (the same for every row)


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


def block_spans(max_new_tokens: int, decode_block: int) -> list[tuple[int, int]]:
  """[(start, end)] of each decode loop's steps: one loop (decode_block 0), or blocks of decode_block steps."""
  ends = [max_new_tokens]
  if decode_block:
    ends = list(range(decode_block, max_new_tokens, decode_block)) + [max_new_tokens]
  return list(zip([0] + ends[:-1], ends, strict=True))


def prefill(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, max_lengths: jax.Array | None,
            *, group_size: int, slots: int) -> DecodeState:
  """Each prompt's forward once, its KV cache (p + slots slots) and last logits repeated over its group of G rows.
  prompt_tokens, prompt_mask [num_prompts, p]; max_lengths [num_prompts * G] int or None."""
  num_prompts, p = prompt_tokens.shape
  prompt_mask = prompt_mask.astype(bool)
  cache = KVCache.zeros(model.cfg, num_prompts, p + slots)
  positions = positions_from_mask(prompt_mask)
  logits, cache = model.forward_with_cache(prompt_tokens, positions, prompt_mask, cache, 0, last_only=True)
  next_position = positions[:, -1] + 1  # [num_prompts]
  if group_size > 1:  # the group's G samples continue from one prefill
    logits, cache, next_position = jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0),
                                                (logits, cache, next_position))
  b = num_prompts * group_size
  done = jnp.zeros((b,), bool)
  if max_lengths is not None:
    if jnp.shape(max_lengths) != (b,):
      raise ValueError(f'max_lengths must hold one length per row, [{b}] ({num_prompts} prompts x G={group_size}); '
                       f'got shape {jnp.shape(max_lengths)}')
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    done = max_lengths <= 0
  return DecodeState(logits[:, -1], cache, next_position, done, max_lengths, jnp.int32(p), jnp.int32(0))


def empty_completions(b: int, max_new_tokens: int, pad_id: int) -> Completions:
  empty = jnp.zeros((b, max_new_tokens), jnp.int32)
  return Completions(jnp.full_like(empty, pad_id), empty, empty.astype(jnp.float32))


def decode_span(model: Transformer, state: DecodeState, out: Completions, rows: jax.Array | None, rng: jax.Array, *,
                start: int, end: int, opts: Options) -> tuple[DecodeState, Completions]:
  """Decode steps start .. end - 1 for the rows `state` holds (stopping once all of them have ended) and write them
  into `out` [b, c].

  rows: None when `state` holds the whole batch in order; else [n] int32, the batch row each of its rows is. The
  cache is grown to the block's slots first when it has fewer (a block after the first).
  """
  b, n, width = out.tokens.shape[0], state.done.shape[0], end - start
  if start:  # the next block's slots (empty, masked)
    state = state._replace(cache=state.cache.grow(state.cache.mask.shape[1] + width))
  keys = jax.random.split(rng, opts.max_new_tokens)
  eos = jnp.asarray(opts.eos_id)

  def pick(logits, key):
    if opts.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    if rows is None:
      return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    # One key draws the noise of the whole [b, v] batch, so a row's draw depends on b and on its row: draw it as
    # the whole batch would, the held rows in their places, and keep theirs (jax's categorical is row by row).
    whole = jnp.zeros((b, filtered.shape[-1]), filtered.dtype).at[rows].set(filtered)
    return jax.random.categorical(key, whole, axis=-1)[rows].astype(jnp.int32)

  def decode_one(carry):
    s, block = carry
    token = pick(s.logits, keys[s.step])
    logprob = token_logprobs(s.logits, token)
    alive = ~s.done
    token = jnp.where(alive, token, opts.pad_id)
    logits, cache = model.forward_with_cache(token[:, None], s.position[:, None], alive[:, None], s.cache, s.slot)
    new = (token, alive.astype(jnp.int32), jnp.where(alive, logprob, 0.0))
    block = jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, s.step - start, 1), block,
                         Completions(*new))
    done = s.done | jnp.isin(token, eos)
    if s.cap is not None:
      done = done | (s.step + 1 >= s.cap)
    return DecodeState(logits[:, -1], cache, s.position + 1, done, s.cap, s.slot + 1, s.step + 1), block

  def keep_going(carry):
    return (carry[0].step < end) & ~jnp.all(carry[0].done)  # stop early once every row has ended

  def decode_some(carry):
    # Up to stop_check_every tokens between checks of all(done): over a batch split across devices that check is
    # an all-reduce, and each one makes every device wait for the slowest. Steps past the last EOS change nothing.
    count = jnp.minimum(opts.stop_check_every, end - carry[0].step)
    return jax.lax.fori_loop(0, count, lambda _, c: decode_one(c), carry)

  state, block = jax.lax.while_loop(keep_going, decode_some, (state, empty_completions(n, width, opts.pad_id)))
  if rows is None:
    out = jax.tree.map(lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, start, 1), out, block)
  else:
    out = jax.tree.map(lambda x, v: x.at[rows, start:end].set(v), out, block)
  return state, out


def sample(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           max_lengths: jax.Array | None = None, *, max_new_tokens: int, eos_id: int | tuple[int, ...], pad_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False, group_size: int = 1,
           decode_block: int = 0, stop_check_every: int = 8) -> Completions:
  """Sample `group_size` completions per prompt; each prompt's prefill runs once and its KV cache is shared.

  Args:
    model: the policy.
    prompt_tokens: [num_prompts, p] left-padded prompt ids.
    prompt_mask: [num_prompts, p] 1 on real tokens.
    rng: PRNG key.
    max_lengths: None, or [num_prompts * G] int: row r ends after max_lengths[r] tokens if no EOS came first.
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
  opts = Options(max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, greedy, _checked(stop_check_every))
  spans = block_spans(max_new_tokens, decode_block)
  state = prefill(model, prompt_tokens, prompt_mask, max_lengths, group_size=group_size, slots=spans[0][1])
  out = empty_completions(state.done.shape[0], max_new_tokens, pad_id)
  for start, end in spans:  # a loop that stopped early (every row ended) leaves the next ones to stop at once
    state, out = decode_span(model, state, out, None, rng, start=start, end=end, opts=opts)
  return out


def _checked(stop_check_every) -> int:
  if not isinstance(stop_check_every, int) or stop_check_every < 1:
    raise ValueError(f'stop_check_every must be an int >= 1, got {stop_check_every!r}')
  return stop_check_every


def bucket_sizes(b: int, count: int, multiple: int = 1) -> list[int]:
  """The batch sizes a compacting sampler decodes at, largest first: b, b/2, b/4, ... (count of them, each rounded
  up to a multiple of `multiple`, the devices the batch is split over; repeats dropped)."""
  return sorted({min(b, -(-math.ceil(b / 2**k) // multiple) * multiple) for k in range(count)}, reverse=True)


class CompactingSampler:
  """sample() with the host between decode blocks: after each block it reads which rows are still decoding (one
  small [n] bool fetch), gathers their carry (logits, KV cache, positions, done, caps) into the smallest bucket of
  bucket_sizes() that holds them, decodes the next block at that size and writes its tokens into the [b, c]
  completions at those rows. Rows that ended stop costing decode steps after the block they ended in.

  The completions are sample()'s (greedy, and sampled for a given key: each step's noise is drawn for the whole
  batch, as sample() draws it, and the bucket's rows keep theirs). Programs: one prefill, at most
  len(buckets) x len(spans) decode blocks and one gather per (block, bucket from, bucket to) met, per prompt shape;
  program_counts() says how many are compiled. On tracers (inside another jit, or lowered by pipeline/plan.py) it
  is the plain sample(), one program.
  """

  def __init__(self, graphdef: nnx.GraphDef, plain, *, num_buckets: int, decode_block: int, group_size: int,
               opts: Options, mesh: Mesh | None, rules: sharding.Rules, param_shardings):
    self.spans = block_spans(opts.max_new_tokens, decode_block)
    self.num_buckets, self.group_size = num_buckets, group_size
    self.last_buckets: list[int] = []  # the last call's rows decoded per block (blocks not run are absent)
    self._plain, self._param_shardings = plain, param_shardings
    self._devices = 1 if mesh is None else math.prod(mesh.shape[a] for a in rules.mesh_axes('batch'))
    self._replicated = None if mesh is None else sharding.replicated(mesh)

    def first(params, prompt_tokens, prompt_mask, max_lengths):
      if max_lengths is None:  # caps that never end a row early: one carry structure, so one set of block programs
        max_lengths = jnp.full((prompt_tokens.shape[0] * group_size,), opts.max_new_tokens, jnp.int32)
      state = prefill(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, max_lengths, group_size=group_size,
                      slots=self.spans[0][1])
      return state, empty_completions(state.done.shape[0], opts.max_new_tokens, opts.pad_id)

    def block(params, state, out, rows, rng, *, start, end):
      state, out = decode_span(nnx.merge(graphdef, params), state, out, rows, rng, start=start, end=end, opts=opts)
      return state, out, sharding.constrain(state.done, (None,))  # whole on every device: the host reads it

    shardings = None if param_shardings is None else (param_shardings, 'batch', 'batch', 'batch')
    self._prefill = sharding.jit_sharded(first, mesh, rules, shardings, where='make_sampler')
    self._blocks = [sharding.jit_sharded(lambda *a, s=s, e=e: block(*a, start=s, end=e), mesh, rules,
                                         donate_argnums=2) for s, e in self.spans]
    self._gather = sharding.jit_sharded(_take_rows, mesh, rules)

  def program_counts(self) -> dict[str, int]:
    """Compiled programs so far: prefill, decode (<= buckets x blocks per prompt shape), gather."""
    size = lambda f: f._cache_size()  # noqa: E731
    return {'prefill': size(self._prefill), 'decode': sum(map(size, self._blocks)), 'gather': size(self._gather)}

  def __call__(self, params, prompt_tokens, prompt_mask, rng, max_lengths=None) -> Completions:
    args = (params, prompt_tokens, prompt_mask, rng, max_lengths)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
      return self._plain(*args)
    if self._param_shardings is not None:
      params, rng = sharding.reshard(params, self._param_shardings), self._put(rng)
    buckets = bucket_sizes(prompt_tokens.shape[0] * self.group_size, self.num_buckets, self._devices)
    state, out = self._prefill(params, prompt_tokens, prompt_mask, max_lengths)
    rows, used, ended = None, [], None  # rows: each bucket row's batch row; None while the bucket is the batch
    for i, program in enumerate(self._blocks):
      if i:
        done = np.asarray(jax.device_get(ended))
        live = np.flatnonzero(~done)
        if not live.size:
          break
        size = min(s for s in buckets if s >= live.size)
        if size < done.size:  # live rows first, then ended ones to fill the bucket (they decode pad, unwritten)
          keep = np.concatenate([live, np.flatnonzero(done)[:size - live.size]]).astype(np.int32)
          state = self._gather(state, self._put(keep))
          rows = keep if rows is None else rows[keep]
      used.append(state.done.shape[0])
      state, out, ended = program(params, state, out, None if rows is None else self._put(rows), rng)
    self.last_buckets = used
    return out

  def _put(self, x):
    """A host array (or key) replicated over the mesh, so every process passes the same global value."""
    return x if self._replicated is None else jax.device_put(x, self._replicated)


def _take_rows(state: DecodeState, keep: jax.Array) -> DecodeState:
  """The carry of rows `keep` [m] of `state` (n rows) -> m rows, the KV cache split as the sampler splits it."""
  take = lambda x: jnp.take(x, keep, axis=0)  # noqa: E731
  cache = KVCache(tuple(sharding.constrain(take(k), KEY_AXES) for k in state.cache.k),
                  tuple(sharding.constrain(take(v), VALUE_AXES) for v in state.cache.v),
                  sharding.constrain(take(state.cache.mask), ('batch', 'length')))
  return DecodeState(take(state.logits), cache, take(state.position), take(state.done),
                     take(state.cap), state.slot, state.step)


def make_sampler(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES, decode_buckets: int = 1, **static):
  """jit-compiled sample(params, prompt_tokens, prompt_mask, rng, max_lengths=None) with the keyword options
  (max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, greedy, group_size, decode_block, ...) fixed.

  With `param_shardings` and `mesh`: prompts shard over the batch axes, activations and the KV cache follow
  `rules`, and params are first moved to `param_shardings` (sharding.reshard; a no-op when already there). So
  the sampler may keep its own layout, e.g. weights not split over fsdp: no all-gather per decoded token.

  decode_buckets k > 1 (needs decode_block > 0): a CompactingSampler, whose decode blocks run at the smallest of k
  batch sizes b, b/2, ... that holds the rows still decoding; same completions.
  """
  def sampler(params, prompt_tokens, prompt_mask, rng, max_lengths=None):
    return sample(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, rng, max_lengths, **static)

  if param_shardings is None:
    plain = sharding.jit_sharded(sampler, mesh, rules)
  else:
    jitted = sharding.jit_sharded(sampler, mesh, rules, (param_shardings, 'batch', 'batch', 'replicated', 'batch'),
                                  where='make_sampler')

    def plain(params, prompt_tokens, prompt_mask, rng, max_lengths=None):
      return jitted(sharding.reshard(params, param_shardings), prompt_tokens, prompt_mask, rng, max_lengths)

  if not isinstance(decode_buckets, int) or decode_buckets < 1:
    raise ValueError(f'decode_buckets must be an int >= 1 (1 = no compaction), got {decode_buckets!r}')
  if decode_buckets == 1:
    return plain
  if not static.get('decode_block'):
    raise ValueError(f'decode_buckets={decode_buckets} compacts rows between decode blocks: it needs decode_block > 0')
  unknown = set(static) - set(Options._fields) - {'group_size', 'decode_block'}
  if unknown:
    raise TypeError(f'make_sampler got unknown options {sorted(unknown)}')
  opts = Options(**{k: v for k, v in static.items() if k in Options._fields})
  _checked(opts.stop_check_every)
  return CompactingSampler(graphdef, plain, num_buckets=decode_buckets, decode_block=static['decode_block'],
                           group_size=static.get('group_size', 1), opts=opts, mesh=mesh, rules=rules,
                           param_shardings=param_shardings)
