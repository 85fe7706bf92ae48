"""A training run: SFT warm-start, then DeepSeekMath's iterative RL (Alg. 1), then the held-out comparison.
The stages in order, composed here:

  sft -> [reward_model_0] -> grpo_1 -> [reward_model_1] -> grpo_2 -> ... -> grpo_I

The stages and their checkpoint folders are the table in stages.py. Each outer iteration k is one GRPO stage
('grpo' when I = 1, else 'grpo_<k>'): it starts from the policy,
optimizer and KL controller where iteration k - 1 left them, with the reference reset to that policy
(rl.reset_reference). With a learned reward (rl.reward_source != 'verifier') the reward model is trained before
iteration 1 on the SFT policy's comparisons, and again after each iteration but the last on the new policy's,
with replay (pipeline/reward_model.py). Every stage's last checkpoint is kept, so <workdir>/checkpoints/grpo_<k>
and reward_model_<k> together are iteration k's boundary, by role. With rl.algorithm='ppo' the one RL stage is
'ppo'. Either way summary.json reports the RL stage's results as rl_* keys.

`run(cfg, workdir)` is what `python -m grpo_jax.train` calls. Everything is checked before anything is built or
written (the config, the data, the workdir's checkpoints), then each stage runs through the stage loop
(loop.run_stage), which resumes a stage from its last checkpoint and skips a finished one. A stage that skipped most
of its updates (non-finite) ends the run there (loop.NotTrainedError); skipped updates and a collapse are counted in
summary.json and the final table.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from grpo_jax.data.numbers_task import win_rate
from grpo_jax.models import gguf, hf
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import checkpoint, grpo, reward_model, stages, workdir as workdir_lib
from grpo_jax.pipeline.config_checks import check_config, process_reward_model, uses_reward_model
from grpo_jax.pipeline.loop import Interrupt, Sinks, run_stage
from grpo_jax.pipeline.metrics import MetricWriter, read_metrics
from grpo_jax.pipeline.setup import Setup, build_setup, model_path, stage_lora
from grpo_jax.pipeline.stages import Role
from grpo_jax.pipeline.stats import mcnemar, wilson_interval


def check_workdir(cfg, workdir: str, model_cfg) -> None:
  """Refuse a workdir whose checkpoints were trained with another model or LoRA config, or written in the layout
  before checkpoint items were named by role, before any param is built."""
  for folder in checkpoint.stage_folders(workdir):
    mngr = checkpoint.manager(workdir, folder, max_to_keep=cfg.checkpoint_keep)
    meta = newest_readable_meta(mngr)
    if meta is None:
      continue
    where = f'{workdir}/checkpoints/{folder}'
    checkpoint.check_model_config(meta, dataclasses.asdict(model_cfg), where)
    kind = stages.kind_of(folder)
    if kind is None or Role.POLICY not in kind.roles:  # no policy to train with LoRA (the reward model never is)
      continue
    lora_cfg = stage_lora(cfg, kind.name)
    want = None if lora_cfg is None else lora_cfg.to_json()
    if meta.get('lora') != want:
      raise checkpoint.CheckpointError(
          f'{where} holds a checkpoint trained with LoRA {meta.get("lora")} but config.lora gives {want} (None: '
          'full fine-tuning); use a fresh --workdir or the saved config')


def _check_before_params(cfg, workdir: str, model_cfg) -> None:
  check_workdir(cfg, workdir, model_cfg)
  if uses_reward_model(cfg) and cfg.reward_model.path:
    reward_model.check_path(cfg.reward_model.path, model_cfg)


def newest_readable_meta(mngr) -> dict | None:
  """The meta of the newest checkpoint whose meta reads (the loop falls back past broken ones the same way); None
  without checkpoints. When there are checkpoints but none reads, the error names them."""
  errors = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = checkpoint.read_meta(mngr, step)
    except checkpoint.CheckpointError as e:
      errors.append(str(e))
      continue
    checkpoint.check_policy_layout(mngr, step)
    return meta
  if errors:
    raise checkpoint.CheckpointError('; '.join(errors))
  return None


def _table(rows: list[tuple[str, dict]]) -> str:
  """The final table: each stage's held-out numbers and wall time, the fraction of its updates skipped (non-finite)
  and the step it collapsed at ('-': none; loop.Health)."""
  def skipped(r):  # nan: a stage from before counting
    frac = r.get('skipped_update_frac')
    return '-' if frac is None or not r.get('steps') else '?' if math.isnan(frac) else f'{100 * frac:.0f}%'
  lines = [f"{'stage':<8} {'held-out acc':>12} {'mean reward':>12} {'wall (s)':>9} {'skipped':>8} {'collapsed':>10}"]
  lines += [f"{s:<8} {r['test_accuracy']:>12.3f} {r['test_reward']:>12.3f} {r['wall_time']:>9.1f} "
            f"{skipped(r):>8} "
            f"{'-' if r.get('collapse_step') is None else 'step ' + str(r['collapse_step']):>10}" for s, r in rows]
  return '\n'.join(lines)


def _initial_eval(setup: Setup, workdir: str, is_main: bool) -> dict:
  """The initial model's held-out numbers, kept in init_eval.json so a resumed run does not evaluate again."""
  path = os.path.join(workdir, 'init_eval.json')
  try:
    saved = workdir_lib.read_json(path)
  except workdir_lib.WorkdirError as e:
    distributed.print0(f'WARNING: {e}; evaluating the initial model again')
    saved = None
  if saved is not None:
    return saved
  init_eval = setup.evaluate(setup.init_params, 'test', keep_scores=True)  # collective: every process gets them
  if is_main:
    workdir_lib.write_json(path, init_eval)
  return init_eval


