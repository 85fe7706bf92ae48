"""The GRPO stage: each step samples G outputs per prompt from pi_old, scores them, turns rewards into group
advantages, then runs mu epochs x minibatches of clipped updates with pi_old fixed (DeepSeekMath Alg. 1, inner
loop). One stage is one outer iteration; run.py chains them. The math is in core/ (advantages, losses, kl,
logprobs); experience collection in rollout/.

`grpo_step` is one step, read top to bottom: collect (sample, reward, group advantages, reference logprobs) ->
credit (process or prefix supervision) -> off-policy correction (exact KL, the trainer's pi_old against the
sampler's) -> update (epochs x minibatches) -> metrics. Each phase is a function of this module; what they share and
what never changes between steps (the config, the jitted functions) is one `StepContext`, built by `make_stage`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from grpo_jax.core import packing
from grpo_jax.core.advantages import PREFIX_SCALE_OF, get_advantage_fn
from grpo_jax.core.kl import adaptive_kl_beta
from grpo_jax.core.losses import LossConfig, grpo_micro_weight, grpo_objective, mean_abs_diff, tis_weights
from grpo_jax.data.batches import batch_indices
from grpo_jax.models import flops, lora
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import stages
from grpo_jax.pipeline.loop import Stage
from grpo_jax.pipeline.setup import Policy, Setup, pack_row_buckets, shared_prompt_group
from grpo_jax.pipeline.train_state import (
  TrainState,
  combine_metrics,
  init_state,
  learning_rate,
  make_optimizer,
  make_train_step,
  state_shardings,
)
from grpo_jax.rewards.steps import get_step_verifier
from grpo_jax.rollout.prefix_credit import prefix_credit
from grpo_jax.rollout.reference import make_exact_kl_fn, make_trainer_logprobs_fn, sampling_filter
from grpo_jax.rollout.rollout import Rollout, collect_rollout, dynamic_sampling, process_supervision
from grpo_jax.rollout.steps import delimiter_token_ids
from grpo_jax.rollout.trim import bucket_width, completion_buckets, per_packed_rows, trim_columns

NAME = stages.GRPO.name


def stage_name(iteration: int, num_iterations: int) -> str:
  """Checkpoint folder of outer iteration `iteration` (1-based): 'grpo' for a single iteration, else 'grpo_<k>'."""
  return stages.GRPO.folder(None if num_iterations == 1 else iteration)


# LossConfig's fields as the run config spells them: LossConfig's errors name its fields, the user sets config keys.
CONFIG_KEYS = {**{name: f'rl.{name}' for name in ('policy_loss', 'clip_eps', 'clip_eps_high', 'dual_clip',
                                                   'kl_estimator', 'kl_in_reward', 'loss_aggregation',
                                                   'importance_ratio', 'entropy_coef')},
               'kl_penalty': 'rl.beta > 0', 'logits_filter': 'rl.trainer_sampling_filters'}
_FIELD = re.compile(r'\b(' + '|'.join(sorted(CONFIG_KEYS, key=len, reverse=True)) + r')\b')


def loss_config(cfg, *, reference_model: Callable | None = None) -> LossConfig:
  """The GRPO loss's static choices, from config.rl (and the forward's memory knobs from config.model): the one place
  the config's loss switches are read. LossConfig checks them (config_checks runs this before anything is built); its
  error is raised again naming the config keys. reference_model: ref params -> the reference model, for
  rl.kl_estimator 'exact'."""
  rl = cfg.rl
  try:
    return LossConfig(policy_loss=rl.policy_loss, clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high,
                      dual_clip=rl.dual_clip, kl_estimator=rl.kl_estimator, kl_penalty=rl.beta > 0,
                      kl_in_reward=rl.kl_in_reward, loss_aggregation=rl.loss_aggregation,
                      importance_ratio=rl.importance_ratio, entropy_coef=rl.entropy_coef,
                      logprob_chunk=cfg.model.logprob_chunk, remat=cfg.model.remat, max_len=cfg.max_new_tokens,
                      shared_prompt_group=shared_prompt_group(cfg), logits_filter=trainer_filter(cfg),
                      reference_model=reference_model)
  except ValueError as e:
    message = _FIELD.sub(lambda m: CONFIG_KEYS[m[1]], str(e))
    raise ValueError(f'config.{message}' if message.startswith('rl.') else message) from None


def trainer_filter(cfg):
  """The sampler's temperature / top-k / top-p as a logits filter for the trainer's logprobs, with
  rl.trainer_sampling_filters; else None (the model's own distribution, as the sampler's reported logprobs)."""
  rl = cfg.rl
  if not rl.trainer_sampling_filters:
    return None
  return sampling_filter(temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p)


def length_buckets(cfg) -> tuple[int, ...]:
  """The completion widths a step's batch is cut to (rollout/trim.py): rl.length_buckets of max_new_tokens, in
  multiples of the logprob chunk (at least 8)."""
  return completion_buckets(cfg.max_new_tokens, cfg.rl.length_buckets, multiple=max(8, cfg.model.logprob_chunk))


def loss_hparams(cfg) -> dict[str, jax.Array]:
  """The step's values that may change between steps, at their start values, as arrays (a new value is not a
  new compile): beta and a scale on the learning rate, which the KL controller moves (rl.kl_adapt)."""
  return {'beta': jnp.asarray(cfg.rl.beta, jnp.float32), 'lr_scale': jnp.asarray(1.0, jnp.float32)}


def make_grpo_train_step(setup: Setup, policy: Policy, state: TrainState, tx, *, pack_rows: int = 0):
  """The jitted, donated GRPO update on one minibatch: train_step(state, Rollout, hparams) -> (state, metrics).
  pack_rows = R > 0: each group's outputs run packed into R rows (LossConfig.pack_rows)."""
  cfg = setup.cfg
  config = dataclasses.replace(loss_config(cfg, reference_model=functools.partial(nnx.merge, setup.graphdef)),
                               pack_rows=pack_rows)
  return make_train_step(policy.graphdef, tx, functools.partial(grpo_objective, config=config),
                         state_shardings(state, setup.mesh, setup.rules), setup.batch_sharding, setup.mesh,
                         setup.rules, grad_accum_steps=cfg.rl.grad_accum_steps, micro_weight=grpo_micro_weight(config),
                         trainable=None if policy.lora is None else lora.TRAINABLE,
                         group_size=config.shared_prompt_group)


