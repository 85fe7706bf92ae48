"""The reference policy's forward: log pi_ref of sampled completions (and the exact KL to it), jitted and sharded
like the train step; and the trainer's own forward of pi_old, which the sampler-vs-trainer checks read."""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grpo_jax.core.kl import exact_kl, token_exact_kl
from grpo_jax.core.logprobs import positions_from_mask, sequence_logprobs
from grpo_jax.core.losses import FilteredLogits
from grpo_jax.parallel import sharding
from grpo_jax.rollout.sampling import filter_logits


def make_sequence_logprobs_fn(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None,
                              rules: sharding.Rules = sharding.DEFAULT_RULES, chunk_size: int = 0,
                              num_micro_batches: int = 1, group_size: int = 1, pack_rows: int = 0):
  """jit-compiled sequence_logprobs(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask)
  -> [B, c]. With `param_shardings` and `mesh`, params keep their layout, the four token arrays shard over the
  batch axes and activations follow `rules` (as in the train step), so no device holds the whole batch's
  logits. `chunk_size` as in sequence_logprobs.

  num_micro_batches = k > 1 runs the forward over k micro-batches of B / k rows in turn (rows j, j + k, ...:
  each keeps an equal share of every device's rows), so only one micro-batch's activations are live. The
  trainer uses the train step's micro-batch size, which already fits; whether it is faster depends on the
  row length (benchmarks/RESULTS.md).

  group_size = G > 1: the B rows are B / G groups of G contiguous rows sharing one prompt; each prompt runs once
  (sequence_logprobs group_size) and micro-batches hold whole groups (B divisible by num_micro_batches * G).
  pack_rows = R > 0: each group's completions run packed into R rows (sequence_logprobs pack_rows).
  """
  batch_sharding = None if mesh is None else sharding.batch_sharding(mesh, rules)

  def logprobs_of(params, *arrays):
    model = nnx.merge(graphdef, params)
    if num_micro_batches == 1:
      return sequence_logprobs(model, *arrays, chunk_size=chunk_size, group_size=group_size, pack_rows=pack_rows)
    k = num_micro_batches
    if arrays[0].shape[0] % (k * group_size):
      raise ValueError(f'{arrays[0].shape[0]} rows do not split into num_micro_batches={k} equal micro-batches'
                       + (f' of whole groups of {group_size}' if group_size > 1 else ''))
    micro = sharding.split_micro_batches(arrays, k, group_size)  # [k, B / k, ...] each

    def one_micro_batch(xs):
      if batch_sharding is not None:
        xs = jax.lax.with_sharding_constraint(xs, batch_sharding)
      return sequence_logprobs(model, *xs, chunk_size=chunk_size, group_size=group_size, pack_rows=pack_rows)

    return sharding.merge_micro_batches(jax.lax.map(one_micro_batch, micro), group_size)  # [k, B / k, c] -> [B, c]

  in_shardings = None if param_shardings is None else (param_shardings, *['batch'] * 4)
  return sharding.jit_sharded(logprobs_of, mesh, rules, in_shardings, where='make_sequence_logprobs_fn')


def make_exact_kl_fn(graphdef: nnx.GraphDef, *, mesh: Mesh | None = None,
                     rules: sharding.Rules = sharding.DEFAULT_RULES, param_shardings=None, chunk_size: int = 0):
  """jit-compiled fn(params, ref_params, prompt_tokens [n, p], prompt_mask, completion_tokens [n, c],
  completion_mask) -> scalar float32: the exact KL(pi_params || pi_ref_params) over the full vocabulary,
  averaged over the real completion tokens (core/kl.exact_kl). Both params merge with `graphdef` (with LoRA:
  lora.merge_params for the policy, lora.base_params for the reference). Shardings as in
  make_sequence_logprobs_fn, `param_shardings` serving both params trees.

  A measurement, not a loss. chunk_size 0: both models' [n, c, V] float32 completion logits at once (with a 49k
  vocabulary, gigabytes for a few rows). > 0: the LM heads and the KL run over chunk_size completion positions at a
  time, so at most [n, chunk_size, V] logits of each model exist.
  """
  def kl_of(params, ref_params, prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    # The sequence, positions and logit slice of sequence_logprobs: the same conditionals it scores.
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
    positions = positions_from_mask(mask)
    p = prompt_tokens.shape[1]
    models = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
    if not chunk_size:  # slot j's logits predict the token at slot j + 1: [n, c, V]
      logits = [m(tokens, positions, mask)[:, p - 1:-1] for m in models]
      return exact_kl(*logits, completion_mask)
    hidden = [m.hidden_states(tokens, positions, mask)[:, p - 1:-1] for m in models]  # [n, c, d] each
    n, c, d = hidden[0].shape
    chunks = -(-c // chunk_size)
    pad = chunks * chunk_size - c
    split = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(  # noqa: E731
        n, chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)
    real = split(completion_mask.astype(bool))  # padded positions are masked out

    def one_chunk(xs):
      h, h_ref, m = xs
      per_token = token_exact_kl(models[0].logits_from_hidden(h), models[1].logits_from_hidden(h_ref))
      return jnp.sum(jnp.where(m, per_token, 0.0))

    total = jax.lax.map(one_chunk, (split(hidden[0]), split(hidden[1]), real)).sum()
    return total / jnp.maximum(completion_mask.astype(bool).sum(), 1).astype(jnp.float32)

  in_shardings = None if param_shardings is None else (param_shardings, param_shardings, *['batch'] * 4)
  return sharding.jit_sharded(kl_of, mesh, rules, in_shardings, where='make_exact_kl_fn')


def _filter_any_rank(logits: jax.Array, **filters) -> jax.Array:
  v = logits.shape[-1]
  return filter_logits(logits.reshape(-1, v), **filters).reshape(logits.shape)


def sampling_filter(*, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """The sampler's filter (sampling.filter_logits: temperature, top-k, top-p) on logits of any rank [..., V], for
  the trainer-side logprobs (core/losses.LossConfig.logits_filter)."""
  return functools.partial(_filter_any_rank, temperature=temperature, top_k=top_k, top_p=top_p)


def make_trainer_logprobs_fn(graphdef: nnx.GraphDef, *, logits_filter: Callable | None = None,
                             param_shardings=None, mesh: Mesh | None = None,
                             rules: sharding.Rules = sharding.DEFAULT_RULES, chunk_size: int = 0,
                             group_size: int = 1):
  """jit-compiled fn(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> (raw, filtered),
  each [B, c]: the trainer's log pi_old of the sampled tokens under the model's own (temperature 1) distribution,
  which is what the sampler reports (sampling.Completions.logprobs), and under `logits_filter` (the distribution
  the sampler draws from; None: raw again). Shardings as in make_sequence_logprobs_fn; group_size as there (only
  for batches of whole groups: not for a few evenly spaced rows)."""
  def logprobs_of(params, *arrays):
    model = nnx.merge(graphdef, params)
    raw = sequence_logprobs(model, *arrays, chunk_size=chunk_size, group_size=group_size)
    if logits_filter is None:
      return raw, raw
    return raw, sequence_logprobs(FilteredLogits(model, logits_filter), *arrays, chunk_size=chunk_size,
                                  group_size=group_size)

  in_shardings = None if param_shardings is None else (param_shardings, *['batch'] * 4)
  return sharding.jit_sharded(logprobs_of, mesh, rules, in_shardings, where='make_trainer_logprobs_fn')
