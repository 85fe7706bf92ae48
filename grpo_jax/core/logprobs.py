"""Per-token log-probabilities of given tokens, without materializing a full log-softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.core import packing


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """[b, t] bool -> [b, t] int positions counting only real tokens (0 on left padding)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def grouped_completion_positions(prompt_mask: jax.Array, completion_mask: jax.Array) -> jax.Array:
  """The RoPE positions of completions [N, c] after their group's prompt [P, p] (N = P * G, groups contiguous):
  positions_from_mask of prompt ++ completion, completion part, counting on from the prompt's real tokens."""
  g = completion_mask.shape[0] // prompt_mask.shape[0]
  prompt_len = jnp.repeat(prompt_mask.astype(bool).sum(-1, dtype=jnp.int32), g)[:, None]  # [N, 1]
  return jnp.maximum(prompt_len + jnp.cumsum(completion_mask.astype(jnp.int32), axis=-1) - 1, 0)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[tokens], computed as logit[token] - logsumexp(logits).

  Args:
    logits: [..., v] (any float dtype; computed in float32).
    tokens: [...] int ids.
  Returns:
    [...] float32 log-probabilities.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) per position: [..., v] -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)  # 0 log 0 = 0 for -inf logits


def sequence_logprobs(model, prompt_tokens: jax.Array, prompt_mask: jax.Array, completion_tokens: jax.Array,
                      completion_mask: jax.Array, *, return_entropy: bool = False, chunk_size: int = 0,
                      remat: str = 'none', group_size: int = 1, pack_rows: int = 0):
  """Logprobs of each completion token given prompt + earlier completion tokens, one full forward pass.

  Args:
    model: a `Transformer` (model(tokens, positions, mask) -> logits; hidden_states / logits_from_hidden).
    prompt_tokens, prompt_mask: [b, p] left-padded prompts.
    completion_tokens, completion_mask: [b, c] right-padded completions.
    chunk_size: 0 = one LM head over all [b, p + c] positions. > 0: the head, logsumexp and entropy run over
      `chunk_size` completion positions at a time, so at most [b, chunk_size, v] float32 logits exist at once,
      in the backward pass too (each chunk's logits are recomputed there rather than stored).
    remat: the model's rematerialization policy (model.REMAT_POLICIES) for the training forward.
    group_size: G > 1: rows come in groups of G contiguous rows sharing one prompt (a GRPO batch); each prompt
      (rows 0, G, 2G, ...; the others' are not read) runs through the model once and its G completions attend
      to it (model.grouped_hidden_states). The same values as G = 1 on such a batch, within float rounding.
    pack_rows: R > 0 (with group_size > 1): each group's completions run packed into R rows of width c
      (core/packing.py; R at least packing.rows_needed of the mask). The same values, except 0 past each row's
      last real token, where the unpacked forward scores padding.
  Returns:
    logprobs [b, c] float32 (and entropy [b, c] if return_entropy).
  """
  if group_size > 1:
    return _grouped_logprobs(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                             return_entropy=return_entropy, chunk_size=chunk_size, remat=remat, group_size=group_size,
                             pack_rows=pack_rows)
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
  p = prompt_tokens.shape[1]
  if chunk_size:
    hidden = model.hidden_states(tokens, positions_from_mask(mask), mask, remat=remat)
    # The hidden state at slot j predicts the token at slot j + 1.
    return _head_logprobs(model.logits_from_hidden, hidden[:, p - 1:-1], completion_tokens, chunk_size,
                          return_entropy)
  logits = model(tokens, positions_from_mask(mask), mask, remat=remat)
  completion_logits = logits[:, p - 1:-1]
  logprobs = token_logprobs(completion_logits, completion_tokens)
  if return_entropy:
    return logprobs, token_entropy(completion_logits)
  return logprobs


