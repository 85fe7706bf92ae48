"""The reward-model stage of iterative RL (DeepSeekMath Alg. 1): train the learned reward model on comparisons.

Before outer iteration 1 it is trained on comparisons of the SFT policy's samples (stage 'reward_model_0'); after
iteration k, on comparisons of the policy's new samples, with config.reward_model.replay_fraction of every batch
drawn from a replay buffer of the earlier iterations' comparisons (stage 'reward_model_<k>'). A comparison prefers,
within one question's group, an output the labeller scores higher: the task's verifier (a human rater's stand-in,
called only here, never by GRPO when rl.reward_source='reward_model') or a JSONL file of preference pairs. The
reward model never sees a gold answer: it scores (question, completion) tokens alone.

State: {'reward_model': TrainState, 'replay_buffer': the buffer before this stage's comparisons join it}.

With rl.supervision='process' and rl.step_reward='reward_model' the same model is a process reward model
(`make_process_stage`): read at each step's last token and trained on the step verifier's labels of the policy's
samples (binary cross-entropy; no replay buffer). State: {'reward_model': TrainState}.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.data import replay
from grpo_jax.data.batches import batch_indices
from grpo_jax.data.preferences import (
  comparisons_from_groups,
  concat_comparisons,
  encode_pairs,
  load_preference_jsonl,
  take_comparisons,
)
from grpo_jax.data.tokenizer import decode
from grpo_jax.models import hf
from grpo_jax.models.reward_model import (
  Comparisons,
  RewardModel,
  StepLabels,
  make_score_fn,
  make_step_score_fn,
  pairwise_loss,
  step_label_loss,
)
from grpo_jax.models.transformer import ModelConfig
from grpo_jax.parallel import distributed, sharding
from grpo_jax.pipeline import stages, workdir as workdir_lib
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.loop import Interrupt, Sinks, Stage, run_stage
from grpo_jax.pipeline.metrics import MetricWriter
from grpo_jax.pipeline.setup import Setup, build_setup
from grpo_jax.pipeline.train_state import TrainState, init_state, make_optimizer, make_train_step, state_shardings
from grpo_jax.rewards.registry import get_reward_fn, score
from grpo_jax.rewards.steps import get_step_verifier
from grpo_jax.rollout.rollout import step_rewards
from grpo_jax.rollout.steps import delimiter_token_ids

NAME = stages.REWARD_MODEL.name


def stage_name(k: int) -> str:
  """Checkpoint folder of the reward model trained before outer iteration k + 1."""
  return stages.REWARD_MODEL.folder(k)


class RewardModelSpec(NamedTuple):
  """The reward model's structure and layout; its params live in the stage state."""
  graphdef: nnx.GraphDef
  param_shardings: Any
  score: Callable  # jitted score(params, tokens [b, t], mask [b, t]) -> [b]
  step_scores: Callable  # jitted step_scores(params, tokens [b, t], mask [b, t], positions [b, s]) -> [b, s]


def spec(setup: Setup) -> RewardModelSpec:
  """The reward model's graph: the policy's architecture (so it reads the policy's tokens) with a scalar head."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: RewardModel(setup.model_cfg, nnx.Rngs(0))), nnx.Param)
  shardings = sharding.tree_shardings(params, setup.mesh, setup.rules)
  score_fn = make_score_fn(graphdef, param_shardings=shardings, mesh=setup.mesh, rules=setup.rules)
  score_fn = distributed.host_io(score_fn, setup.batch_sharding, batch_argnums=(1, 2))
  step_fn = make_step_score_fn(graphdef, param_shardings=shardings, mesh=setup.mesh, rules=setup.rules)
  step_fn = distributed.host_io(step_fn, setup.batch_sharding, batch_argnums=(1, 2, 3))
  return RewardModelSpec(graphdef, shardings, score_fn, step_fn)


def check_path(path: str, model_cfg: ModelConfig) -> None:
  """A reward-model initialization directory must hold the policy's architecture: the reward model reads the
  policy's token ids and starts from a backbone of that shape. Raises before anything is built."""
  other = hf.read_config(path)
  fields = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim')
  differ = {f: (getattr(other, f), getattr(model_cfg, f)) for f in fields if getattr(other, f) != getattr(model_cfg, f)}
  if differ:
    raise ValueError(f'config.reward_model.path={path!r} holds another architecture than the policy '
                     f'(reward model, policy): {differ}')