def make_packed_train_step(setup: Setup, policy: Policy, state: TrainState, tx) -> Callable:
  """The stage's train_step(state, Rollout, hparams): make_grpo_train_step behind host_io, one for each packed row
  count its batches need (rl.pack_buckets; rollout/trim.per_packed_rows), built on first use."""
  return per_packed_rows(
      lambda rows: distributed.host_io(make_grpo_train_step(setup, policy, state, tx, pack_rows=rows),
                                       setup.batch_sharding, batch_argnums=(1,), gather=False),
      lambda state, batch, hparams: batch.completion_mask, group_size=shared_prompt_group(setup.cfg),
      row_buckets=pack_row_buckets(setup.cfg))


def shuffled_rows(key: jax.Array, num_rows: int, group_size: int = 1) -> np.ndarray:
  """A random order of num_rows rows [num_rows] that moves whole groups of group_size contiguous rows, each group's
  rows staying contiguous and in order (group_size 1: a permutation of the rows)."""
  order = np.asarray(jax.random.permutation(key, num_rows // group_size))
  return (order[:, None] * group_size + np.arange(group_size)).reshape(-1)


def update(train_step: Callable, state: TrainState, rollout: Rollout, rng: jax.Array, hparams: dict, *,
           num_epochs: int, num_minibatches: int, group_size: int = 1, length_buckets: Sequence[int] = ()
           ) -> tuple[TrainState, dict]:
  """mu epochs over the rollout, each a fresh shuffle split into minibatches; pi_old stays fixed.

  group_size = G > 1 shuffles whole groups (G contiguous rows: one prompt's outputs, which the shared-prompt step
  reads as such; rl.shared_prompt), each group's rows staying contiguous and in order; 1 shuffles rows.
  length_buckets: each minibatch is cut to its own longest completion's bucket (rollout/trim.py), which may be
  narrower than the rollout's."""
  all_metrics = []
  for epoch in range(num_epochs):
    order = shuffled_rows(jax.random.fold_in(rng, epoch), rollout.advantages.shape[0], group_size)
    for idx in np.split(order, num_minibatches):
      minibatch = Rollout(*(np.asarray(x)[idx] for x in rollout))
      width = bucket_width(minibatch.completion_mask, length_buckets)
      state, metrics = train_step(state, Rollout(*minibatch[:2], *trim_columns(minibatch[2:], width)), hparams)
      all_metrics.append(metrics)
  return state, combine_metrics(all_metrics)  # means, but ratio_min / ratio_max a min / max


def sampler_vs_trainer(trainer_old: Callable, params, rollout: Rollout, *, rows: int | None, tis_cap: float
                       ) -> tuple[Rollout, dict[str, float]]:
  """The trainer's forward of pi_old = `params` against the sampler's logprobs of the same tokens.

  trainer_old(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> (raw, filtered) [N, c]
  (reference.make_trainer_logprobs_fn). rows: an int: only that many evenly spaced rows are run and the rollout is
  returned unchanged (the logged gap alone); None: every row, and the loss's old_logprobs become the trainer's
  (filtered) ones, with tis_cap > 0 each token's advantage weighted by tis_weights (truncated importance sampling:
  only the policy-gradient term, not the KL or entropy ones, as in Yao et al. 2025).
  Stats: logprob_diff_sampler_trainer, the mean |log pi_sampler - log pi_trainer| over completion tokens; with
  TIS tis_weight (its token mean) and tis_capped_frac (tokens whose ratio exceeded the cap).
  """
  n = rollout.completion_tokens.shape[0]
  idx = np.arange(n) if rows is None else np.linspace(0, n - 1, rows).astype(int)
  arrays = [np.asarray(x)[idx] for x in rollout[:4]]
  raw, filtered = (np.asarray(x) for x in trainer_old(params, *arrays))
  sampler, mask = np.asarray(rollout.old_logprobs)[idx], arrays[3]
  stats = {'logprob_diff_sampler_trainer': float(mean_abs_diff(raw, sampler, mask))}
  if rows is not None:
    return rollout, stats
  advantages = np.asarray(rollout.advantages)
  if tis_cap:
    weights = np.asarray(tis_weights(raw, sampler, mask, cap=tis_cap))
    advantages = (advantages[:, None] if advantages.ndim == 1 else advantages) * weights  # [N, c]
    real = mask > 0
    stats['tis_weight'] = float(weights[real].mean()) if real.any() else 1.0
    stats['tis_capped_frac'] = float((raw - sampler > np.log(tis_cap))[real].mean()) if real.any() else 0.0
  return rollout._replace(old_logprobs=filtered, advantages=advantages), stats


def control_kl(controller: dict[str, jax.Array], kl: jax.Array, rl) -> dict[str, jax.Array]:
  """The paper's 'measure the KL, then adjust': with rl.kl_target > 0 the step's measured KL to the reference
  moves beta (up while the KL is above target) or the learning-rate scale (down while above), by Ziegler et al.'s
  proportional rule; otherwise nothing changes."""
  if not rl.kl_target > 0:
    return controller
  kw = dict(target=rl.kl_target, horizon=rl.kl_horizon, batch_size=rl.num_prompts * rl.group_size)
  if rl.kl_adapt == 'beta':
    return {**controller, 'beta': adaptive_kl_beta(controller['beta'], kl, **kw)}
  return {**controller, 'lr_scale': controller['lr_scale'] / adaptive_kl_beta(1.0, kl, **kw)}


def weak_signal_warning(stage: str, frac_groups_no_signal: float | None, pass_at_g: float | None) -> str | None:
  """One line when most of a GRPO stage's groups carried no signal (all G rewards equal: zero advantage), saying
  which way: none of the G outputs solved the prompt, or all did. None when most groups had signal."""
  if frac_groups_no_signal is None or frac_groups_no_signal <= 0.5:
    return None
  if pass_at_g is None:  # a run logged before pass_at_g existed
    why = 'whether none or all of the G outputs solved them was not logged'
  elif pass_at_g < 0.5:
    why = 'most prompts were solved by none of the G outputs: more exploration (rl.temperature, rl.group_size) or ' \
          'a stronger SFT start'
  else:
    why = 'most prompts were solved by all G outputs: too easy for this policy'
  return (f'{stage}: {frac_groups_no_signal:.0%} of groups had no reward variance (no advantage, no gradient); '
          f'{why}. See frac_groups_no_signal, pass_at_g and entropy in metrics.jsonl')


def extra_sampling_flops(model_cfg, rollout: Rollout, stats: dict[str, Any], *, group_size: int,
                         continuations: int) -> float:
  """Model FLOPs a step spent sampling beyond its training batch (models/flops.py's convention): dynamic sampling's
  extra draws (each a batch of the training batch's shape: prefill, decode to the batch's longest output, reference
  forward) and prefix resampling's continuations (prefill of each prompt ++ prefix, then K continuations each)."""
  total = 0.0
  rows, prompt_len = rollout.prompt_mask.shape
  width = rollout.completion_mask.shape[1]
  if stats.get('dynamic_draws'):
    draw = flops.grpo_step_flops(model_cfg, num_prompts=rows // group_size, group_size=group_size,
                                 prompt_len=prompt_len, completion_len=width,
                                 decode_len=int(np.asarray(rollout.completion_mask).sum(-1).max()), reference=True,
                                 num_epochs=0)
    total += stats['dynamic_draws'] * draw['total']
  if 'prefix_prompts' in stats:
    cont = flops.grpo_step_flops(model_cfg, num_prompts=stats['prefix_prompts'], group_size=continuations,
                                 prompt_len=stats['prefix_prompt_len'], completion_len=width,
                                 decode_len=stats['prefix_decode_len'], reference=False, num_epochs=0)
    total += cont['total']
  return total


@dataclasses.dataclass
class StepContext:
  """What every GRPO step of a stage uses and no step changes, built once by make_stage: the run's setup and the
  trained policy, the jitted train step and forwards, and the phases' switches."""
  setup: Setup
  policy: Policy
  name: str  # the stage's checkpoint folder, for messages
  iteration: int  # the outer iteration, 1-based
  offset: int  # steps of the earlier iterations: the data order and the RNG run on across iterations
  rng: jax.Array  # the stage's key; step i's is fold_in(rng, offset + i)
  train_step: Callable  # make_packed_train_step's (state, Rollout, hparams) -> (state, metrics)
  advantage_fn: Callable  # rl.advantage (core/advantages.ADVANTAGES)
  reference_forward: Callable  # (ref params, prompt, prompt mask, completion, completion mask) -> logprobs [N, c]
  lr_at: Callable  # optimizer step -> the schedule's learning rate
  length_buckets: tuple[int, ...]  # the widths a batch is cut to (rollout/trim.py)
  group: int  # G when the update runs each prompt once for its G outputs (rl.shared_prompt), else 1
  row_buckets: tuple[int, ...]  # packed rows per group (rl.pack_buckets; core/packing.py)
  overlong: dict[str, Any]  # collect_rollout's overlong switches (DAPO), {} when off
  process: dict[str, Any] | None  # rl.supervision 'process': the step verifier and delimiter ids
  exact_kl: Callable | None  # the full-vocabulary KL of pi_old to the reference, on exact_kl_rows rows; None = off
  exact_kl_rows: int
  trainer_old: Callable | None  # the trainer's forward of pi_old (reference.make_trainer_logprobs_fn); None = off
  mismatch_rows: int | None  # rows it runs on for the logged gap alone; None = every row, read by the loss
  learned_reward: Callable | None = None  # the reward model's scores, for rl.reward_source 'reward_model' / 'mix'
  step_scores: Callable | None = None  # a process reward model's, for rl.step_reward 'reward_model'
  warned_no_delimiter: bool = False  # process supervision: warn once when no output has a step delimiter


def collect(ctx: StepContext, params, reference, key: jax.Array, step: int) -> tuple[Any, Rollout, dict[str, Any]]:
  """Phase 1, collect: the step's prompts, G outputs each sampled from pi_old = `params`, their rewards and group
  advantages, and the reference's logprobs (rollout.collect_rollout). With rl.dynamic_sampling, groups without reward
  variance are replaced by those of further prompt batches (DAPO); the first draw's stats (reward, accuracy, signal)
  stay those of a fresh batch. Returns (the first draw's prompts, the Rollout [P*G rows], stats)."""
  cfg, rl, train = ctx.setup.cfg, ctx.setup.cfg.rl, ctx.setup.splits['train']

  def draw(d):  # d = 0: the step's own prompts; d > 0: dynamic sampling's refills, each from its own stream
    stream, draw_key = 'grpo', key
    if d:  # keyed by (step, d) alone, so a resumed run draws what an uninterrupted one does
      stream, draw_key = f'grpo_dynamic_{d}', jax.random.fold_in(key, 10_000 + d)
    batch = train.take(batch_indices(len(train), rl.num_prompts, step, seed=cfg.seed, stream=stream))
    return batch, collect_rollout(
        ctx.policy.sampler, ctx.reference_forward, params, reference, batch, draw_key,
        group_size=rl.group_size, tokenizer=ctx.setup.tokenizer, reward_fn=ctx.setup.reward_fn,
        advantage_fn=ctx.advantage_fn, verifier=ctx.setup.verifier, learned_reward=ctx.learned_reward,
        reward_source=rl.reward_source, reward_mix=rl.reward_mix, length_buckets=ctx.length_buckets, **ctx.overlong,
        **({'return_rewards': True} if rl.dynamic_sampling else {}))

  prompts, collected = draw(0)
  if not rl.dynamic_sampling:
    return prompts, *collected
  rollout, dynamic = dynamic_sampling(lambda d: collected if d == 0 else draw(d)[1], num_groups=rl.num_prompts,
                                      group_size=rl.group_size, max_draws=rl.dynamic_sampling_max_draws,
                                      advantage_fn=ctx.advantage_fn)
  stats = {**collected[1], **dynamic,
           'sampled_tokens_per_s': dynamic['sampled_tokens'] / max(dynamic['sample_time'], 1e-9)}
  return prompts, rollout, stats


def assign_credit(ctx: StepContext, rollout: Rollout, prompts, params, key: jax.Array, step: int
                  ) -> tuple[Rollout, dict[str, Any]]:
  """Phase 2, credit: with rl.supervision 'process', per-step rewards as per-token advantages (DeepSeekMath 4.1.3);
  with 'prefix_resample', per-segment credit from K continuations of each output's prefixes sampled from pi_old =
  `params` (key: the step's sampling key); with 'outcome' the collected advantages stand. Returns (rollout, stats)."""
  cfg, rl = ctx.setup.cfg, ctx.setup.cfg.rl
  if ctx.process is not None:
    rollout, stats = process_supervision(rollout, prompts, ctx.setup.tokenizer, group_size=rl.group_size,
                                         step_verifier=ctx.process['step_verifier'],
                                         delimiter_ids=ctx.process['delimiter_ids'], step_scores=ctx.step_scores)
    if not stats['delimiters'] and not ctx.warned_no_delimiter:
      ctx.warned_no_delimiter = True
      msg = (f'{ctx.name}: step {step}: no output of the batch contains rl.step_delimiter={rl.step_delimiter!r}: '
             'every output is one step (process supervision reduces to outcome supervision); warned once')
      logging.warning(msg)
      distributed.print0(f'WARNING: {msg}')
    return rollout, stats
  if rl.supervision == 'prefix_resample':
    return prefix_credit(rollout, prompts, ctx.policy.continuation_sampler, params, jax.random.fold_in(key, 1),
                         group_size=rl.group_size, continuations=rl.prefix_continuations,
                         cut_fractions=tuple(rl.prefix_cuts), tokenizer=ctx.setup.tokenizer,
                         reward_fn=ctx.setup.reward_fn, scale=PREFIX_SCALE_OF[rl.advantage],
                         max_len=cfg.max_new_tokens)
  return rollout, {}


def correct_off_policy(ctx: StepContext, params, reference, rollout: Rollout) -> tuple[Rollout, dict[str, Any]]:
  """Phase 3, reference and off-policy correction: pi_old = `params` against the reference over the whole vocabulary
  on a few rows (kl_exact), and the trainer's forward of pi_old against the sampler's logprobs (sampler_vs_trainer:
  the logged gap; with rl.tis_cap / rl.trainer_sampling_filters the loss's old logprobs and TIS weights). Returns
  (rollout, stats)."""
  stats = {}
  if ctx.exact_kl is None and ctx.trainer_old is None:
    return rollout, stats
  # pi_old as plain params, merged once for both
  merged = params if ctx.policy.lora is None else lora.merge_params(params, ctx.policy.lora.scale)
  if ctx.exact_kl is not None:
    rows = np.linspace(0, rollout.advantages.shape[0] - 1, ctx.exact_kl_rows).astype(int)
    stats['kl_exact'] = ctx.exact_kl(merged, reference, *(np.asarray(x)[rows] for x in rollout[:4]))
  if ctx.trainer_old is not None:
    rollout, mismatch = sampler_vs_trainer(ctx.trainer_old, merged, rollout, rows=ctx.mismatch_rows,
                                           tis_cap=ctx.setup.cfg.rl.tis_cap)
    stats.update(mismatch)
  return rollout, stats


def step_work(ctx: StepContext, rollout: Rollout, stats: dict[str, Any]) -> dict[str, float]:
  """Part of phase 5, metrics: the step's model FLOPs (models/flops.py: sampling, the reference forward, which runs
  also at beta 0, and the update, plus dynamic sampling's and prefix resampling's extra draws) and tokens."""
  rl = ctx.setup.cfg.rl
  work = flops.grpo_step_work(ctx.setup.model_cfg, rollout.prompt_mask, rollout.completion_mask,
                              group_size=rl.group_size, reference=True, num_epochs=rl.num_epochs,
                              shared_prompt=ctx.group > 1,
                              packed_rows=packing.packed_rows(rollout.completion_mask, ctx.group, ctx.row_buckets))
  work['model_flops'] += extra_sampling_flops(ctx.setup.model_cfg, rollout, stats, group_size=rl.group_size,
                                              continuations=rl.prefix_continuations)
  return work


def grpo_step(ctx: StepContext, state: dict[str, Any], i: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """Step i (0-based, of this stage) of GRPO: the stage loop's step(state, i) -> (state, metrics), state as in
  make_stage. The body of DeepSeekMath Alg. 1's inner loop, phase by phase."""
  rl, i = ctx.setup.cfg.rl, ctx.offset + i
  policy_state, controller = state['policy'], state['kl_controller']
  reference = state['reference'] if ctx.policy.lora is None else lora.base_params(policy_state.params)
  sample_rng, shuffle_rng = jax.random.split(jax.random.fold_in(ctx.rng, i))

  # 1. Collect: G outputs per prompt from pi_old, rewarded, with group advantages and the reference's logprobs.
  prompts, rollout, stats = collect(ctx, policy_state.params, reference, sample_rng, i)
  # 2. Credit: per-step or per-segment advantages in place of the outcome's (rl.supervision).
  rollout, credit_stats = assign_credit(ctx, rollout, prompts, policy_state.params, sample_rng, i)
  # 3. Reference and off-policy correction: the exact KL on a few rows; the trainer's pi_old against the sampler's.
  rollout, correction_stats = correct_off_policy(ctx, policy_state.params, reference, rollout)
  stats = {**stats, **credit_stats, **correction_stats}
  # 4. Update: mu epochs x minibatches of the loss, pi_old fixed.
  hparams = controller if rl.kl_estimator != 'exact' else {**controller, 'ref_params': reference}
  policy_state, losses = update(ctx.train_step, policy_state, rollout, shuffle_rng, hparams,
                                num_epochs=rl.num_epochs, num_minibatches=rl.num_minibatches, group_size=ctx.group,
                                length_buckets=ctx.length_buckets)
  # 5. Metrics; the KL controller moves beta (or the learning rate) for the next step.
  logged = {'beta': controller['beta'], 'lr': ctx.lr_at(policy_state.step) * controller['lr_scale'],
            'iteration': ctx.iteration}
  metrics = {**stats, **losses, **step_work(ctx, rollout, stats), **logged}
  return {**state, 'policy': policy_state, 'kl_controller': control_kl(controller, losses['kl'], rl)}, metrics


def initial_state(setup: Setup, policy: Policy, tx, params, *, start: dict[str, Any] | None = None,
                  reference=None) -> dict[str, Any]:
  """The stage's state by role: {'policy': TrainState, 'kl_controller': {'beta', 'lr_scale'}, 'reference': params}
  ('reference' not with LoRA: the reference is the frozen base inside the policy's params). From `params`, or from
  `start` (the previous iteration's final state: optimizer state, lr schedule and controller carry on)."""
  if start is None:
    # Saved with the checkpoints (a resumed run continues its beta), committed replicated on the mesh as the step's
    # metrics are: a restored controller is committed, and mixing it with arrays on other devices is an error.
    controller = jax.device_put(loss_hparams(setup.cfg),
                                jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec()))
    reference = params if reference is None else reference
    if policy.lora is not None:  # the reference is the frozen base inside the policy's params: no copy
      params = setup.with_adapters(NAME, params, policy, jax.random.fold_in(setup.rng, 1001))
    trainable = None if policy.lora is None else lora.TRAINABLE
    state = {'policy': init_state(params, tx, setup.mesh, setup.rules, trainable=trainable),
             'kl_controller': controller}
  else:
    state = {'policy': start['policy'], 'kl_controller': start['kl_controller']}
    reference = state['policy'].params if reference is None else reference
  if policy.lora is None:
    state['reference'] = jax.tree.map(jnp.copy, reference)  # frozen: the policy's params are donated each step
  return state


def _whole_rows(setup: Setup, rows: int) -> int:
  """`rows` rounded up to whole rows per data-parallel device, as every batch the mesh shards, at most a rollout's."""
  data_parallel = math.prod(setup.mesh.shape[a] for a in setup.rules.mesh_axes('batch'))
  return min(-(-rows // data_parallel) * data_parallel, setup.cfg.rl.num_prompts * setup.cfg.rl.group_size)


def correction_fns(setup: Setup) -> dict[str, Any]:
  """StepContext's reference and off-policy fields: exact_kl (rl.exact_kl_rows), trainer_old and mismatch_rows, and
  the reference forward the collect phase runs."""
  cfg, rl = setup.cfg, setup.cfg.rl
  exact_kl = None
  if rl.exact_kl_rows:
    exact_kl = make_exact_kl_fn(setup.graphdef, mesh=setup.mesh, rules=setup.rules,
                                param_shardings=setup.param_shardings, chunk_size=cfg.model.logprob_chunk)
    exact_kl = distributed.host_io(exact_kl, setup.batch_sharding, batch_argnums=(2, 3, 4, 5))
  # The trainer's own forward of pi_old: on every row when the loss reads it (rl.tis_cap, rl.trainer_sampling_filters),
  # else on rl.mismatch_rows rows for the logged sampler-vs-trainer gap alone.
  replace_old = rl.tis_cap > 0 or rl.trainer_sampling_filters
  trainer_old = None
  if replace_old or rl.mismatch_rows:
    trainer_old = make_trainer_logprobs_fn(setup.graphdef, logits_filter=trainer_filter(cfg), mesh=setup.mesh,
                                           rules=setup.rules, param_shardings=setup.param_shardings,
                                           chunk_size=cfg.model.logprob_chunk)
    trainer_old = distributed.host_io(trainer_old, setup.batch_sharding, batch_argnums=(1, 2, 3, 4))
  reference_forward = setup.reference_forward
  if trainer_filter(cfg) is not None:  # the KL term then compares the filtered policy with the filtered reference
    reference_forward = lambda params, *arrays: trainer_old(params, *arrays)[1]  # noqa: E731
  return dict(exact_kl=exact_kl, exact_kl_rows=_whole_rows(setup, rl.exact_kl_rows), trainer_old=trainer_old,
              mismatch_rows=None if replace_old else _whole_rows(setup, rl.mismatch_rows),
              reference_forward=reference_forward)


def credit_switches(setup: Setup) -> dict[str, Any]:
  """StepContext's collect and credit switches: overlong (DAPO's overlong penalty and truncation mask) and process
  (rl.supervision 'process': the step verifier and the delimiter's token ids)."""
  rl = setup.cfg.rl
  overlong = {}
  if rl.overlong_penalty_len or rl.mask_truncated:
    overlong = dict(eos_ids=setup.eos_ids, overlong_penalty_len=rl.overlong_penalty_len,
                    mask_truncated=rl.mask_truncated)
  process = None
  if rl.supervision == 'process':
    process = dict(step_verifier=get_step_verifier(rl.step_verifier),
                   delimiter_ids=delimiter_token_ids(setup.tokenizer, rl.step_delimiter))
  return dict(overlong=overlong, process=process)


def make_stage(setup: Setup, params, *, iteration: int = 1, start: dict[str, Any] | None = None,
               reference=None, learned_reward: Callable | None = None, step_scores: Callable | None = None) -> Stage:
  """Outer iteration `iteration` of GRPO: rl.num_steps / rl.num_iterations steps of grpo_step from `params`
  (iteration 1) or from `start` (the previous iteration's final {'policy': TrainState, 'kl_controller': ...}:
  optimizer state, lr schedule and controller carry on). `reference`: the frozen reference's params (default
  `params`); with LoRA the reference is the policy's frozen base. `learned_reward`: the reward model's
  scores(prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [N], for rl.reward_source 'reward_model' /
  'mix'. `step_scores`: a process reward model's (rollout.process_supervision), for rl.step_reward 'reward_model'.

  State: {'policy': TrainState, 'reference': params (not with LoRA), 'kl_controller': {'beta', 'lr_scale'}}.
  """
  cfg, rl = setup.cfg, setup.cfg.rl
  steps_per_iteration = rl.num_steps // rl.num_iterations
  policy = setup.policy(NAME)
  tx = make_optimizer(rl, rl.num_steps, param_dtype=setup.model_cfg.param_dtype)
  state = initial_state(setup, policy, tx, params, start=start, reference=reference)
  ctx = StepContext(
      setup=setup, policy=policy, name=stage_name(iteration, rl.num_iterations), iteration=iteration,
      offset=(iteration - 1) * steps_per_iteration, rng=jax.random.fold_in(setup.rng, 1),
      train_step=make_packed_train_step(setup, policy, state['policy'], tx),
      advantage_fn=get_advantage_fn(rl.advantage), lr_at=learning_rate(rl, rl.num_steps),
      length_buckets=length_buckets(cfg), group=shared_prompt_group(cfg),
      row_buckets=pack_row_buckets(cfg), learned_reward=learned_reward, step_scores=step_scores,
      **correction_fns(setup), **credit_switches(setup))

  def finish(state):
    held_out = setup.evaluate(state['policy'].params, 'test', policy, keep_scores=True)
    return {'test_accuracy': held_out['accuracy'], 'test_reward': held_out['reward'], 'sample': held_out['sample'],
            'test_scores': held_out['scores'], 'iteration': iteration}

  # The loop's data_position counts this stage's steps; the prompt stream's position is data_offset + that.
  meta = {**setup.checkpoint_meta(policy), 'iteration': iteration, 'data_offset': ctx.offset}
  return Stage(ctx.name, steps_per_iteration, state, functools.partial(grpo_step, ctx), finish, meta=meta)
