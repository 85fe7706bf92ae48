"""Reward sources, the reward model's agreement with the verifier, process supervision on a rollout, and the reward
model's initialization from the SFT backbone: each against a plain transcription or a hand-worked value."""
import numpy as np
import pytest
from flax import nnx

from grpo_jax.core.advantages import process_advantages
from grpo_jax.data.batches import TokenizedSplit
from grpo_jax.data.tasks import generate_split, vocabulary
from grpo_jax.data.tokenizer import build_tokenizer
from grpo_jax.rewards.steps import arithmetic_steps
from grpo_jax.rollout.rollout import Rollout, agreement, combine_rewards, group_signal, process_supervision
from grpo_jax.rollout.steps import delimiter_token_ids


def test_combine_rewards_by_source():
  rule, learned = np.array([1.0, 0.0, 0.5], np.float32), np.array([2.0, -1.0, 0.0], np.float32)
  np.testing.assert_array_equal(combine_rewards(rule, learned, source='verifier', mix=0.3), rule)
  np.testing.assert_array_equal(combine_rewards(rule, learned, source='reward_model', mix=0.3), learned)
  expected = 0.7 * rule + 0.3 / (1 + np.exp(-learned))  # sigmoid(0) = 0.5 for the third
  np.testing.assert_allclose(combine_rewards(rule, learned, source='mix', mix=0.3), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='needs the reward model'):
    combine_rewards(rule, None, source='mix', mix=0.3)


def test_group_signal_against_a_loop():
  rng = np.random.default_rng(0)
  correct = (rng.random((50, 4)) < 0.3).astype(np.float32)
  rewards = correct + 0.5 * (rng.random((50, 4)) < 0.1)  # a shaping bonus on some outputs
  rewards[:5] = 0.25  # tied groups
  correct[:5] = 0.0
  stats = group_signal(rewards, correct)
  stds, tied, solved = [], 0, 0
  for r, c in zip(rewards.tolist(), correct.tolist(), strict=True):
    mean = sum(r) / len(r)
    stds.append((sum((x - mean) ** 2 for x in r) / len(r)) ** 0.5)
    tied += len(set(r)) == 1
    solved += any(x >= 1 for x in c)
  assert stats['reward_std_in_group'] == pytest.approx(sum(stds) / 50, rel=1e-6)
  assert stats['frac_groups_no_signal'] == tied / 50 and tied >= 5
  assert stats['pass_at_g'] == solved / 50 and 0 < solved < 45


def test_weak_signal_warning_says_which_way():
  from grpo_jax.pipeline.grpo import weak_signal_warning
  assert weak_signal_warning('grpo', 0.5, 0.1) is None and weak_signal_warning('grpo', None, None) is None
  unsolved = weak_signal_warning('grpo', 0.8, 0.2)
  assert unsolved.startswith('grpo: 80% of groups had no reward variance') and 'none of the G outputs' in unsolved
  assert 'all G outputs' in weak_signal_warning('grpo_2', 0.7, 0.9)
  assert 'not logged' in weak_signal_warning('grpo', 0.7, None)  # metrics from before pass_at_g existed


def test_agreement_counts_the_verifier_ordered_pairs_of_each_group():
  # Group 1: correct [1, 0, 0], scores [3, 1, 5]: pairs (0>1) right, (0>2) wrong -> 1 of 2.
  # Group 2: all correct: no ordered pair. Group 3: correct [0, 1, 0], scores [0, 2, 1]: (1>0), (1>2) right -> 2 of 2.
  correct = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0], np.float32)
  learned = np.array([3, 1, 5, 0, 0, 0, 0, 2, 1], np.float32)
  assert agreement(learned, correct, 3) == (3 / 4, 4)
  value, n = agreement(learned, np.ones(9, np.float32), 3)
  assert np.isnan(value) and n == 0


