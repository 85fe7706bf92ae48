"""Supervised warm-start: cross-entropy on the solution tokens, stopped early on validation accuracy."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax.logprobs import sequence_logprobs


class SFTBatch(NamedTuple):
  prompt_tokens: jax.Array  # [b, p] left-padded
  prompt_mask: jax.Array  # [b, p]
  completion_tokens: jax.Array  # [b, c] solution + EOS, right-padded
  completion_mask: jax.Array  # [b, c]


def sft_loss(model, batch: SFTBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean negative log-likelihood per solution token (prompt tokens are not trained on)."""
  logprobs = sequence_logprobs(model, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
                               batch.completion_mask)
  mask = batch.completion_mask.astype(jnp.float32)
  nll = -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return nll, {'nll': nll}
