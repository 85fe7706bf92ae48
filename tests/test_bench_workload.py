"""The GSM8K-shaped benchmark's workload (benchmarks/gsm8k_workload.py) and our side's pieces
(benchmarks/gsm8k_step.py): the length draw, the prompts, the forced-length sampler wrapper, the must-do FLOPs."""
from __future__ import annotations

import json
import math
import random
import string
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models import flops
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.rollout.sampling import Completions, make_sampler

sys.path.insert(0, f'{ROOT}/benchmarks')
import gsm8k_workload as workload  # noqa: E402
from gsm8k_step import force_lengths, forced_length_sampler, must_do_flops, prompt_split  # noqa: E402

# The TRL baseline's vocabulary (its CHARS): every prompt character must be one of its tokens.
BASELINE_CHARS = set(string.digits + ' +-*/=:' + 'QA' + string.ascii_lowercase)
EOS, PAD, SPACE = 1, 0, 7


def test_length_draw_is_the_kumaraswamy_inverse_cdf():
  a, b = workload.KUMARASWAMY_A, workload.KUMARASWAMY_B
  for u in np.linspace(0.0, 0.999, 37):
    x = (1 - (1 - u) ** (1 / b)) ** (1 / a)
    assert workload.draw_length(float(u)) == min(30 + int(x * 227), 256)
  assert workload.draw_length(0.0) == 30 and workload.draw_length(1 - 1e-12) == 256


def test_completion_lengths_range_full_row_and_determinism():
  lengths = workload.completion_lengths(200, 64, seed=0)
  assert len(lengths) == 200 and all(len(step) == 64 for step in lengths)
  assert all(step.count(256) >= 1 for step in lengths)  # both samplers decode 256 steps every step
  flat = np.array(lengths).ravel()
  assert flat.min() >= 30 and flat.max() == 256
  # Mean of 30 + floor(227 x) with x ~ Kumaraswamy(a, b): E[x] = b B(1 + 1/a, b); the floor takes ~0.5 off.
  a, b = workload.KUMARASWAMY_A, workload.KUMARASWAMY_B
  mean_x = b * math.gamma(1 + 1 / a) * math.gamma(b) / math.gamma(1 + 1 / a + b)
  drawn = np.sort(flat)[:-200]  # without one 256 per step: the rows the draw gave (a forced row replaced one)
  assert abs(drawn.mean() - (29.5 + 227 * mean_x)) < 2.0
  assert np.median(flat) < np.mean(flat)  # right-skewed
  assert workload.completion_lengths(3, 64, seed=0) == lengths[:3]
  assert workload.completion_lengths(3, 64, seed=1) != lengths[:3]


def test_prompts_lengths_characters_answers():
  P = 4
  rows = workload.prompts(30, P, seed=0)
  assert len(rows) == 30 * P
  chars = [len(text) for text, _ in rows]
  assert min(chars) >= workload.PROMPT_TOKENS_MIN - 1 and max(chars) <= workload.PROMPT_TOKENS_MAX - 1
  for k in range(30):  # one prompt of every step is the longest: TRL's per-step padding = our fixed width
    assert max(chars[k * P:(k + 1) * P]) == workload.PROMPT_TOKENS_MAX - 1
  assert 148 <= np.mean(chars) + 1 <= 155  # about 150 tokens with <bos>
  for text, answer in rows:
    assert text.startswith('Q: ') and text.endswith(' A:') and set(text) <= BASELINE_CHARS
    assert '  ' not in text and int(answer) >= 0
  assert workload.prompts(2, P, seed=0) == rows[:2 * P]


@pytest.mark.parametrize('chars', range(100, 170, 7))
def test_question_has_the_exact_length(chars):
  text, _ = workload.question(random.Random(chars), chars)
  assert len(text) == chars


def test_prompt_split_left_pads_bos_and_characters():
  tokenizer = build_tokenizer(characters=''.join(sorted(BASELINE_CHARS)))
  rows = workload.prompts(1, 4, seed=0)
  split = prompt_split(tokenizer, rows, width=160)
  assert split.prompt_tokens.shape == (4, 160)
  for i, (text, answer) in enumerate(rows):
    n = len(text) + 1  # one token per character, plus <bos>
    assert split.prompt_mask[i].sum() == n and split.prompt_mask[i, 160 - n:].all()
    assert split.prompt_tokens[i, 160 - n] == tokenizer.bos_token_id
    assert tokenizer.decode(split.prompt_tokens[i, 160 - n + 1:]) == text and split.answers[i] == answer
    assert (split.prompt_tokens[i, :160 - n] == tokenizer.pad_token_id).all()
  with pytest.raises(ValueError, match='more than width'):
    prompt_split(tokenizer, rows, width=150)


def _expected_cut(tokens, logprobs, lengths):
  """force_lengths transcribed as loops."""
  out_t, out_m, out_l = np.full_like(tokens, PAD), np.zeros_like(tokens), np.zeros_like(logprobs)
  for r, n in enumerate(lengths):
    for j in range(n):
      out_t[r, j] = EOS if j == n - 1 else (SPACE if tokens[r, j] == EOS else tokens[r, j])
      out_m[r, j], out_l[r, j] = 1, logprobs[r, j]
  return out_t, out_m, out_l