def _export(setup: Setup, params, workdir: str, is_main: bool) -> None:
  """The trained policy as a Hugging Face model directory, <workdir>/hf_model."""
  export_dir = os.path.join(workdir, 'hf_model')
  hf.save_model(nnx.merge(setup.graphdef, params), setup.model_cfg, export_dir)  # collective; process 0 writes
  if is_main:
    setup.tokenizer.save_pretrained(export_dir)
    save_generation_config(model_path(setup.cfg), export_dir)
  distributed.print0(f'exported the policy to {export_dir}')


def save_generation_config(path: str, out_dir: str) -> None:
  """The stop tokens of the model at `path` beside a saved tokenizer (stop_token_ids reads them there): its
  generation_config.json, or for a .gguf file one holding the metadata's EOS and end-of-turn ids."""
  if not path:
    return
  if gguf.is_gguf(path):
    workdir_lib.write_json(os.path.join(out_dir, 'generation_config.json'),
                           {'eos_token_id': list(gguf.stop_token_ids(path))}, indent=2)
  elif os.path.isfile(os.path.join(path, 'generation_config.json')):
    shutil.copy(os.path.join(path, 'generation_config.json'), out_dir)


def _has_checkpoints(workdir: str, folders: Sequence[str]) -> bool:
  """Whether any of the stage folders has a checkpoint."""
  return any(checkpoint.manager(workdir, folder, max_to_keep=1_000_000).all_steps() for folder in folders)


def _mean_metric(workdir: str, stage: str, key: str) -> float | None:
  values = [r[key] for r in read_metrics(workdir, stage) if key in r] if os.path.exists(
      os.path.join(workdir, 'metrics.jsonl')) else []
  values = [v for v in values if v == v]  # nan: a step with no pair to compare
  return float(np.mean(values)) if values else None


