"""Per-token log-probabilities of given tokens, without materializing a full log-softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import sharding


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
                      completion_mask: jax.Array, *, return_entropy: bool = False):
  """Logprobs of each completion token given prompt + earlier completion tokens, one full forward pass.

  Args:
    model: a `Transformer` (called as model(tokens, positions, mask) -> logits).
    prompt_tokens, prompt_mask: [b, p] left-padded prompts.
    completion_tokens, completion_mask: [b, c] right-padded completions.
  Returns:
    logprobs [b, c] float32 (and entropy [b, c] if return_entropy).
  """
  from grpo_jax.model import positions_from_mask  # local: model imports nothing from here
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
  logits = model(tokens, positions_from_mask(mask), mask)
  p = prompt_tokens.shape[1]
  # The logit at slot j predicts the token at slot j + 1.
  completion_logits = logits[:, p - 1:-1]
  logprobs = token_logprobs(completion_logits, completion_tokens)
  if return_entropy:
    return logprobs, token_entropy(completion_logits)
  return logprobs


def make_sequence_logprobs_fn(graphdef: nnx.GraphDef, *, param_shardings=None, mesh: Mesh | None = None):
  """jit-compiled sequence_logprobs(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask):
  the reference policy's forward. With `param_shardings` and `mesh`, params keep their layout and the four
  token arrays shard over the batch axes."""
  def logprobs_of(params, *arrays):
    return sequence_logprobs(nnx.merge(graphdef, params), *arrays)

  if param_shardings is None:
    return jax.jit(logprobs_of)
  return jax.jit(logprobs_of, in_shardings=(param_shardings, *[sharding.batch_sharding(mesh)] * 4))
