"""Overlong outputs (rl.overlong_penalty_len, rl.mask_truncated): DAPO's soft penalty and the truncated-output mask
against loop-by-loop numpy, the sampler's ended / truncated convention, and collect_rollout applying both."""
import jax
import numpy as np
import pytest
from flax import nnx

from grpo_jax.core.advantages import get_advantage_fn
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.models.transformer import ModelConfig, Transformer
from grpo_jax.rollout.rollout import collect_rollout, overlong_penalty, truncated_outputs
from grpo_jax.rollout.sampling import Completions, make_sampler


def penalty_loop(lengths, max_len, cache_len):
  """DAPO eq. 13, one output at a time: 0 if |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache up to
  L_max; -1 beyond."""
  out = []
  for y in lengths:
    if y <= max_len - cache_len:
      out.append(0.0)
    elif y <= max_len:
      out.append((max_len - cache_len - y) / cache_len)
    else:
      out.append(-1.0)
  return np.asarray(out, np.float32)


def test_overlong_penalty_matches_the_dapo_formula():
  lengths = np.arange(0, 25)
  for cache_len in (1, 4, 10, 20):
    np.testing.assert_allclose(overlong_penalty(lengths, max_len=20, cache_len=cache_len),
                               penalty_loop(lengths, 20, cache_len), rtol=0, atol=1e-6)
  # Worked: L_max 20, L_cache 4: length 16 -> 0, 18 -> -0.5, 20 -> -1.
  np.testing.assert_allclose(overlong_penalty(np.array([16, 18, 20]), max_len=20, cache_len=4), [0, -0.5, -1])
  with pytest.raises(ValueError, match='cache_len'):
    overlong_penalty(lengths, max_len=20, cache_len=0)


def truncated_loop(tokens, mask, eos_ids):
  return np.asarray([not any(m and t in eos_ids for t, m in zip(row, mrow, strict=True))
                     for row, mrow in zip(tokens, mask, strict=True)])


def test_truncated_outputs_matches_a_loop():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 6, (40, 7))
  mask = (np.arange(7)[None] < rng.integers(0, 8, (40, 1))).astype(np.int32)
  for eos in ((1,), (1, 3)):
    np.testing.assert_array_equal(truncated_outputs(tokens, mask, eos), truncated_loop(tokens, mask, eos))
  # An EOS in the padding does not end a row (pad_id may equal eos_id in real tokenizers).
  assert truncated_outputs(np.array([[5, 5, 1]]), np.array([[1, 1, 0]]), (1,)).tolist() == [True]


def test_the_samplers_rows_end_at_eos_or_at_the_budget():
  """The convention truncated_outputs reads: an ended row holds its EOS inside the mask, a truncated one fills the
  budget with no EOS."""
  tokenizer = build_tokenizer()
  cfg = ModelConfig(vocab_size=len(tokenizer), d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                    mlp_dim=32)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  eos = tuple(range(4, 4 + len(tokenizer) // 3))  # a third of the vocabulary ends a row: both kinds occur
  sampler = make_sampler(graphdef, max_new_tokens=6, eos_id=eos, pad_id=0, group_size=8)
  prompts = np.full((4, 3), 7, np.int32)
  out = jax.tree.map(np.asarray, sampler(params, prompts, np.ones_like(prompts), jax.random.key(0)))
  truncated = truncated_outputs(out.tokens, out.mask, eos)
  assert truncated.any() and not truncated.all()
  lengths = out.mask.sum(-1)
  assert (lengths[truncated] == 6).all()
  for row, n in zip(out.tokens[~truncated], lengths[~truncated], strict=True):
    assert row[n - 1] in eos and not np.isin(row[:n - 1], eos).any()


def fake_rollout_inputs(lengths, ended, rewards):
  """A collect_rollout input whose sampler returns rows of the given lengths, ended by EOS (id 1) or not."""
  tokenizer = build_tokenizer()
  n, c = len(lengths), 6
  tokens = np.full((n, c), 9, np.int32)
  mask = (np.arange(c)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  for i, (length, e) in enumerate(zip(lengths, ended, strict=True)):
    if e:
      tokens[i, length - 1] = 1
  tokens = np.where(mask > 0, tokens, 0)
  logprobs = np.where(mask > 0, -1.0, 0.0).astype(np.float32)
  sampler = lambda params, p, m, rng: Completions(tokens, mask, logprobs)  # noqa: E731
  prompts = TokenizedSplit(np.ones((n // 2, 2), np.int32), np.ones((n // 2, 2), np.int32), np.zeros((n // 2, 0)),
                           np.zeros((n // 2, 0)), ['1'] * (n // 2))
  by_text = iter(rewards)
  reward_fn = lambda texts, answers: np.asarray([next(by_text) for _ in texts], np.float32)  # noqa: E731
  return dict(sampler=sampler, ref_logprobs_fn=None, params=None, ref_params=None, prompts=prompts,
              rng=jax.random.key(0), group_size=2, tokenizer=tokenizer, reward_fn=reward_fn,
              advantage_fn=get_advantage_fn('grpo')), mask


def test_collect_rollout_penalizes_and_masks_overlong_outputs():
  lengths, ended, rewards = [6, 3, 5, 6], [False, True, True, True], [1.0, 1.0, 0.0, 0.0]
  kwargs, mask = fake_rollout_inputs(lengths, ended, rewards)
  rollout, stats, group_rewards = collect_rollout(**kwargs, eos_ids=(1,), overlong_penalty_len=2, mask_truncated=True,
                                                  return_rewards=True)
  # Budget 6, L_cache 2: lengths 6, 3, 5, 6 -> penalties -1, 0, -0.5, -1.
  expected = np.array([1.0 - 1.0, 1.0, 0.0 - 0.5, 0.0 - 1.0], np.float32)
  np.testing.assert_allclose(group_rewards.reshape(-1), expected)
  np.testing.assert_allclose(rollout.advantages, np.asarray(get_advantage_fn('grpo')(expected.reshape(2, 2))).ravel(),
                             rtol=1e-6)
  # Row 0 is truncated (no EOS): zero loss weight; the rest keep the sampled mask.
  np.testing.assert_array_equal(rollout.completion_mask, np.concatenate([0 * mask[:1], mask[1:]]))
  assert stats['truncated_frac'] == 0.25 and stats['overlong_penalty'] == pytest.approx(-2.5 / 4)
  assert stats['completion_len'] == np.mean(lengths)  # what was sampled, not what the loss reads


def test_collect_rollout_defaults_leave_rewards_and_masks_alone():
  lengths, ended, rewards = [6, 3, 5, 6], [False, True, True, True], [1.0, 1.0, 0.0, 0.0]
  kwargs, mask = fake_rollout_inputs(lengths, ended, rewards)
  rollout, stats = collect_rollout(**kwargs)
  np.testing.assert_array_equal(rollout.completion_mask, mask)
  assert stats['reward'] == 0.5 and 'truncated_frac' not in stats
  with pytest.raises(ValueError, match='mask_truncated needs eos_ids'):
    collect_rollout(**fake_rollout_inputs(lengths, ended, rewards)[0], mask_truncated=True)