def _iterations(setup: Setup, sft_params, sinks: Sinks) -> tuple[dict, list[dict], list[dict]]:
  """Algorithm 1's outer loop. Returns (the last GRPO stage's state, each iteration's summary, each reward-model
  (re)training's summary)."""
  rl = setup.cfg.rl
  if stages.rl_stage(rl.algorithm) is stages.PPO:  # the baseline: one stage, a critic for the group baseline
    state, summary = run_stage(stages.PPO.build(setup, sft_params), sinks)
    signal = {k: _mean_metric(sinks.workdir, stages.PPO.name, k) for k in ('frac_groups_no_signal', 'pass_at_g')}
    return state, [{'iteration': 1, 'stage': stages.PPO.name, **summary, 'rm_agreement': None,
                    'rm_heldout_accuracy': None, **signal}], []
  process = process_reward_model(setup.cfg)  # a process reward model (step labels), else an outcome one
  learned = uses_reward_model(setup.cfg)
  rm = rm_state = buffer = None
  rm_summaries, summaries = [], []

  def train_reward_model(k, start, policy_params):
    nonlocal rm_state, buffer
    if process:
      state, summary = run_stage(reward_model.make_process_stage(setup, rm, k, start, policy_params), sinks)
    else:
      stage, new = stages.REWARD_MODEL.build(setup, rm, k, {Role.REWARD_MODEL: start, 'replay_buffer': buffer},
                                             policy_params)
      state, summary = run_stage(stage, sinks)
      buffer = reward_model.buffer_after(setup, state['replay_buffer'], new, k)
    rm_state = state[Role.REWARD_MODEL]
    rm_summaries.append({'stage': reward_model.stage_name(k), **summary})

  if learned:
    rm = reward_model.spec(setup)
    buffer = reward_model.empty_buffer(setup)
    train_reward_model(0, reward_model.init_params(setup, rm, sft_params), sft_params)
  start = None
  sft_reference = sft_params
  for k in range(1, rl.num_iterations + 1):
    # Iteration 1's reference is the SFT policy; later ones the policy as the iteration starts (the paper), or
    # still the SFT policy (kept as iteration 1's frozen copy: sft_params' buffers were donated to training).
    reference = sft_reference if k == 1 or not rl.reset_reference else None
    stage = stages.GRPO.build(
        setup, sft_params, iteration=k, start=start, reference=reference,
        learned_reward=reward_model.learned_reward(rm, rm_state.params) if learned and not process else None,
        step_scores=reward_model.learned_step_scores(rm, rm_state.params) if process else None)
    state, summary = run_stage(stage, sinks)
    if Role.REFERENCE in state and k == 1:
      sft_reference = state[Role.REFERENCE]
    start = {Role.POLICY: state[Role.POLICY], 'kl_controller': state['kl_controller']}
    summaries.append({'iteration': k, 'stage': stage.name, **summary,
                      'rm_agreement': _mean_metric(sinks.workdir, stage.name, 'rm_agreement'),
                      # From the logged steps, so a resumed stage reports what an uninterrupted one does.
                      'frac_groups_no_signal': _mean_metric(sinks.workdir, stage.name, 'frac_groups_no_signal'),
                      'pass_at_g': _mean_metric(sinks.workdir, stage.name, 'pass_at_g'),
                      'rm_heldout_accuracy': rm_summaries[-1]['heldout_accuracy'] if rm_summaries else None})
    if learned and k < rl.num_iterations:
      train_reward_model(k, rm_state, setup.merged(state[Role.POLICY].params, setup.policy(stages.GRPO.name)))
  return state, summaries, rm_summaries


def _check_memory(cfg, setup) -> None:
  """config.memory_check: the GRPO step's memory plan against what this process has, before anything runs."""
  mode = cfg.memory_check
  if mode == 'off' or (mode == 'auto' and not cfg.model.path) or not cfg.rl.num_steps or \
     cfg.rl.algorithm != stages.GRPO.name:
    return
  from grpo_jax.pipeline import plan  # noqa: PLC0415  (imports the whole stage; only when checking)
  start = time.perf_counter()
  checked = plan.check_memory(cfg, setup, int(cfg.memory_limit_gib * plan.GIB) or None)  # MemoryError: phase, knobs
  if checked is not None:
    peak = checked['peak_phase']
    distributed.print0(f"memory plan: peak phase {peak} {checked['need'][peak] / plan.GIB:.1f} GiB of "
                       f"{checked['limit'] / plan.GIB:.1f} "
                       f"GiB {checked['of']} (checked in {time.perf_counter() - start:.0f} s)")


def run(cfg, workdir: str, *, allow_config_change: Sequence[str] = ()) -> dict:
  """Train as `cfg` says, in `workdir` (created; resumed when it holds checkpoints). Returns the summary.

  One run at a time per workdir (a lock). Resuming with a config that changes the trajectory is an error unless
  `allow_config_change` names each changed key (or its section); e.g. ('rl.num_steps',) extends a finished run.
  """
  distributed.use_cpu_devices(cfg.cpu_devices)  # before the first jax call below starts the backend
  check_config(cfg, jax.device_count())
  distributed.use_compile_cache(cfg.compile_cache_dir)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir):
    return _run(cfg, workdir, allow_config_change)