def _grouped_logprobs(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask, *, return_entropy,
                      chunk_size, remat, group_size, pack_rows):
  """sequence_logprobs with each group's prompt run once (group_size > 1), its completions packed (pack_rows)."""
  b = completion_tokens.shape[0]
  if b % group_size:
    raise ValueError(f'{b} rows do not split into groups of group_size={group_size}')
  prompt_tokens, prompt_mask = prompt_tokens[::group_size], prompt_mask[::group_size]
  if pack_rows:
    return _packed_logprobs(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                            return_entropy=return_entropy, chunk_size=chunk_size, remat=remat, group_size=group_size,
                            pack_rows=pack_rows)
  last_prompt, completion = model.grouped_hidden_states(prompt_tokens, prompt_mask, completion_tokens,
                                                        completion_mask, remat=remat)
  # The hidden state at slot j predicts the token at slot j + 1: the last prompt slot, then completion slots.
  hidden = jnp.concatenate([jnp.repeat(last_prompt, group_size, axis=0)[:, None], completion[:, :-1]], axis=1)
  return _head_logprobs(model.logits_from_hidden, hidden, completion_tokens, chunk_size, return_entropy)


def _packed_logprobs(model, prompt_tokens, prompt_mask, completion_tokens, completion_mask, *, return_entropy,
                     chunk_size, remat, group_size, pack_rows):
  """_grouped_logprobs on packed rows: prompts [P, p], completions [N, c] -> [N, c] (and entropy)."""
  completion_mask = completion_mask.astype(bool)
  placed = packing.plan(completion_mask, group_size, pack_rows)
  layout = packing.layout(placed, grouped_completion_positions(prompt_mask, completion_mask))
  tokens = packing.pack(placed, completion_tokens)  # [P * R, c]
  last_prompt, hidden = model.grouped_hidden_states(prompt_tokens, prompt_mask, tokens,
                                                    packing.pack(placed, completion_mask, fill=False), remat=remat,
                                                    layout=layout)
  # A completion's first token is predicted by its prompt's last slot, each later one by the column before it.
  first = (layout.slots == 0)[..., None]
  before = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
  hidden = jnp.where(first, jnp.repeat(last_prompt, pack_rows, axis=0)[:, None].astype(hidden.dtype), before)
  out = _head_logprobs(model.logits_from_hidden, hidden, tokens, chunk_size, return_entropy)
  if return_entropy:
    return packing.unpack(placed, out[0]), packing.unpack(placed, out[1])
  return packing.unpack(placed, out)


def _head_logprobs(head, hidden: jax.Array, tokens: jax.Array, chunk_size: int, return_entropy: bool):
  """token_logprobs (and token_entropy) of head(hidden) [b, c, d] -> [b, c] (a pair with return_entropy): over
  `chunk_size` time steps at a time (_chunked_logprobs) when > 0, else all at once."""
  if chunk_size:
    out = _chunked_logprobs(head, hidden, tokens, chunk_size, return_entropy)
    return out if return_entropy else out[0]
  logits = head(hidden)  # [b, c, v]
  logprobs = token_logprobs(logits, tokens)
  return (logprobs, token_entropy(logits)) if return_entropy else logprobs


def _chunked_logprobs(head, hidden: jax.Array, tokens: jax.Array, chunk_size: int, return_entropy: bool):
  """token_logprobs (and token_entropy) of head(hidden), `chunk_size` time steps at a time.

  head: [..., d] -> [..., v] float32 logits; hidden [b, c, d]; tokens [b, c]. Returns ([b, c], [b, c] or None).
  Chunks run over time, not rows, so each keeps the batch axis and its data-parallel sharding.
  """
  b, c, d = hidden.shape
  n = -(-c // chunk_size)
  pad = n * chunk_size - c  # padded positions are computed and dropped
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk_size, d).swapaxes(0, 1)
  tokens = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(b, n, chunk_size).swapaxes(0, 1)

  # Without the checkpoint, the scan's backward would keep every chunk's logits: the [b, c, v] we avoid.
  @jax.checkpoint
  def one_chunk(xs):
    logits = head(xs[0])  # [b, chunk_size, v] float32
    entropy = token_entropy(logits) if return_entropy else None
    return token_logprobs(logits, xs[1]), entropy

  logprobs, entropy = jax.lax.map(one_chunk, (hidden, tokens))  # [n, b, chunk_size] each
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk_size)[:, :c]  # noqa: E731
  return unchunk(logprobs), None if entropy is None else unchunk(entropy)
