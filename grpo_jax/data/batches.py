"""Tokenized splits and deterministic batch order.

Prompts are left-padded to a fixed length (so every row's last prompt token sits in the same slot and
decoding writes one shared cache slot per step); completions are right-padded and end with EOS. Masks come
from lengths, never from comparing with pad_id (real models often pad with EOS).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from grpo_jax.data.prompts import format_prompt, tokenize_prompts, uses_chat_template


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


class SFTBatch(NamedTuple):
  """A supervised batch: what core.losses.sft_loss reads."""
  prompt_tokens: np.ndarray  # [b, p] left-padded
  prompt_mask: np.ndarray  # [b, p]
  completion_tokens: np.ndarray  # [b, c] solution + EOS, right-padded
  completion_mask: np.ndarray  # [b, c]


def encode(tokenizer, examples: Sequence, *, max_prompt_len: int, max_new_tokens: int, template: str = 'qa',
           chat: str = 'never', split: str = '', with_solutions: bool = True,
           skip_long_prompts: bool = False) -> TokenizedSplit:
  """Tokenize prompts (and solutions, for SFT) of examples with .question / .solution / .answer.

  A prompt longer than max_prompt_len (or a solution + EOS longer than max_new_tokens) raises, naming the
  example, unless skip_long_prompts drops such prompts (and says how many). Without solutions the completion
  arrays are [n, 0].
  """
  chat_formatted = uses_chat_template(tokenizer, chat)
  texts = [format_prompt(e.question, template=template, tokenizer=tokenizer, chat=chat) for e in examples]
  prompt_ids = tokenize_prompts(tokenizer, texts, chat_formatted=chat_formatted) if texts else []
  keep = [i for i, p in enumerate(prompt_ids) if len(p) <= max_prompt_len]
  if len(keep) < len(examples):
    i = next(i for i, p in enumerate(prompt_ids) if len(p) > max_prompt_len)
    if not skip_long_prompts:
      raise ValueError(f'{split} example {i} has a {len(prompt_ids[i])}-token prompt, longer than max_prompt_len='
                       f'{max_prompt_len}: {examples[i].question[:200]!r} (raise max_prompt_len, or set '
                       'config.task.skip_long_prompts=True (grpo_jax.eval: --skip_long_prompts) to drop such prompts '
                       'and count them)')
    print(f'{split}: dropped {len(examples) - len(keep)} of {len(examples)} prompts longer than '
          f'max_prompt_len={max_prompt_len}')
    examples, prompt_ids = [examples[i] for i in keep], [prompt_ids[i] for i in keep]
  n, c = len(examples), max_new_tokens if with_solutions else 0
  prompts = np.full((n, max_prompt_len), tokenizer.pad_token_id, np.int32)
  prompt_mask = np.zeros((n, max_prompt_len), np.int32)
  completions, completion_mask = np.full((n, c), tokenizer.pad_token_id, np.int32), np.zeros((n, c), np.int32)
  solutions = [e.solution for e in examples]
  solution_ids = tokenizer(solutions, add_special_tokens=False)['input_ids'] if c and n else [[]] * n
  for i, (p, s) in enumerate(zip(prompt_ids, solution_ids, strict=True)):
    prompts[i, max_prompt_len - len(p):], prompt_mask[i, max_prompt_len - len(p):] = p, 1
    if c:
      s = s + [tokenizer.eos_token_id]
      if len(s) > max_new_tokens:
        raise ValueError(f'{split} example {i} has a {len(s)}-token solution (with EOS), longer than '
                         f'max_new_tokens={max_new_tokens}: {examples[i].solution[:200]!r}')
      completions[i, :len(s)], completion_mask[i, :len(s)] = s, 1
  return TokenizedSplit(prompts, prompt_mask, completions, completion_mask, [e.answer for e in examples])


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