def _run(cfg, workdir: str, allow_config_change: Sequence[str]) -> dict:
  folders = checkpoint.stage_folders(workdir)
  trained = _has_checkpoints(workdir, folders) or os.path.exists(os.path.join(workdir, 'init_eval.json'))
  config_json = cfg.to_json_best_effort(indent=2)
  changes = workdir_lib.check_config(workdir, config_json, allow=allow_config_change, trained=trained)
  if any(k.startswith('sft.') for k in changes) and _has_checkpoints(workdir, stages.rl_folders(folders)):
    raise workdir_lib.WorkdirError(f'{workdir}: RL has started from the SFT policy, so changing {sorted(changes)} '
                                   'would need RL rerun from scratch; use a fresh --workdir')
  # Data and any existing checkpoint are validated before a param is created or a file written.
  setup = build_setup(cfg, before_params=lambda tokenizer, model_cfg: _check_before_params(cfg, workdir, model_cfg))
  workdir_lib.record_config(workdir, config_json, changes, resumed=trained)
  is_main = distributed.is_main_process()  # on several hosts (one shared workdir) process 0 writes the files
  if is_main:
    setup.tokenizer.save_pretrained(os.path.join(workdir, 'tokenizer'))
    save_generation_config(model_path(cfg), os.path.join(workdir, 'tokenizer'))  # for eval from the workdir
  n_params = sum(x.size for x in jax.tree.leaves(setup.init_params))
  distributed.print0(f'model: {n_params / 1e6:.2f}M params; devices: {jax.device_count()} '
                     f'({jax.process_count()} processes); mesh: {dict(setup.mesh.shape)}')
  sinks = Sinks(workdir, MetricWriter(workdir, active=is_main), Interrupt(), log_every=cfg.log_every,
                checkpoint_every=cfg.checkpoint_every, checkpoint_keep=cfg.checkpoint_keep,
                compute_dtype=cfg.model.dtype, max_nonfinite_steps=cfg.max_nonfinite_steps)

  _check_memory(cfg, setup)
  init_eval = _initial_eval(setup, workdir, is_main)
  if cfg.sft.max_steps > 0:
    state, sft_summary = run_stage(stages.SFT.build(setup, setup.init_params), sinks)
    sft_params = setup.merged(state[Role.POLICY].params, setup.policy(stages.SFT.name))
  else:  # RL straight from the loaded model (an SFT / instruct checkpoint), as in the paper
    sft_params = setup.init_params
    sft_summary = {'test_accuracy': init_eval['accuracy'], 'test_reward': init_eval['reward'], 'steps': 0,
                   'wall_time': 0.0, 'sample': init_eval['sample'], 'test_scores': init_eval.get('scores'),
                   'nonfinite_steps': 0, 'skipped_update_frac': 0.0, 'collapse_step': None}
  if cfg.rl.num_steps:
    state, iterations, rm_summaries = _iterations(setup, sft_params, sinks)
    final_params = setup.merged(state[Role.POLICY].params, setup.policy(stages.rl_stage(cfg.rl.algorithm).name))
  else:  # SFT only (e.g. the compute-matched control, configs/default.py:sft_matched)
    iterations, rm_summaries, final_params = [], [], sft_params
  sinks.writer.close()
  if cfg.export_hf:
    _export(setup, final_params, workdir, is_main)
  summary = _summary(cfg, init_eval, sft_summary, iterations, rm_summaries)
  if is_main:
    workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary, indent=2)
  distributed.print0('\n' + _table([
      ('init', {'test_accuracy': init_eval['accuracy'], 'test_reward': init_eval['reward'], 'wall_time': 0.0}),
      (stages.SFT.name, sft_summary), *[(it['stage'], it) for it in iterations]]))
  for it in (sft_summary, *iterations):
    if it.get('collapse_step') is not None:
      distributed.print0(f"WARNING: {it.get('stage', stages.SFT.name)} collapsed at step {it['collapse_step']}: its "
                         'held-out numbers are those of a model that stopped training there')
  for it in iterations:
    warning = grpo.weak_signal_warning(it['stage'], it.get('frac_groups_no_signal'), it.get('pass_at_g'))
    if warning:
      distributed.print0(f'WARNING: {warning}')
  distributed.print0(f'summary: {os.path.join(workdir, "summary.json")}')
  return summary


