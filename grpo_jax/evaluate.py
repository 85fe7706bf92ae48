"""Greedy evaluation on a tokenized split: accuracy (final answer matches) and mean reward."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from grpo_jax.data import TokenizedSplit
from grpo_jax.rewards import RewardFn, gsm8k_exact


def decode(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Completion texts ([b, c] ids with [b, c] mask), special tokens (EOS, pad) dropped."""
  rows = [row[m.astype(bool)] for row, m in zip(tokens, mask, strict=True)]
  return tokenizer.batch_decode(rows, skip_special_tokens=True)


def greedy_eval(greedy_sampler: Callable, params, split: TokenizedSplit, tokenizer, reward_fn: RewardFn, *,
                batch_size: int, rng) -> dict[str, float]:
  """Decode every example greedily in fixed-size batches (the last is padded, so one compile).

  greedy_sampler(params, prompt_tokens, prompt_mask, rng) -> Completions.
  """
  n = len(split)
  texts: list[str] = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    out = greedy_sampler(params, split.prompt_tokens[idx], split.prompt_mask[idx], rng)
    texts.extend(decode(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))[:min(batch_size, n - start)])
  return {'accuracy': float(gsm8k_exact(texts, split.answers).mean()),
          'reward': float(reward_fn(texts, split.answers).mean()),
          'sample': texts[0]}
