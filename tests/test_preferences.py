"""Tests for grpo_jax/data/preferences.py: the JSONL loader's errors, the row layout of encoded pairs, and pairs
drawn from GRPO groups."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from grpo_jax.data.preferences import (
  PreferencePair,
  comparisons_from_groups,
  concat_comparisons,
  encode_pairs,
  load_preference_jsonl,
  take_comparisons,
)
from grpo_jax.data.tasks import vocabulary
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.reward_model import Comparisons


@pytest.fixture(scope='module')
def tok():
  return build_tokenizer(vocabulary())


def _write(tmp_path, lines: list[str]):
  path = tmp_path / 'prefs.jsonl'
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return path


GOOD = json.dumps({'prompt': '1+2', 'chosen': '3', 'rejected': '4'})

# ---------------------------------------------------------------------------------------------------------------
# load_preference_jsonl


def test_load_skips_blank_lines(tmp_path):
  path = _write(tmp_path, [GOOD, '', '   ', json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'x': 1})])
  assert load_preference_jsonl(path) == [PreferencePair('1+2', '3', '4'), PreferencePair('p', 'a', 'b')]


@pytest.mark.parametrize('bad, message', [
  ('{"prompt": "p", "chosen": ', 'broken JSON'),
  ('["p", "a", "b"]', 'expected a JSON object, got list'),
  ('{"prompt": "p", "chosen": "a"}', "no field 'rejected'"),
  ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "field 'chosen' must be a string, got int"),
  ('{"prompt": null, "chosen": "a", "rejected": "b"}', "field 'prompt' must be a string, got NoneType"),
  ('{"prompt": "p", "chosen": "same", "rejected": "same"}', 'are the same text'),
])
def test_load_errors_name_file_and_line(tmp_path, bad, message):
  path = _write(tmp_path, [GOOD, '', bad, GOOD])  # the bad record is on line 3: the blank line 2 still counts
  with pytest.raises(ValueError, match=re.escape(f'{path}:3: ') + '.*' + re.escape(message)):
    load_preference_jsonl(path)


def test_load_missing_and_empty_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nope.jsonl'))):
    load_preference_jsonl(tmp_path / 'nope.jsonl')
  path = _write(tmp_path, ['', '  '])
  with pytest.raises(ValueError, match=re.escape(f'{path} is empty')):
    load_preference_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------
# encode_pairs


def test_encode_pairs_layout(tok):
  """Template 'qa' makes the prompt 'Q: 1+2\\nA: ' (10 characters, one token each on this tokenizer)."""
  pad, eos = tok.pad_token_id, tok.eos_token_id
  ids = lambda s: tok.convert_tokens_to_ids(list(s))
  c = encode_pairs(tok, [PreferencePair('1+2', '3', '45'), PreferencePair('9', '', '7')], max_prompt_len=12,
                   max_new_tokens=4)
  assert all(a.shape == (2, 16) and a.dtype == np.int32 for a in c)
  prompt0 = [pad, pad] + ids('Q: 1+2\nA: ')
  np.testing.assert_array_equal(c.chosen_tokens[0], prompt0 + ids('3') + [eos, pad, pad])
  np.testing.assert_array_equal(c.chosen_mask[0], [0, 0] + [1] * 10 + [1, 1, 0, 0])
  np.testing.assert_array_equal(c.rejected_tokens[0], prompt0 + ids('45') + [eos, pad])
  np.testing.assert_array_equal(c.rejected_mask[0], [0, 0] + [1] * 10 + [1, 1, 1, 0])
  prompt1 = [pad] * 4 + ids('Q: 9\nA: ')
  np.testing.assert_array_equal(c.chosen_tokens[1], prompt1 + [eos, pad, pad, pad])  # an empty completion: EOS
  np.testing.assert_array_equal(c.chosen_mask[1], [0] * 4 + [1] * 8 + [1, 0, 0, 0])
  np.testing.assert_array_equal(c.rejected_tokens[1], prompt1 + ids('7') + [eos, pad, pad])
  np.testing.assert_array_equal(c.rejected_mask[1], [0] * 4 + [1] * 8 + [1, 1, 0, 0])


def test_encode_pairs_plain_template_fills_exactly(tok):
  c = encode_pairs(tok, [PreferencePair('ab', 'cde', 'f')], max_prompt_len=2, max_new_tokens=4, template='plain')
  np.testing.assert_array_equal(c.chosen_tokens[0], tok.convert_tokens_to_ids(list('abcde')) + [tok.eos_token_id])
  np.testing.assert_array_equal(c.chosen_mask[0], [1] * 6)


def test_encode_pairs_too_long(tok, capsys):
  pairs = [PreferencePair('1', 'a', 'b'), PreferencePair('1', 'a', 'bbbb'), PreferencePair('123456', 'a', 'b'),
           PreferencePair('1', 'aaaa', 'b')]
  with pytest.raises(ValueError, match='preference pair 1 has a 5-token rejected completion'):
    encode_pairs(tok, pairs, max_prompt_len=8, max_new_tokens=4)
  with pytest.raises(ValueError, match='preference pair 0 has a 13-token prompt, longer than max_prompt_len=8'):
    encode_pairs(tok, pairs[2:], max_prompt_len=8, max_new_tokens=4)  # the index is into the pairs given
  c = encode_pairs(tok, pairs, max_prompt_len=8, max_new_tokens=4, skip_long=True)
  assert c.chosen_tokens.shape == (1, 12)
  assert 'dropped 3 of 4 preference pairs' in capsys.readouterr().out


def test_encode_no_pairs(tok):
  c = encode_pairs(tok, [], max_prompt_len=8, max_new_tokens=4)
  assert all(a.shape == (0, 12) for a in c)


# ---------------------------------------------------------------------------------------------------------------
# comparisons_from_groups


def _groups():
  """P=2 prompts, G=3: prompt g is [g+1, g+1] (group 1's left-padded), completion k is [100 + k, 0]."""
  prompt_tokens = np.array([[1, 1], [0, 2]])
  prompt_mask = np.array([[1, 1], [0, 1]])
  completion_tokens = np.stack([100 + np.arange(6), np.zeros(6, int)], axis=1)
  completion_mask = np.array([[1, 0]] * 6)
  scores = np.array([1.0, 0.0, 1.0, 0.5, 0.2, 0.5])  # group 0: 0>1, 2>1; group 1: 3>4, 5>4
  return prompt_tokens, prompt_mask, completion_tokens, completion_mask, scores


def _pairs(c: Comparisons) -> set[tuple[int, int]]:
  return {(int(a), int(b)) for a, b in zip(c.chosen_tokens[:, 2] - 100, c.rejected_tokens[:, 2] - 100, strict=True)}


def test_groups_all_pairs():
  c, prompt_idx = comparisons_from_groups(*_groups(), group_size=3, max_pairs_per_prompt=10,
                                          rng=np.random.default_rng(0))
  assert _pairs(c) == {(0, 1), (2, 1), (3, 4), (5, 4)}
  assert all(a.shape == (4, 4) and a.dtype == np.int32 for a in c)
  for row, g in enumerate(prompt_idx):
    k_chosen, k_rejected = c.chosen_tokens[row, 2] - 100, c.rejected_tokens[row, 2] - 100
    assert k_chosen // 3 == k_rejected // 3 == g  # both completions belong to the pair's own prompt
    expected_prompt = [[1, 1], [0, 2]][g]
    np.testing.assert_array_equal(c.chosen_tokens[row], expected_prompt + [100 + k_chosen, 0])
    np.testing.assert_array_equal(c.rejected_tokens[row], expected_prompt + [100 + k_rejected, 0])
    np.testing.assert_array_equal(c.chosen_mask[row], [[1, 1], [0, 1]][g] + [1, 0])
    np.testing.assert_array_equal(c.rejected_mask[row], [[1, 1], [0, 1]][g] + [1, 0])
  np.testing.assert_array_equal(np.sort(prompt_idx), [0, 0, 1, 1])


def test_groups_max_pairs_is_uniform():
  """One pair per group: over 400 fixed seeds each eligible pair is drawn ~half the time (200, sd 10)."""
  counts: dict[tuple[int, int], int] = {}
  for seed in range(400):
    c, prompt_idx = comparisons_from_groups(*_groups(), group_size=3, max_pairs_per_prompt=1,
                                            rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(prompt_idx, [0, 1])
    for pair in _pairs(c):
      counts[pair] = counts.get(pair, 0) + 1
  assert set(counts) == {(0, 1), (2, 1), (3, 4), (5, 4)}
  assert all(150 <= v <= 250 for v in counts.values()), counts


def test_groups_graded_scores_and_no_pairs():
  tokens = np.arange(4)[:, None]
  c, prompt_idx = comparisons_from_groups(np.zeros((1, 1)), np.ones((1, 1)), tokens, np.ones((4, 1)),
                                          np.array([0.2, 0.9, 0.5, 0.5]), group_size=4, max_pairs_per_prompt=6,
                                          rng=np.random.default_rng(0))
  got = {(int(a), int(b)) for a, b in zip(c.chosen_tokens[:, 1], c.rejected_tokens[:, 1], strict=True)}
  assert got == {(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)}  # every higher-over-lower pair, no tie (2, 3)
  c, prompt_idx = comparisons_from_groups(*_groups()[:4], np.ones(6), group_size=3, max_pairs_per_prompt=2,
                                          rng=np.random.default_rng(0))
  assert all(a.shape == (0, 4) for a in c) and prompt_idx.shape == (0,)


def test_groups_shape_errors():
  p, pm, ct, cm, s = _groups()
  with pytest.raises(ValueError, match='needs 6 completions'):
    comparisons_from_groups(p, pm, ct, cm, s[:5], group_size=3, max_pairs_per_prompt=1, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match='needs 4 completions'):
    comparisons_from_groups(p, pm, ct, cm, s, group_size=2, max_pairs_per_prompt=1, rng=np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_concat_and_take():
  a = Comparisons(*(np.full((2, 3), v) for v in range(4)))
  b = Comparisons(*(np.full((1, 3), 10 + v) for v in range(4)))
  c = concat_comparisons(a, b)
  assert c.chosen_tokens.shape == (3, 3)
  np.testing.assert_array_equal(c.rejected_mask[:, 0], [3, 3, 13])
  t = take_comparisons(c, np.array([2, 0]))
  np.testing.assert_array_equal(t.chosen_mask[:, 0], [11, 1])
  with pytest.raises(ValueError, match=r'different row lengths \[2, 3\]'):
    concat_comparisons(a, Comparisons(*(np.zeros((1, 2)) for _ in range(4))))