def _health(prefix: str, summaries: Sequence[dict]) -> dict:
  """<prefix>_nonfinite_steps (steps with a skipped update), <prefix>_skipped_update_frac (of all the stages'
  updates) and <prefix>_collapse_step (the first collapse, steps counted across the stages end to end; None: none)
  of one kind's stages (loop.Health)."""
  steps = sum(s['steps'] for s in summaries)
  collapse, offset = None, 0
  for s in summaries:
    if collapse is None and s.get('collapse_step') is not None:
      collapse = offset + s['collapse_step']
    offset += s['steps']
  skipped = sum(s['skipped_update_frac'] * s['steps'] for s in summaries) / steps if steps else 0.0
  return {f'{prefix}_nonfinite_steps': sum(s['nonfinite_steps'] for s in summaries),
          f'{prefix}_skipped_update_frac': None if math.isnan(skipped) else skipped,  # nan: a stage before counting
          f'{prefix}_collapse_step': collapse}


def _summary(cfg, init_eval: dict, sft_summary: dict, iterations: list[dict], rm_summaries: list[dict]) -> dict:
  """summary.json: the initial, SFT and RL stage's held-out results (the RL stage's as rl_*: GRPO's, or PPO's with
  rl.algorithm='ppo'), intervals, the paired test, whether the stages trained; with iterative RL, each iteration's
  and reward-model training's summary. Drops the iterations' per-problem scores."""
  rl_summary = iterations[-1] if iterations else dict.fromkeys(
      ('test_accuracy', 'test_reward', 'sample', 'win_rate_vs_sft', 'frac_groups_no_signal', 'pass_at_g'))
  # Per problem (verifier score >= 1), taken before the loop below drops the scores: intervals and the paired test.
  sft_correct = None if sft_summary.get('test_scores') is None else np.asarray(sft_summary['test_scores']) >= 1
  rl_correct = np.asarray(iterations[-1]['test_scores']) >= 1 if iterations else None
  for it in iterations:  # the hidden rater's (or verifier's) head-to-head of each iteration's policy against SFT's
    it['win_rate_vs_sft'] = (None if sft_summary.get('test_scores') is None else
                             win_rate(np.asarray(it['test_scores']), np.asarray(sft_summary['test_scores'])))
    del it['test_scores']
  summary = {'rl_algorithm': cfg.rl.algorithm, 'init_accuracy': init_eval['accuracy'],
             'sft_accuracy': sft_summary['test_accuracy'], 'rl_accuracy': rl_summary['test_accuracy'],
             'sft_reward': sft_summary['test_reward'], 'rl_reward': rl_summary['test_reward'],
             'sft_steps': sft_summary['steps'], 'rl_steps': sum(it['steps'] for it in iterations),
             'sft_wall_time': sft_summary['wall_time'], 'rl_wall_time': sum(it['wall_time'] for it in iterations),
             'sft_sample': sft_summary['sample'], 'rl_sample': rl_summary['sample'],
             'rl_win_rate_vs_sft': rl_summary['win_rate_vs_sft'],
             'rl_frac_groups_no_signal': rl_summary.get('frac_groups_no_signal'),
             'rl_pass_at_g': rl_summary.get('pass_at_g'),
             'sft_accuracy_ci': None if sft_correct is None else list(wilson_interval(sft_correct)),
             'rl_accuracy_ci': None if rl_correct is None else list(wilson_interval(rl_correct)),
             'rl_vs_sft_mcnemar_p': (None if sft_correct is None or rl_correct is None else
                                     mcnemar(rl_correct, sft_correct)['p_value']),
             **_health('sft', [sft_summary]), **_health('rl', iterations)}
  if len(iterations) > 1 or rm_summaries:
    summary.update(iterations=iterations, reward_model=rm_summaries,
                   reward_model_wall_time=sum(r['wall_time'] for r in rm_summaries))
  return summary
