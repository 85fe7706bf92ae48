"""Tokenized splits and deterministic batch order.

Prompts are left-padded to a fixed length (so every row's last prompt token sits in the same slot and
decoding writes one shared cache slot per step); completions are right-padded and end with EOS.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from grpo_jax.tasks import Example, format_prompt


class TokenizedSplit(NamedTuple):
  prompt_tokens: np.ndarray  # [n, p] int32, left-padded
  prompt_mask: np.ndarray  # [n, p] int32
  completion_tokens: np.ndarray  # [n, c] int32, solution + EOS, right-padded
  completion_mask: np.ndarray  # [n, c] int32
  answers: list[str]  # [n] gold final answers

  def __len__(self) -> int:
    return len(self.answers)

  def take(self, idx: np.ndarray) -> TokenizedSplit:
    return TokenizedSplit(self.prompt_tokens[idx], self.prompt_mask[idx], self.completion_tokens[idx],
                          self.completion_mask[idx], [self.answers[i] for i in idx])


def encode(tokenizer, examples: Sequence[Example], *, max_prompt_len: int, max_new_tokens: int,
           split: str = '') -> TokenizedSplit:
  """Tokenize prompts and solutions; raise (naming the example) if one does not fit the lengths."""
  n = len(examples)
  prompts = np.full((n, max_prompt_len), tokenizer.pad_token_id, np.int32)
  completions = np.full((n, max_new_tokens), tokenizer.pad_token_id, np.int32)
  prompt_ids = tokenizer([format_prompt(e.question) for e in examples], add_special_tokens=False)['input_ids']
  solution_ids = tokenizer([e.solution for e in examples], add_special_tokens=False)['input_ids']
  for i, (p, s) in enumerate(zip(prompt_ids, solution_ids, strict=True)):
    s = s + [tokenizer.eos_token_id]
    if len(p) > max_prompt_len:
      raise ValueError(f'{split} example {i} has a {len(p)}-token prompt, longer than max_prompt_len='
                       f'{max_prompt_len}: {examples[i].question!r}')
    if len(s) > max_new_tokens:
      raise ValueError(f'{split} example {i} has a {len(s)}-token solution (with EOS), longer than '
                       f'max_new_tokens={max_new_tokens}: {examples[i].solution!r}')
    prompts[i, max_prompt_len - len(p):] = p
    completions[i, :len(s)] = s
  return TokenizedSplit(prompts, (prompts != tokenizer.pad_token_id).astype(np.int32), completions,
                        (completions != tokenizer.pad_token_id).astype(np.int32), [e.answer for e in examples])


def batch_indices(num_examples: int, batch_size: int, step: int, *, seed: int, stream: str) -> np.ndarray:
  """Example indices of batch `step`: epochs of fresh permutations, a pure function of (seed, stream, step).

  The data position is therefore just the step, which is what makes resuming exact.
  """
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), num_examples)
    salt = int(hashlib.md5(stream.encode()).hexdigest(), 16) % (2**32)
    perm = np.random.default_rng([seed, salt, epoch]).permutation(num_examples)
    out.extend(perm[offset:offset + batch_size - len(out)])
  return np.asarray(out, np.int64)
