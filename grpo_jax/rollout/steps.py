"""Reasoning steps of sampled completions, for process supervision (DeepSeekMath 4.1.3).

A step ends at a delimiter token (one whose text contains the delimiter, e.g. '\\n') or at the row's last real
token. Boundaries are found on token ids and step texts are decoded from those same token slices, so the rewards a
step verifier (grpo_jax.rewards.steps) gives line up with `step_ends` by construction. With a subword tokenizer a
delimiter token may also hold text around the delimiter ('.\\n', '\\n5'); that text belongs to the step the token
ends.
"""
from __future__ import annotations

import numpy as np


def delimiter_token_ids(tokenizer, delimiter: str) -> np.ndarray:
  """[k] int32 sorted ids of the vocabulary tokens whose text, each decoded alone, contains `delimiter`.

  Special tokens (EOS, pad, chat markers) decode to '' here and never count: a row's last step ends at its last real
  token whether or not that is a delimiter.
  """
  if not delimiter:
    raise ValueError('the step delimiter must be a non-empty string')
  texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
  return np.array([i for i, text in enumerate(texts) if delimiter in text], np.int32)


def step_boundaries(tokens: np.ndarray, mask: np.ndarray, delimiter_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Where each completion's steps end.

  Step k of row n ends at the k-th real token (mask 1) whose id is in `delimiter_ids`; the row's last step ends at
  its last real token, which adds no step when that token is itself a delimiter. A row with no delimiter is one
  step; a row with no real tokens gets one step with mask 0, so it contributes nothing. Since the sampler's mask
  covers EOS, a row ending '...\\n<eos>' has a last step holding only EOS (its text is '').

  Args:
    tokens: [N, c] completion token ids.
    mask: [N, c] 1 on real tokens.
    delimiter_ids: [k] ids that end a step (see `delimiter_token_ids`).
  Returns:
    step_ends: [N, S] int32, index of each step's last token; 0 for padding steps. S = the most steps of any row,
      at least 1.
    step_mask: [N, S] int32, 1 for real steps, 0 for padding.
  """
  tokens, real = np.asarray(tokens), np.asarray(mask).astype(bool)
  if tokens.ndim != 2 or tokens.shape != real.shape:
    raise ValueError(f'tokens and mask must both be [N, c]; got {tokens.shape} and {real.shape}')
  n, c = tokens.shape
  ends = real & np.isin(tokens, np.asarray(delimiter_ids))
  has_real = real.any(axis=1)
  last_real = c - 1 - np.argmax(real[:, ::-1], axis=1) if c else np.zeros(n, np.int64)
  ends[np.flatnonzero(has_real), last_real[has_real]] = True
  num_steps = max(int(ends.sum(axis=1).max(initial=0)), 1)
  rows, cols = np.nonzero(ends)  # row-major, so each row's ends come out in order
  k = (np.cumsum(ends, axis=1) - 1)[rows, cols]  # which step of its row each end closes
  step_ends = np.zeros((n, num_steps), np.int32)
  step_mask = np.zeros((n, num_steps), np.int32)
  step_ends[rows, k] = cols
  step_mask[rows, k] = 1
  return step_ends, step_mask


def step_texts(tokenizer, tokens_row: np.ndarray, step_ends_row: np.ndarray, step_mask_row: np.ndarray) -> list[str]:
  """The decoded text of each real step of one row: tokens (previous step's end, this step's end].

  Args:
    tokens_row: [c] completion token ids.
    step_ends_row, step_mask_row: [S] one row of `step_boundaries`' outputs.
  Returns:
    one string per real step, in order, special tokens (EOS, pad) dropped.
  """
  slices, start = [], 0
  for end, real in zip(np.asarray(step_ends_row).tolist(), np.asarray(step_mask_row).tolist(), strict=True):
    if real:
      slices.append(np.asarray(tokens_row)[start:end + 1].tolist())
      start = end + 1
  return tokenizer.batch_decode(slices, skip_special_tokens=True) if slices else []
