"""Token credit by prefix resampling: core.advantages.prefix_value_advantages against a numpy loop, the continuation
prompts and joins of rollout/prefix_credit.py against hand-built ones, values of a greedy policy, the config checks,
and a tiny GRPO run with the mode on."""
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from conftest import ROOT, count_compiles, load_config, train_command
from helpers import CUTS, C, cached_sampler, char_reward, left_pad, policy_fixture, policy_rollout, tokenizer_fixture

from grpo_jax.core.advantages import group_advantages, prefix_value_advantages
from grpo_jax.data.tasks import generate_split
from grpo_jax.data.tokenizer import decode
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.rollout.prefix_credit import continuation_prompts, cut_positions, join_continuations, prefix_credit

# The fixtures this file's tests take, under the names pytest finds them by.
tokenizer, policy = tokenizer_fixture, policy_fixture


def _loop_advantages(rewards, values, cuts, mask, scale, eps=1e-6):
  """The formula written out: V_0 = group mean, V_{J+1} = r_i, token t of segment s (cut_s <= t < cut_{s+1},
  cut_0 = 0) gets (V_{s+1} - V_s) / (std + eps), std over the group's (or batch's) rewards and prefix values."""
  p, g, j = values.shape
  t_len = mask.shape[-1]
  out = np.zeros((p, g, t_len))
  everything = [x for q in range(p) for i in range(g) for x in [rewards[q, i], *values[q, i]]]
  for q in range(p):
    group = [x for i in range(g) for x in [rewards[q, i], *values[q, i]]]
    std = {'group': np.std(group), 'batch': np.std(everything), 'none': None}[scale]
    for i in range(g):
      chain = [sum(rewards[q]) / g, *values[q, i], rewards[q, i]]
      bounds = [0, *cuts[q, i], t_len]
      for s in range(j + 1):
        for t in range(bounds[s], bounds[s + 1]):
          change = chain[s + 1] - chain[s]
          out[q, i, t] = (change if std is None else change / (std + eps)) * mask[q, i, t]
  return out


@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_prefix_value_advantages_against_a_loop(scale):
  rng = np.random.default_rng(0)
  p, g, j, t = 3, 4, 3, 11
  lengths = rng.integers(0, t + 1, (p, g))
  mask = (np.arange(t) < lengths[..., None]).astype(np.int32)
  cuts = np.sort(rng.integers(0, t, (p, g, j)), axis=-1)
  cuts[0, 0] = [2, 2, 5]  # a repeated cut: an empty segment
  rewards = (rng.random((p, g)) < 0.5).astype(np.float32)
  values = rng.integers(0, 5, (p, g, j)).astype(np.float32) / 4  # means of K = 4 rewards
  got = np.asarray(prefix_value_advantages(rewards, values, cuts, mask, scale=scale))
  np.testing.assert_allclose(got, _loop_advantages(rewards, values, cuts, mask, scale), rtol=1e-5, atol=1e-6)


def test_without_cuts_it_is_the_outcome_advantage_on_every_token():
  rng = np.random.default_rng(1)
  rewards = rng.random((5, 4)).astype(np.float32)
  mask = np.ones((5, 4, 6), np.int32)
  mask[0, 0, 3:] = 0
  got = prefix_value_advantages(rewards, np.zeros((5, 4, 0)), np.zeros((5, 4, 0), int), mask)
  want = np.asarray(group_advantages(rewards))[..., None] * mask
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_segment_changes_add_up_to_the_group_mean_advantage_and_a_tied_group_stays_finite():
  # Group: rewards [0, 0] (tied: no outcome signal), values at cuts 1 and 2: [1, 0] and [0, 0]. Unscaled, output 0
  # gets 1 - 0 on token 0, 0 - 1 on token 1, 0 - 0 on token 2: the changes sum to r - mean = 0.
  rewards = np.zeros((1, 2), np.float32)
  values = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
  cuts = np.array([[[1, 2], [1, 2]]])
  mask = np.ones((1, 2, 3), np.int32)
  np.testing.assert_allclose(np.asarray(prefix_value_advantages(rewards, values, cuts, mask, scale='none'))[0],
                             [[1, -1, 0], [0, 0, 0]])
  scaled = np.asarray(prefix_value_advantages(rewards, values, cuts, mask))
  std = np.std([0, 1, 0, 0, 0, 0])  # the group's rewards and prefix values
  np.testing.assert_allclose(scaled[0, 0], [1 / std, -1 / std, 0], rtol=1e-5)


def test_cut_positions_floor_of_the_fraction_of_each_length():
  mask = (np.arange(10) < np.array([10, 7, 1, 0])[:, None]).astype(np.int32)
  want = [[int(f * n) for f in (0.25, 0.5, 0.9)] for n in (10, 7, 1, 0)]
  np.testing.assert_array_equal(cut_positions(mask, (0.25, 0.5, 0.9)), want)