def init_params(setup: Setup, rm: RewardModelSpec, policy_params) -> nnx.State:
  """Reward-model params: the backbone from `policy_params` (the SFT policy: its LM head dropped) or from
  config.reward_model.path, a zero head and bias (every output scores 0 until trained)."""
  path = setup.cfg.reward_model.path
  if path:
    policy_params = hf.load_params(path, setup.model_cfg, dtype=jnp.dtype(setup.model_cfg.param_dtype),
                                   shardings=setup.param_shardings)
  backbone = dict(nnx.to_flat_state(policy_params))
  abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(setup.model_cfg, nnx.Rngs(0))), nnx.Param)[1]
  flat = []
  for key, var in nnx.to_flat_state(abstract):
    if key[0] == 'backbone':
      flat.append((key, var.replace(jnp.copy(backbone[key[1:]][...]))))  # a copy: the policy's buffers are donated
    else:
      flat.append((key, var.replace(jnp.zeros(var.shape, var.dtype))))
  return jax.device_put(nnx.from_flat_state(flat), rm.param_shardings)


def as_rows(prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> tuple[np.ndarray, np.ndarray]:
  """(question ++ completion tokens, mask), [N, p + c]: what the reward model scores."""
  return (np.concatenate([prompt_tokens, completion_tokens], 1).astype(np.int32),
          np.concatenate([prompt_mask, completion_mask], 1).astype(np.int32))


def _policy_samples(setup: Setup, params, k: int):
  """(prompts, completion tokens [P * G, c], mask): G = rl.group_size samples of the policy `params` for each of
  config.reward_model.num_prompts train prompts, the k-th (re)training's; deterministic in (seed, k)."""
  train = setup.splits['train']
  prompts = train.take(batch_indices(len(train), setup.cfg.reward_model.num_prompts, k, seed=setup.cfg.seed,
                                     stream=NAME))
  out = setup.policy().sampler(params, prompts.prompt_tokens, prompts.prompt_mask,
                               jax.random.fold_in(setup.rng, 2000 + k))
  return prompts, np.asarray(out.tokens), np.asarray(out.mask)


def sampled_comparisons(setup: Setup, params, k: int) -> tuple[Comparisons, Comparisons]:
  """(train, held-out) comparisons of the policy `params`' samples on config.reward_model.num_prompts train
  prompts (G = rl.group_size each), labelled by reward_model.labeller (default task.verifier); the first
  heldout_fraction of the prompts are held out. Deterministic in (seed, k)."""
  cfg, rmc = setup.cfg, setup.cfg.reward_model
  prompts, tokens, mask = _policy_samples(setup, params, k)
  answers = [a for a in prompts.answers for _ in range(cfg.rl.group_size)]
  labeller = get_reward_fn(rmc.labeller) if rmc.labeller else setup.verifier
  labels = score(labeller, decode(setup.tokenizer, tokens, mask), answers)[0]
  pairs, prompt_ids = comparisons_from_groups(prompts.prompt_tokens, prompts.prompt_mask, tokens, mask, labels,
                                              group_size=cfg.rl.group_size, max_pairs_per_prompt=rmc.pairs_per_prompt,
                                              rng=np.random.default_rng([cfg.seed, 2000 + k]))
  num_heldout = math.ceil(rmc.heldout_fraction * rmc.num_prompts)
  held = prompt_ids < num_heldout
  return take_comparisons(pairs, np.flatnonzero(~held)), take_comparisons(pairs, np.flatnonzero(held))


def file_comparisons(setup: Setup) -> tuple[Comparisons, Comparisons]:
  """(train, held-out) comparisons from config.reward_model.preference_file; the last heldout_fraction held out."""
  cfg = setup.cfg
  pairs = load_preference_jsonl(cfg.reward_model.preference_file)
  encoded = encode_pairs(setup.tokenizer, pairs, max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens,
                         template=cfg.task.prompt_template, chat=cfg.task.chat, skip_long=cfg.task.skip_long_prompts)
  n = encoded.chosen_tokens.shape[0]
  num_heldout = math.ceil(cfg.reward_model.heldout_fraction * n)
  return take_comparisons(encoded, np.arange(n - num_heldout)), take_comparisons(encoded, np.arange(n - num_heldout, n))


def new_comparisons(setup: Setup, policy_params, k: int) -> tuple[Comparisons, Comparisons]:
  """This (re)training's (train, held-out) comparisons: the policy's labelled samples (reward_model.label_samples)
  and, before iteration 1, the preference file's pairs."""
  rmc = setup.cfg.reward_model
  parts = []
  if k == 0 and rmc.preference_file:
    parts.append(file_comparisons(setup))
  if rmc.label_samples:
    parts.append(sampled_comparisons(setup, policy_params, k))
  train, heldout = concat_comparisons(*[p[0] for p in parts]), concat_comparisons(*[p[1] for p in parts])
  if not train.chosen_tokens.shape[0]:
    raise ValueError(f'{stage_name(k)}: no comparisons to train on: every group of the policy\'s samples scored '
                     'alike under the labeller (raise reward_model.num_prompts or rl.group_size, or give '
                     'reward_model.preference_file)')
  return train, heldout


def _wrapped_batches(n: int, batch_size: int):
  """(row indices, how many of them are real) of each batch over n rows; the last batch wraps around to the first
  rows, so every batch has one shape (one compile)."""
  for start in range(0, n, batch_size):
    yield np.arange(start, start + batch_size) % n, min(batch_size, n - start)


def pairwise_accuracy(rm: RewardModelSpec, params, pairs: Comparisons, batch_size: int) -> float:
  """Fraction of `pairs` the reward model ranks right (chosen above rejected, a tie counting half, so an untrained
  head's constant score is 0.5); nan without pairs."""
  n = pairs.chosen_tokens.shape[0]
  if n == 0:
    return float('nan')
  right = []
  for idx, real in _wrapped_batches(n, batch_size):
    chosen = np.asarray(rm.score(params, pairs.chosen_tokens[idx], pairs.chosen_mask[idx]))
    rejected = np.asarray(rm.score(params, pairs.rejected_tokens[idx], pairs.rejected_mask[idx]))
    right.append(((chosen > rejected) + 0.5 * (chosen == rejected))[:real])
  return float(np.concatenate(right).mean())


def _trainer(setup: Setup, rm: RewardModelSpec, start, loss_fn) -> tuple[TrainState, Callable]:
  """The reward model's TrainState (from params, k = 0, or the previous stage's TrainState, whose optimizer state
  and schedule carry on) and its jitted train step on `loss_fn`, with config.reward_model's optimizer."""
  cfg, rmc = setup.cfg, setup.cfg.reward_model
  tx = make_optimizer(rmc, rmc.num_steps * cfg.rl.num_iterations, param_dtype=setup.model_cfg.param_dtype)
  state = start if isinstance(start, TrainState) else init_state(start, tx, setup.mesh, setup.rules)
  train_step = make_train_step(rm.graphdef, tx, loss_fn, state_shardings(state, setup.mesh, setup.rules),
                               setup.batch_sharding, setup.mesh, setup.rules, grad_accum_steps=rmc.grad_accum_steps)
  return state, distributed.host_io(train_step, setup.batch_sharding, batch_argnums=(1,), gather=False)


def _meta(setup: Setup, k: int) -> dict[str, Any]:
  """A reward-model stage's checkpoint meta: the policy's model config (it reads the policy's tokens) and k."""
  return {'model': setup.checkpoint_meta(setup.policy())['model'], 'iteration': k}


def make_stage(setup: Setup, rm: RewardModelSpec, k: int, start: dict[str, Any], policy_params
               ) -> tuple[Stage, Comparisons]:
  """The reward model's (re)training before outer iteration k + 1, on comparisons of `policy_params`' samples.

  start: {'reward_model': params (k = 0) or the previous stage's TrainState, 'replay_buffer': buffer}.
  Returns the stage and its new train comparisons (the caller adds them to the buffer once the stage is done).
  """
  cfg, rmc = setup.cfg, setup.cfg.reward_model
  state, train_step = _trainer(setup, rm, start['reward_model'], pairwise_loss)
  train, heldout = new_comparisons(setup, policy_params, k)
  eval_batch = setup.cfg.eval.batch_size
  before = pairwise_accuracy(rm, state.params, heldout, eval_batch)  # the last model on the new distribution
  buffer = start['replay_buffer']
  # The buffer is constant through the stage (the new comparisons join it after): one host copy for every step's
  # replay draws. A restored checkpoint holds the same buffer, so the restored state's copy is not read.
  old = jax.device_get(buffer)

  def step(state, i):
    rng = np.random.default_rng([cfg.seed, 3000 + k, i])
    batch = replay.mix_batch(train, old, rmc.batch_size, rmc.replay_fraction, rng)
    rm_state, metrics = train_step(state['reward_model'], batch, {})
    return {**state, 'reward_model': rm_state}, metrics

  def finish(state):
    return {'heldout_accuracy': pairwise_accuracy(rm, state['reward_model'].params, heldout, eval_batch),
            'heldout_accuracy_before': before, 'train_pairs': int(train.chosen_tokens.shape[0]),
            'heldout_pairs': int(heldout.chosen_tokens.shape[0]), 'replay_size': replay.size(old)}

  return Stage(stage_name(k), rmc.num_steps, {'reward_model': state, 'replay_buffer': buffer}, step, finish,
               meta=_meta(setup, k)), train


def buffer_after(setup: Setup, buffer: dict, train: Comparisons, k: int) -> dict:
  """The replay buffer once stage k's train comparisons have joined it (deterministic in (seed, k))."""
  return replay.add(jax.device_get(buffer), train, np.random.default_rng([setup.cfg.seed, 4000 + k]))


def empty_buffer(setup: Setup) -> dict:
  cfg = setup.cfg
  return replay.empty_buffer(cfg.reward_model.replay_capacity, cfg.max_prompt_len + cfg.max_new_tokens)


def learned_reward(rm: RewardModelSpec, params) -> Callable:
  """scores(prompt_tokens [N, p], prompt_mask, completion_tokens [N, c], completion_mask) -> [N] numpy: the reward
  model's score of each (question, completion)."""
  def scores(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    return np.asarray(rm.score(params, *as_rows(prompt_tokens, prompt_mask, completion_tokens, completion_mask)),
                      np.float32)
  return scores


def train_alone(cfg, workdir: str) -> dict:
  """`python -m grpo_jax.reward_model`: train the reward model of `cfg` on cfg.reward_model.preference_file alone
  (no policy, no GRPO) in `workdir`, resumable; returns the stage summary (held-out accuracy before and after)."""
  distributed.use_cpu_devices(cfg.cpu_devices)
  check_config(cfg, jax.device_count())  # the preference file is read here: a bad line fails in a second
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir):
    setup = build_setup(cfg, data=False, before_params=lambda tokenizer, model_cfg: (
        check_path(cfg.reward_model.path, model_cfg) if cfg.reward_model.path else None))
    rm = spec(setup)
    buffer = empty_buffer(setup)
    stage, _ = make_stage(setup, rm, 0, {
        'reward_model': init_params(setup, rm, setup.init_params), 'replay_buffer': buffer}, None)
    sinks = Sinks(workdir, MetricWriter(workdir, active=distributed.is_main_process()), Interrupt(),
                  log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, checkpoint_keep=cfg.checkpoint_keep,
                  compute_dtype=cfg.model.dtype, max_nonfinite_steps=cfg.max_nonfinite_steps)
    _, summary = run_stage(stage, sinks)
    sinks.writer.close()
    result = {'preference_file': cfg.reward_model.preference_file, **summary}
    if distributed.is_main_process():
      workdir_lib.write_json(os.path.join(workdir, 'reward_model.json'), result, indent=2)
  return result


def _step_rows(setup: Setup, prompts, tokens, mask, rewards, ends, step_mask) -> StepLabels:
  """StepLabels rows (question ++ completion) with S padded to max_new_tokens: one shape, one compile."""
  g, s = setup.cfg.rl.group_size, setup.cfg.max_new_tokens
  rows, row_mask = as_rows(np.repeat(prompts.prompt_tokens, g, 0), np.repeat(prompts.prompt_mask, g, 0), tokens, mask)
  pad = ((0, 0), (0, s - ends.shape[1]))
  return StepLabels(rows, row_mask, np.pad(ends + prompts.prompt_tokens.shape[1], pad).astype(np.int32),
                    np.pad(step_mask, pad).astype(np.int32), np.pad(rewards, pad).astype(np.float32))


def sampled_step_labels(setup: Setup, params, k: int) -> tuple[StepLabels, StepLabels]:
  """(train, held-out) step-labelled outputs of the policy `params` on config.reward_model.num_prompts train prompts
  (G = rl.group_size each), labelled by rl.step_verifier; the first heldout_fraction of the prompts held out."""
  cfg, rmc = setup.cfg, setup.cfg.reward_model
  prompts, tokens, mask = _policy_samples(setup, params, k)
  rewards, ends, step_mask = step_rewards(tokens, mask, prompts, setup.tokenizer, group_size=cfg.rl.group_size,
                                          step_verifier=get_step_verifier(cfg.rl.step_verifier),
                                          delimiter_ids=delimiter_token_ids(setup.tokenizer, cfg.rl.step_delimiter))
  rows = _step_rows(setup, prompts, tokens, mask, rewards, ends, step_mask)
  held = np.arange(tokens.shape[0]) // cfg.rl.group_size < math.ceil(rmc.heldout_fraction * rmc.num_prompts)
  return (StepLabels(*(x[~held] for x in rows)), StepLabels(*(x[held] for x in rows)))


def step_accuracy(rm: RewardModelSpec, params, rows: StepLabels, batch_size: int) -> float:
  """Fraction of real steps whose (score > 0) matches (label > 0.5); nan without steps."""
  right, real = 0.0, 0.0
  for idx, count in _wrapped_batches(rows.tokens.shape[0], batch_size):
    scores = np.asarray(rm.step_scores(params, rows.tokens[idx], rows.mask[idx], rows.step_positions[idx]))
    steps = rows.step_mask[idx].astype(bool) & (np.arange(len(idx)) < count)[:, None]
    right += float(((scores > 0) == (rows.labels[idx] > 0.5))[steps].sum())
    real += float(steps.sum())
  return right / real if real else float('nan')


def make_process_stage(setup: Setup, rm: RewardModelSpec, k: int, start, policy_params) -> Stage:
  """The process reward model's (re)training before outer iteration k + 1 on step labels of `policy_params`'
  samples; start: params (k = 0) or the previous stage's TrainState."""
  cfg, rmc = setup.cfg, setup.cfg.reward_model
  state, train_step = _trainer(setup, rm, start, step_label_loss)
  train, heldout = sampled_step_labels(setup, policy_params, k)
  eval_batch = cfg.eval.batch_size
  before = step_accuracy(rm, state.params, heldout, eval_batch)

  def step(state, i):
    idx = np.random.default_rng([cfg.seed, 3000 + k, i]).integers(0, train.tokens.shape[0], rmc.batch_size)
    rm_state, metrics = train_step(state['reward_model'], StepLabels(*(x[idx] for x in train)), {})
    return {'reward_model': rm_state}, metrics

  def finish(state):
    return {'heldout_accuracy': step_accuracy(rm, state['reward_model'].params, heldout, eval_batch),
            'heldout_accuracy_before': before, 'train_outputs': int(train.tokens.shape[0]),
            'heldout_outputs': int(heldout.tokens.shape[0])}

  return Stage(stage_name(k), rmc.num_steps, {'reward_model': state}, step, finish, meta=_meta(setup, k))


def learned_step_scores(rm: RewardModelSpec, params) -> Callable:
  """step_scores(prompt_tokens [N, p], prompt_mask, completion_tokens [N, c], completion_mask, step_ends [N, S])
  -> [N, S] numpy: the process reward model's sigmoid(score) at each step's last token."""
  def scores(prompt_tokens, prompt_mask, completion_tokens, completion_mask, step_ends):
    rows, mask = as_rows(prompt_tokens, prompt_mask, completion_tokens, completion_mask)
    # S (the most steps of any output) differs from batch to batch: padded to the completion length, one shape.
    num_steps = step_ends.shape[1]
    positions = np.pad(step_ends, ((0, 0), (0, completion_tokens.shape[1] - num_steps))) + prompt_tokens.shape[1]
    out = np.asarray(rm.step_scores(params, rows, mask, positions.astype(np.int32)), np.float32)[:, :num_steps]
    return (1.0 / (1.0 + np.exp(-out))).astype(np.float32)
  return scores
