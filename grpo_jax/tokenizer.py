"""A character-level Hugging Face tokenizer for the embedded task.

Built with the `tokenizers` library and wrapped as a `PreTrainedTokenizerFast`, so the trainer only uses
the HF tokenizer interface a real model's tokenizer has (`save_pretrained` / `from_pretrained`, `pad_token_id`,
`eos_token_id`, `decode`). It is saved into every workdir beside the checkpoints.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {'pad_token': '<pad>', 'eos_token': '<eos>', 'bos_token': '<bos>', 'unk_token': '<unk>'}
CHARACTERS = string.digits + string.ascii_letters + ' \n.,:;?!+-*/=#()\'"$%'


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
  for ch in characters:
    vocab.setdefault(ch, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS['unk_token']))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # every char a token
  tok.decoder = decoders.Fuse()  # join without spaces
  return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side='left', **SPECIAL_TOKENS)