def _rollout(tokenizer, texts, prompts, group_size):
  ids = [tokenizer(t, add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id] for t in texts]
  c = max(map(len, ids))
  tokens = np.full((len(ids), c), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(ids), c), np.int32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  p_ids = [tokenizer(f'Q: {e.question}\nA: ', add_special_tokens=False)['input_ids'] for e in prompts]
  p = max(map(len, p_ids))
  ptok = np.full((len(prompts), p), tokenizer.pad_token_id, np.int32)
  pmask = np.zeros((len(prompts), p), np.int32)
  for i, row in enumerate(p_ids):
    ptok[i, p - len(row):], pmask[i, p - len(row):] = row, 1
  split = TokenizedSplit(ptok, pmask, np.zeros((len(prompts), 0), np.int32), np.zeros((len(prompts), 0), np.int32),
                         [e.answer for e in prompts])
  n = len(texts)
  rollout = Rollout(np.repeat(ptok, group_size, 0), np.repeat(pmask, group_size, 0), tokens, mask,
                    np.zeros((n, c), np.float32), np.zeros((n, c), np.float32), np.zeros(n, np.float32))
  return rollout, split


def test_process_supervision_gives_each_token_the_normalized_rewards_of_steps_ending_at_or_after_it():
  tokenizer = build_tokenizer(vocabulary())
  prompts = generate_split('train', 2, seed=0)
  wrong = [prompts[0].solution.replace('\n', 'X\n', 1), '#### 3']
  texts = [prompts[0].solution, wrong[0], wrong[1], prompts[1].solution, prompts[1].solution[:9], 'garbage']
  rollout, split = _rollout(tokenizer, texts, prompts, 3)
  out, stats = process_supervision(rollout, split, tokenizer, group_size=3, step_verifier=arithmetic_steps,
                                   delimiter_ids=delimiter_token_ids(tokenizer, '\n'))
  assert out.advantages.shape == rollout.completion_tokens.shape
  # The same by hand: split each text at its newlines, score the steps, normalize over the group, sum from each
  # token to the end.
  tokens, mask = rollout.completion_tokens, rollout.completion_mask
  newline = tokenizer('\n', add_special_tokens=False)['input_ids'][0]
  expected = np.zeros(tokens.shape, np.float32)
  for g in range(2):
    rows = range(3 * g, 3 * g + 3)
    ends, rewards = {}, {}
    for n in rows:
      last = int(mask[n].sum()) - 1
      ends[n] = [t for t in range(last) if tokens[n, t] == newline] + [last]
      prompt = f'Q: {prompts[g].question}\nA: '
      rewards[n] = arithmetic_steps(prompt, texts[n].split('\n') if '\n' in texts[n] else [texts[n]], split.answers[g])
      rewards[n] = rewards[n][:len(ends[n])]
    flat = np.array([r for n in rows for r in rewards[n]], np.float64)
    normalized = (flat - flat.mean()) / (flat.std() + 1e-6)
    k = 0
    for n in rows:
      for end, _ in zip(ends[n], rewards[n], strict=True):
        expected[n, :end + 1] += normalized[k]
        k += 1
  np.testing.assert_allclose(out.advantages, expected, rtol=1e-5, atol=1e-5)
  assert stats['delimiters'] > 0 and stats['steps_per_output'] > 1
  # The same through core.advantages directly, on one group's step rewards written by hand.
  assert process_advantages(np.array([[[1.0], [0.0]]]), np.array([[[1], [0]]]), np.ones((1, 2, 1)),
                            num_tokens=2).shape == (1, 2, 2)


def test_reward_model_starts_from_the_sft_backbone_with_a_zero_head(tiny_config):
  from grpo_jax.pipeline import reward_model
  from grpo_jax.pipeline.setup import build_setup
  tiny_config.cpu_devices = 0
  setup = build_setup(tiny_config, data=False)
  rm = reward_model.spec(setup)
  params = reward_model.init_params(setup, rm, setup.init_params)
  policy = dict(nnx.to_flat_state(setup.init_params))
  for key, var in nnx.to_flat_state(params):
    if key[0] == 'backbone':
      np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(policy[key[1:]][...]))
    else:
      assert not np.asarray(var[...]).any()  # head and bias: every output scores 0 until trained
  assert ('lm_head',) not in {k[1:2] for k, _ in nnx.to_flat_state(params)}
