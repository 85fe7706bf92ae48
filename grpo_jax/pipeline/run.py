"""A training run: SFT warm-start, then GRPO, then the held-out comparison. The stages in order, composed here.

`run(cfg, workdir)` is what `python -m grpo_jax.train` calls. Everything is checked before anything is built or
written (the config, the data, the workdir's checkpoints), then each stage runs through the stage loop
(loop.run_stage), which resumes a stage from its last checkpoint and skips a finished one.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence

import jax
from flax import nnx

from grpo_jax.models import hf
from grpo_jax.parallel import distributed
from grpo_jax.pipeline import checkpoint, grpo, sft, workdir as workdir_lib
from grpo_jax.pipeline.config_checks import check_config
from grpo_jax.pipeline.loop import Interrupt, Sinks, run_stage
from grpo_jax.pipeline.metrics import MetricWriter
from grpo_jax.pipeline.setup import STAGES, Setup, build_setup, stage_lora


def check_workdir(cfg, workdir: str, model_cfg) -> None:
  """Refuse a workdir whose checkpoints were trained with another model or LoRA config, or written in the layout
  before checkpoint items were named by role, before any param is built."""
  for stage in STAGES:
    mngr = checkpoint.manager(workdir, stage, max_to_keep=cfg.checkpoint_keep)
    meta = newest_readable_meta(mngr)
    if meta is None:
      continue
    where = f'{workdir}/checkpoints/{stage}'
    checkpoint.check_model_config(meta, dataclasses.asdict(model_cfg), where)
    lora_cfg = stage_lora(cfg, stage)
    want = None if lora_cfg is None else lora_cfg.to_json()
    if meta.get('lora') != want:
      raise checkpoint.CheckpointError(
          f'{where} holds a checkpoint trained with LoRA {meta.get("lora")} but config.lora gives {want} (None: '
          'full fine-tuning); use a fresh --workdir or the saved config')


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


def _table(rows: list[tuple[str, float, float, float]]) -> str:
  lines = [f"{'stage':<8} {'held-out acc':>12} {'mean reward':>12} {'wall (s)':>9}"]
  lines += [f'{s:<8} {a:>12.3f} {r:>12.3f} {w:>9.1f}' for s, a, r, w in rows]
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
  init_eval = setup.evaluate(setup.init_params, 'test')  # collective; every process gets the same numbers
  if is_main:
    workdir_lib.write_json(path, init_eval)
  return init_eval


def _export(setup: Setup, params, workdir: str, is_main: bool) -> None:
  """The trained policy as a Hugging Face model directory, <workdir>/hf_model."""
  export_dir = os.path.join(workdir, 'hf_model')
  hf.save_model(nnx.merge(setup.graphdef, params), setup.model_cfg, export_dir)  # collective; process 0 writes
  generation_config = os.path.join(setup.cfg.model.path, 'generation_config.json')
  if is_main:
    setup.tokenizer.save_pretrained(export_dir)
    if setup.cfg.model.path and os.path.isfile(generation_config):
      shutil.copy(generation_config, export_dir)
  distributed.print0(f'exported the policy to {export_dir}')


def _has_checkpoints(workdir: str, stage: str) -> bool:
  return bool(checkpoint.manager(workdir, stage, max_to_keep=1_000_000).all_steps())


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
  trained = any(_has_checkpoints(workdir, stage) for stage in STAGES) or os.path.exists(
      os.path.join(workdir, 'init_eval.json'))
  config_json = cfg.to_json_best_effort(indent=2)
  changes = workdir_lib.check_config(workdir, config_json, allow=allow_config_change, trained=trained)
  if any(k.startswith('sft.') for k in changes) and _has_checkpoints(workdir, grpo.NAME):
    raise workdir_lib.WorkdirError(f'{workdir}: GRPO has started from the SFT policy, so changing {sorted(changes)} '
                                   'would need GRPO rerun from scratch; use a fresh --workdir')
  # Data and any existing checkpoint are validated before a param is created or a file written.
  setup = build_setup(cfg, before_params=lambda tokenizer, model_cfg: check_workdir(cfg, workdir, model_cfg))
  workdir_lib.record_config(workdir, config_json, changes, resumed=trained)
  is_main = distributed.is_main_process()  # on several hosts (one shared workdir) process 0 writes the files
  if is_main:
    setup.tokenizer.save_pretrained(os.path.join(workdir, 'tokenizer'))
    generation_config = os.path.join(cfg.model.path, 'generation_config.json')
    if cfg.model.path and os.path.isfile(generation_config):  # its stop tokens, for eval from the workdir
      shutil.copy(generation_config, os.path.join(workdir, 'tokenizer'))
  n_params = sum(x.size for x in jax.tree.leaves(setup.init_params))
  distributed.print0(f'model: {n_params / 1e6:.2f}M params; devices: {jax.device_count()} '
                     f'({jax.process_count()} processes); mesh: {dict(setup.mesh.shape)}')
  sinks = Sinks(workdir, MetricWriter(workdir, active=is_main), Interrupt(), log_every=cfg.log_every,
                checkpoint_every=cfg.checkpoint_every, checkpoint_keep=cfg.checkpoint_keep,
                compute_dtype=cfg.model.dtype, max_nonfinite_steps=cfg.max_nonfinite_steps)

  init_eval = _initial_eval(setup, workdir, is_main)
  if cfg.sft.max_steps > 0:
    state, sft_summary = run_stage(sft.make_stage(setup, setup.init_params), sinks)
    sft_params = setup.merged(state['policy'].params, setup.policy(sft.NAME))
  else:  # RL straight from the loaded model (an SFT / instruct checkpoint), as in the paper
    sft_params = setup.init_params
    sft_summary = {'test_accuracy': init_eval['accuracy'], 'test_reward': init_eval['reward'], 'steps': 0,
                   'wall_time': 0.0, 'sample': init_eval['sample']}
  state, grpo_summary = run_stage(grpo.make_stage(setup, sft_params), sinks)
  grpo_params = setup.merged(state['policy'].params, setup.policy(grpo.NAME))
  sinks.writer.close()
  if cfg.export_hf:
    _export(setup, grpo_params, workdir, is_main)

  summary = {'init_accuracy': init_eval['accuracy'], 'sft_accuracy': sft_summary['test_accuracy'],
             'grpo_accuracy': grpo_summary['test_accuracy'], 'sft_reward': sft_summary['test_reward'],
             'grpo_reward': grpo_summary['test_reward'], 'sft_steps': sft_summary['steps'],
             'grpo_steps': grpo_summary['steps'], 'sft_wall_time': sft_summary['wall_time'],
             'grpo_wall_time': grpo_summary['wall_time'], 'sft_sample': sft_summary['sample'],
             'grpo_sample': grpo_summary['sample']}
  if is_main:
    workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary, indent=2)
  distributed.print0('\n' + _table([
      ('init', init_eval['accuracy'], init_eval['reward'], 0.0),
      ('sft', sft_summary['test_accuracy'], sft_summary['test_reward'], sft_summary['wall_time']),
      ('grpo', grpo_summary['test_accuracy'], grpo_summary['test_reward'], grpo_summary['wall_time'])]))
  distributed.print0(f'summary: {os.path.join(workdir, "summary.json")}')
  return summary
