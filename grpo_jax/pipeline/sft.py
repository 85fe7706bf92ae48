"""Supervised warm-start: cross-entropy on the solution tokens, stopped early on validation accuracy."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax.core.logprobs import sequence_logprobs


class SFTBatch(NamedTuple):
  prompt_tokens: jax.Array  # [b, p] left-padded
  prompt_mask: jax.Array  # [b, p]
  completion_tokens: jax.Array  # [b, c] solution + EOS, right-padded
  completion_mask: jax.Array  # [b, c]


def sft_loss(model, batch: SFTBatch, *, logprob_chunk: int = 0, remat: str = 'none'
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean negative log-likelihood per solution token (prompt tokens are not trained on).

  logprob_chunk and remat only trade compute for memory (logprobs.sequence_logprobs chunk_size, remat)."""
  logprobs = sequence_logprobs(model, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                               batch.completion_mask, chunk_size=logprob_chunk, remat=remat)
  mask = batch.completion_mask.astype(jnp.float32)
  nll = -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return nll, {'nll': nll}


def sft_token_count(batch: SFTBatch) -> jax.Array:
  """Solution tokens in a batch: the micro-batch weight under gradient accumulation, as sft_loss is a token
  mean (train_state.make_train_step's micro_weight)."""
  return batch.completion_mask.sum().astype(jnp.float32)
