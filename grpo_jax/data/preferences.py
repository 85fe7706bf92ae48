"""Comparisons (chosen vs rejected) for the reward model (grpo_jax/models/reward_model.py), from two sources:

  pairs = load_preference_jsonl('prefs.jsonl')   # {"prompt": ..., "chosen": ..., "rejected": ...} per line
  comparisons = encode_pairs(tokenizer, pairs, max_prompt_len=56, max_new_tokens=40)
  comparisons, prompt_ids = comparisons_from_groups(prompt_tokens, prompt_mask, completion_tokens,
                                                    completion_mask, rewards, group_size=8,
                                                    max_pairs_per_prompt=4, rng=rng)  # from GRPO rollouts

Every row is a left-padded prompt followed by a right-padded completion ending with EOS: [n, p + c], the layout
of a rollout's prompt_tokens ++ completion_tokens (see grpo_jax/data/batches.py), so the reward model scores
human-written pairs and sampled ones alike. Masks are 1 on real tokens, 0 on padding at either end.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from grpo_jax.data.datasets import read_jsonl
from grpo_jax.data.prompts import format_prompt, tokenize_prompts, uses_chat_template
from grpo_jax.models.reward_model import Comparisons

FIELDS = ('prompt', 'chosen', 'rejected')


class PreferencePair(NamedTuple):
  """A question and two completions of it, `chosen` preferred to `rejected`."""
  prompt: str
  chosen: str
  rejected: str


def load_preference_jsonl(path: str | Path) -> list[PreferencePair]:
  """One JSON object per line with string fields "prompt", "chosen" and "rejected"; blank lines are skipped.

  Raises FileNotFoundError for a missing file and ValueError, naming the file and 1-based line, for a line that
  is not a JSON object, a missing or non-string field, or chosen == rejected (a pair that teaches nothing and,
  under the pairwise loss, only pulls the margin towards 0); ValueError for a file without any pair.
  """
  path = Path(path)
  pairs = []
  for lineno, record in read_jsonl(path):  # missing / empty file, broken JSON, non-objects: named there
    where = f'{path}:{lineno}'
    for name in FIELDS:
      if name not in record:
        raise ValueError(f'{where}: record has no field {name!r} (it has {sorted(record)})')
      # No str() coercion (unlike datasets.load_jsonl's answers): a number or null here is a broken file.
      if not isinstance(record[name], str):
        raise ValueError(f'{where}: field {name!r} must be a string, got {type(record[name]).__name__}')
    if record['chosen'] == record['rejected']:
      raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text")
    pairs.append(PreferencePair(*(record[name] for name in FIELDS)))
  return pairs


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], *, max_prompt_len: int, max_new_tokens: int,
                 template: str = 'qa', chat: str = 'never', skip_long: bool = False) -> Comparisons:
  """Tokenize pairs into Comparisons of numpy int32 arrays, each [n, max_prompt_len + max_new_tokens].

  The prompt is formatted as batches.encode formats questions (template, optional chat template) and
  left-padded; each completion gets EOS and is right-padded. A prompt longer than max_prompt_len, or a
  completion + EOS longer than max_new_tokens, raises naming the pair, unless skip_long drops such pairs (and
  says how many).
  """
  chat_formatted = uses_chat_template(tokenizer, chat)
  texts = [format_prompt(p.prompt, template=template, tokenizer=tokenizer, chat=chat) for p in pairs]
  prompt_ids = tokenize_prompts(tokenizer, texts, chat_formatted=chat_formatted) if texts else []

  def completions(texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)['input_ids'] if texts else []
    return [s + [tokenizer.eos_token_id] for s in ids]

  chosen_ids, rejected_ids = completions([p.chosen for p in pairs]), completions([p.rejected for p in pairs])
  keep = []
  for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids, strict=True)):
    problem = _too_long(len(p), len(c), len(r), max_prompt_len, max_new_tokens)
    if problem is None:
      keep.append(i)
    elif not skip_long:
      raise ValueError(f'preference pair {i} has {problem}: {pairs[i].prompt[:200]!r} (raise the limit, or pass '
                       'skip_long=True to drop such pairs and count them)')
  if len(keep) < len(pairs):
    print(f'dropped {len(pairs) - len(keep)} of {len(pairs)} preference pairs longer than '
          f'max_prompt_len={max_prompt_len} / max_new_tokens={max_new_tokens}')

  n, t = len(keep), max_prompt_len + max_new_tokens
  arrays = [np.full((n, t), tokenizer.pad_token_id, np.int32), np.zeros((n, t), np.int32),
            np.full((n, t), tokenizer.pad_token_id, np.int32), np.zeros((n, t), np.int32)]
  for row, i in enumerate(keep):
    p = prompt_ids[i]
    for tokens, mask, s in ((arrays[0], arrays[1], chosen_ids[i]), (arrays[2], arrays[3], rejected_ids[i])):
      tokens[row, max_prompt_len - len(p):max_prompt_len], mask[row, max_prompt_len - len(p):max_prompt_len] = p, 1
      tokens[row, max_prompt_len:max_prompt_len + len(s)], mask[row, max_prompt_len:max_prompt_len + len(s)] = s, 1
  return Comparisons(*arrays)


def _too_long(prompt_len: int, chosen_len: int, rejected_len: int, max_prompt_len: int, max_new_tokens: int
              ) -> str | None:
  """What about a pair is over its limit, or None."""
  if prompt_len > max_prompt_len:
    return f'a {prompt_len}-token prompt, longer than max_prompt_len={max_prompt_len}'
  for side, length in (('chosen', chosen_len), ('rejected', rejected_len)):
    if length > max_new_tokens:
      return f'a {length}-token {side} completion (with EOS), longer than max_new_tokens={max_new_tokens}'
  return None


def comparisons_from_groups(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completion_tokens: np.ndarray,
                            completion_mask: np.ndarray, scores: np.ndarray, *, group_size: int,
                            max_pairs_per_prompt: int, rng: np.random.Generator
                            ) -> tuple[Comparisons, np.ndarray]:
  """Pairs within each GRPO group: completion i preferred to j when scores[i] > scores[j].

  prompt_tokens / prompt_mask [P, p] (left-padded), completion_tokens / completion_mask [P*G, c] (group g is rows
  g*G .. g*G + G - 1, as the rollout lays them out), scores [P*G] (verifier rewards: correct over incorrect, or
  higher over lower when graded). Ties and NaN scores make no pair. Each group gives at most
  max_pairs_per_prompt pairs, drawn uniformly without replacement from its eligible pairs (with `rng`).

  Returns Comparisons of int32 rows [n, p + c] (prompt ++ completion) and the prompt index [n] of each pair, so
  callers can hold out by prompt. No eligible pair anywhere gives arrays with leading dimension 0.
  """
  prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
  completion_tokens, completion_mask = np.asarray(completion_tokens), np.asarray(completion_mask)
  scores = np.asarray(scores)
  if group_size < 1 or max_pairs_per_prompt < 1:
    raise ValueError(f'group_size={group_size} and max_pairs_per_prompt={max_pairs_per_prompt} must be >= 1')
  num_prompts = prompt_tokens.shape[0]
  if prompt_mask.shape != prompt_tokens.shape or completion_mask.shape != completion_tokens.shape:
    raise ValueError(f'masks must match their tokens: prompt {prompt_tokens.shape} vs {prompt_mask.shape}, '
                     f'completion {completion_tokens.shape} vs {completion_mask.shape}')
  if completion_tokens.shape[0] != num_prompts * group_size or scores.shape != (num_prompts * group_size,):
    raise ValueError(f'{num_prompts} prompts x group_size={group_size} needs {num_prompts * group_size} completions '
                     f'and scores; got completions {completion_tokens.shape}, scores {scores.shape}')

  prompt_idx, chosen, rejected = [], [], []
  for g in range(num_prompts):
    s = scores[g * group_size:(g + 1) * group_size]
    better, worse = np.nonzero(s[:, None] > s[None, :])  # row-major, so the draw below is reproducible
    if len(better) > max_pairs_per_prompt:
      pick = np.sort(rng.choice(len(better), max_pairs_per_prompt, replace=False))
      better, worse = better[pick], worse[pick]
    prompt_idx += [g] * len(better)
    chosen += list(g * group_size + better)
    rejected += list(g * group_size + worse)
  prompt_idx, chosen, rejected = (np.asarray(a, np.int64) for a in (prompt_idx, chosen, rejected))

  def rows(tokens: np.ndarray, mask: np.ndarray, completions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([prompt_tokens[prompt_idx], tokens[completions]], axis=1).astype(np.int32),
            np.concatenate([prompt_mask[prompt_idx], mask[completions]], axis=1).astype(np.int32))

  return (Comparisons(*rows(completion_tokens, completion_mask, chosen),
                      *rows(completion_tokens, completion_mask, rejected)), prompt_idx)


def concat_comparisons(*cs: Comparisons) -> Comparisons:
  """Comparisons stacked along the pair axis; all must have the same row length."""
  if not cs:
    raise ValueError('concat_comparisons needs at least one Comparisons')
  lengths = sorted({np.shape(c.chosen_tokens)[1] for c in cs})
  if len(lengths) > 1:
    raise ValueError(f'cannot concatenate comparisons of different row lengths {lengths}')
  return Comparisons(*(np.concatenate([np.asarray(c[k]) for c in cs]) for k in range(len(Comparisons._fields))))


def take_comparisons(c: Comparisons, idx: np.ndarray) -> Comparisons:
  """The pairs at idx [m] (any numpy index along the pair axis)."""
  return Comparisons(*(np.asarray(a)[idx] for a in c))