def test_force_lengths_against_loops():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 6, (6, 12)).astype(np.int32)  # EOS (1) appears mid-row: replaced
  logprobs = -rng.random((6, 12)).astype(np.float32)
  lengths = np.array([1, 12, 5, 3, 12, 7], np.int32)
  out = force_lengths(Completions(tokens, np.ones_like(tokens), logprobs), lengths, eos_id=EOS, pad_id=PAD,
                      replace_id=SPACE)
  expected = _expected_cut(tokens, logprobs, lengths)
  for got, want in zip(out, expected, strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_forced_length_sampler_on_a_real_sampler():
  cfg = ModelConfig(vocab_size=12, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  sampler = make_sampler(graphdef, max_new_tokens=10, eos_id=(-1,), pad_id=PAD, temperature=1.0, group_size=3)
  prompts = np.array([[0, 2, 3, 4], [5, 6, 7, 8]], np.int32)
  mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
  lengths = [10, 1, 4, 7, 2, 9]
  raw = sampler(params, prompts, mask, jax.random.key(3))
  out = forced_length_sampler(sampler, lengths, eos_id=EOS, pad_id=PAD, replace_id=SPACE)(
      params, prompts, mask, jax.random.key(3))
  tokens, got_mask = np.asarray(out.tokens), np.asarray(out.mask)
  np.testing.assert_array_equal(got_mask.sum(1), lengths)
  for r, n in enumerate(lengths):
    assert tokens[r, n - 1] == EOS and EOS not in tokens[r, :n - 1] and (tokens[r, n:] == PAD).all()
  for got, want in zip(out, _expected_cut(np.asarray(raw.tokens), np.asarray(raw.logprobs), lengths), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(ValueError, match='lengths for 6 rows'):
    forced_length_sampler(sampler, [11] * 6, eos_id=EOS, pad_id=PAD, replace_id=SPACE)(
        params, prompts, mask, jax.random.key(3))


def test_must_do_flops_against_a_per_token_loop():
  cfg = ModelConfig(vocab_size=10, d_model=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2, mlp_dim=8)
  prompt_lens, lengths, G = [5, 3], [4, 1, 6, 2, 2, 3], 3

  def token(keys):  # one token's FLOPs: 2 per multiply-add of every weight, q.k and p.v over `keys` keys
    return 2 * flops.matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys

  prefill = sum(token(t) for p in prompt_lens for t in range(1, p + 1))
  completions = sum(token(prompt_lens[r // G] + j) for r, n in enumerate(lengths) for j in range(1, n + 1))
  decode = sum(token(prompt_lens[r // G] + j) for r in range(len(lengths)) for j in range(1, max(lengths) + 1))
  got = must_do_flops(cfg, prompt_lens=prompt_lens, completion_lens=lengths, group_size=G, reference=True)
  assert got['prefill'] == prefill and got['decode'] == decode
  assert got['reference_forward'] == prefill + completions
  assert got['policy_forward_backward'] == 3 * (prefill + completions)
  assert got['total'] == prefill + decode + 4 * (prefill + completions)  # prefill, decode, reference, 3x policy
  no_ref = must_do_flops(cfg, prompt_lens=prompt_lens, completion_lens=lengths, group_size=G, reference=False,
                         num_epochs=2)
  assert no_ref['reference_forward'] == 0 and no_ref['policy_forward_backward'] == 6 * (prefill + completions)
  with pytest.raises(ValueError, match='6 completion lengths for 3 prompts'):
    must_do_flops(cfg, prompt_lens=[1, 2, 3], completion_lens=lengths, group_size=G, reference=True)


def test_compare_keys_rows_by_workload(tmp_path, capsys):
  import compare

  def row(impl, workload, step_s, length=256):
    r = {'impl': impl, 'max_completion_length': length, 'step_time_median_clean_s': step_s,
         'step_time_median_s': step_s, 'gen_tokens_per_s': 1000 / step_s, 'gen_only_tokens_per_s': 2000 / step_s,
         'peak_rss_mb': 1000.0, 'clean_steps': 4}
    return {**r, 'workload': workload} if workload else r

  rows = [row('trl', 'gsm8k', 9.0), row('grpo_jax', 'gsm8k', 3.0), row('trl', 'gsm8k', 11.0),
          row('trl', None, 1.0, 32), row('grpo_jax', None, 0.5, 32)]
  path = tmp_path / 'results.jsonl'
  path.write_text('\n'.join(map(json.dumps, rows)) + '\n')
  compare.main(str(path))
  out = capsys.readouterr().out.splitlines()
  # TRL's two gsm8k runs average to 10 s: ours at 3 s is x3.33; the baseline workload's rows stay keyed by L alone.
  assert any(line.startswith('gsm8k/256') and 'grpo_jax / TRL: step speed-up x3.33' in line for line in out)
  assert any(line.split()[0] == '32' and 'grpo_jax / TRL: step speed-up x2.00' in line for line in out)