def test_continuation_prompts_hold_exactly_the_prompt_then_the_prefix(tokenizer):
  examples = generate_split('train', 2, seed=0)
  pad = tokenizer.pad_token_id
  encode = lambda text: tokenizer(text, add_special_tokens=False)['input_ids']  # noqa: E731
  prompt_texts = [f'Q: {e.question}\nA: ' for e in examples]
  prompts, prompt_mask = left_pad([encode(t) for t in prompt_texts], 70, pad)
  solutions = [e.solution for e in examples]
  c = max(len(encode(s)) for s in solutions) + 1
  completions = np.full((2, c), pad, np.int32)
  mask = np.zeros((2, c), np.int32)
  for i, s in enumerate(solutions):
    ids = encode(s) + [tokenizer.eos_token_id]
    completions[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  cuts = cut_positions(mask, (0.1, 0.5, 0.9))
  tokens, cont_mask = continuation_prompts(prompts, prompt_mask, completions, cuts, pad_id=pad)
  assert tokens.shape == (6, 70 + c)
  texts = decode(tokenizer, tokens, cont_mask)
  for n in range(2):
    for j in range(3):
      row = n * 3 + j
      assert texts[row] == prompt_texts[n] + tokenizer.decode(completions[n, :cuts[n, j]])
      real = cont_mask[row].astype(bool)
      assert real[np.argmax(real):].all()  # left-padded: one run of real tokens at the end
      assert (tokens[row, ~real] == pad).all()


def test_join_continuations_against_a_loop():
  rng = np.random.default_rng(2)
  n, j, k, c = 3, 2, 2, 7
  completions = rng.integers(1, 50, (n, c))
  cuts = np.sort(rng.integers(0, c, (n, j)), axis=-1)
  cont = rng.integers(1, 50, (n * j * k, c))
  cont_len = rng.integers(0, c + 1, n * j * k)
  cont_mask = (np.arange(c) < cont_len[:, None]).astype(np.int32)
  tokens, mask = join_continuations(completions, cuts, cont, cont_mask, pad_id=0)
  for row in range(n * j * k):
    cut = cuts[row // (j * k), (row // k) % j]
    want = list(completions[row // (j * k), :cut]) + list(cont[row, :cont_len[row]])
    want = want[:c]
    assert list(tokens[row, :len(want)]) == want and mask[row].sum() == len(want)
    assert (tokens[row, len(want):] == 0).all() and (mask[row, len(want):] == 0).all()


def test_greedy_continuations_of_a_greedy_rollout_reproduce_it(tokenizer, policy):
  # Greedy outputs continued greedily from their own prefixes come out unchanged, so every prefix's value is the
  # output's reward: each output's first segment gets r_i - mean, every later one 0.
  graphdef, params, eos = policy
  rollout, split = policy_rollout(tokenizer, policy, True)
  tokens, mask = rollout.completion_tokens, rollout.completion_mask
  assert len(set(mask.sum(1))) > 1  # outputs of several lengths
  greedy_k = cached_sampler(graphdef, eos, tokenizer.pad_token_id, group_size=3, greedy=True)
  out, stats = prefix_credit(rollout, split, greedy_k, params, jax.random.key(0), group_size=2, continuations=3,
                             cut_fractions=CUTS, tokenizer=tokenizer, reward_fn=char_reward, scale='none')
  rewards = char_reward(decode(tokenizer, tokens, mask), None)
  cuts = cut_positions(mask, CUTS)
  first = rewards - np.repeat(rewards.reshape(-1, 2).mean(1), 2)
  want = np.where(np.arange(C) < cuts[:, :1], first[:, None], 0.0) * mask
  assert np.abs(want).sum() > 0
  np.testing.assert_allclose(out.advantages, want, atol=1e-6)
  lengths = mask.sum(1)
  assert stats['prefix_continuation_tokens'] == 3 * sum(int(lengths[i] - cuts[i, j]) for i in range(6)
                                                        for j in range(2))
  # A row that ran to the budget without a stop token continues past it from every prefix: cut off.
  unended = [not np.isin(tokens[i, lengths[i] - 1], eos) for i in range(6)]
  assert stats['prefix_truncated'] == pytest.approx(np.mean(unended))


def test_values_of_a_greedy_continuation_policy_equal_the_greedy_continuations_reward(tokenizer, policy):
  # Sampled outputs, greedy continuations: all K continuations of a prefix are the one greedy continuation, decoded
  # here separately (group_size 1, prompts built by hand at another width), so each value is its reward.
  graphdef, params, eos = policy
  rollout, split = policy_rollout(tokenizer, policy, False)
  greedy_k = cached_sampler(graphdef, eos, tokenizer.pad_token_id, group_size=3, greedy=True)
  out, _ = prefix_credit(rollout, split, greedy_k, params, jax.random.key(0), group_size=2, continuations=3,
                         cut_fractions=CUTS, tokenizer=tokenizer, reward_fn=char_reward, scale='none')
  tokens, mask = rollout.completion_tokens, rollout.completion_mask
  cuts = cut_positions(mask, CUTS)
  rows = [list(rollout.prompt_tokens[i][rollout.prompt_mask[i] > 0]) + list(tokens[i, :cuts[i, j]])
          for i in range(6) for j in range(2)]
  prompts, prompt_mask = left_pad(rows, 64 + C + 5, tokenizer.pad_token_id)
  greedy_1 = cached_sampler(graphdef, eos, tokenizer.pad_token_id, group_size=1, greedy=True)
  cont = greedy_1(params, prompts, prompt_mask, jax.random.key(9))
  texts = []
  for r, (t, m) in enumerate(zip(np.asarray(cont.tokens), np.asarray(cont.mask), strict=True)):
    i, j = divmod(r, 2)
    budget = C - cuts[i, j]
    texts.append(tokenizer.decode(list(tokens[i, :cuts[i, j]]) + list(t[m > 0][:budget]), skip_special_tokens=True))
  values = char_reward(texts, None).reshape(6, 2)
  rewards = char_reward(decode(tokenizer, tokens, mask), None)
  # Rebuild the advantages from these values and compare: the segment after cut 0 carries V_1 - V_0, etc.
  want = prefix_value_advantages(rewards.reshape(3, 2), values.reshape(3, 2, 2), cuts.reshape(3, 2, 2),
                                 mask.reshape(3, 2, C), scale='none')
  np.testing.assert_allclose(out.advantages, np.asarray(want).reshape(6, C), atol=1e-6)


@pytest.mark.parametrize('overrides, pattern', [
    ({'rl.prefix_continuations': 0}, r'config\.rl\.prefix_continuations must be an int >= 1'),
    ({'rl.prefix_cuts': (0.5, 1.0)}, r'config\.rl\.prefix_cuts=\(0\.5, 1\.0\) must be a non-empty tuple'),
    ({'rl.prefix_cuts': (0.0, 0.5)}, r'prefix_cuts=\(0\.0, 0\.5\) must be'),
    ({'rl.prefix_cuts': (0.6, 0.3)}, r'strictly increasing'),
    ({'rl.prefix_cuts': ()}, r'non-empty'),
    ({'rl.reward_source': 'mix'}, r"rl\.reward_source='mix'.*set rl\.reward_source='verifier'"),
    ({'rl.overlong_penalty_len': 4}, r"overlong_penalty_len=4 with rl\.supervision='prefix_resample' is unsupported"),
    ({'rl.dynamic_sampling': True}, r"dynamic_sampling with rl\.supervision='prefix_resample' is unsupported"),
    ({'rl.importance_ratio': 'sequence'}, r"importance_ratio='sequence' \(GSPO\) with rl\.supervision="
                                           r"'prefix_resample' is unsupported"),
    ({'rl.supervision': 'prefix'}, r"config\.rl\.supervision='prefix' is unknown; known: \['outcome', "
                                   r"'prefix_resample', 'process'\]"),
])
def test_config_errors(overrides, pattern):
  cfg = load_config('tiny')
  cfg.rl.supervision = 'prefix_resample'
  check_config(cfg, 1)  # the mode itself is fine
  for path, value in overrides.items():
    group, name = path.split('.')
    cfg[group][name] = value
  with pytest.raises(ValueError, match=pattern):
    check_config(cfg, 1)


def test_the_default_config_leaves_the_mode_off():
  cfg = load_config()
  assert cfg.rl.supervision == 'outcome' and cfg.rl.prefix_continuations >= 1


def test_tiny_grpo_run_with_prefix_resampling(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cmd = train_command(tmp_path, '--config.rl.supervision=prefix_resample', '--config.rl.num_steps=2',
                      '--config.rl.prefix_continuations=2', '--config.sft.max_steps=2', '--config.sft.eval_every=2')
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [r for r in map(json.loads, f) if r['stage'] == 'grpo']
  assert len(rows) == 2
  for r in rows:
    assert r['prefix_continuation_tokens'] > 0 and 0 <= r['prefix_value_change'] <= 1
    assert np.isfinite(r['loss'])


def test_one_compile_serves_every_cut_and_step(tokenizer, policy):
  # Continuation prompts are always [N * J, p + c], whatever the cuts: a new rollout (other lengths, other cuts)
  # compiles nothing new.
  graphdef, params, eos = policy
  sampler = cached_sampler(graphdef, eos, tokenizer.pad_token_id, group_size=2)
  kw = dict(group_size=2, continuations=2, cut_fractions=CUTS, tokenizer=tokenizer, reward_fn=char_reward)
  first, second = policy_rollout(tokenizer, policy, True), policy_rollout(tokenizer, policy, False)
  assert (cut_positions(first[0].completion_mask, CUTS) != cut_positions(second[0].completion_mask, CUTS)).any()
  prefix_credit(*first, sampler, params, jax.random.key(1), **kw)
  _, compiles = count_compiles(lambda: prefix_credit(*second, sampler, params, jax.random.key(2), **kw)[0].advantages)
  assert compiles == 0
