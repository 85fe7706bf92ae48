"""Train a reward model on preference pairs and report its pairwise accuracy on held-out pairs; no GRPO.

  python -m grpo_jax.reward_model --config configs/default.py --preferences prefs.jsonl --workdir /tmp/rm
  python -m grpo_jax.reward_model --config configs/gsm8k_hf.py --preferences prefs.jsonl --workdir /tmp/rm \
      --config.reward_model.num_steps=500

prefs.jsonl: one {"prompt": ..., "chosen": ..., "rejected": ...} per line. The reward model is the config's model
(config.model: from scratch, or config.model.path's weights; or config.reward_model.path) with a scalar head; the
last config.reward_model.heldout_fraction of the pairs are held out. Trains config.reward_model.num_steps steps of
config.reward_model.batch_size pairs, checkpointed in <workdir>/checkpoints/reward_model_0 (rerun to resume);
writes <workdir>/reward_model.json with the held-out accuracy before and after training.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax.parallel import distributed
from grpo_jax.pipeline import reward_model, workdir as workdir_lib
from grpo_jax.pipeline.config_checks import check_config, parse_flags
from grpo_jax.pipeline.loop import Interrupt, Sinks, run_stage
from grpo_jax.pipeline.metrics import MetricWriter
from grpo_jax.pipeline.setup import build_setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the result go.')
_PREFERENCES = flags.DEFINE_string('preferences', None, 'Preference pairs, JSONL: {"prompt", "chosen", "rejected"}.')


def train(cfg, workdir: str) -> dict:
  """Train the reward model of `cfg` on cfg.reward_model.preference_file in `workdir`; returns the result."""
  distributed.use_cpu_devices(cfg.cpu_devices)
  check_config(cfg, jax.device_count())  # the preference file is read here: a bad line fails in a second
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir):
    setup = build_setup(cfg, data=False, before_params=lambda tokenizer, model_cfg: (
        reward_model.check_path(cfg.reward_model.path, model_cfg) if cfg.reward_model.path else None))
    rm = reward_model.spec(setup)
    buffer = reward_model.empty_buffer(setup)
    stage, _ = reward_model.make_stage(setup, rm, 0, {
        'reward_model': reward_model.init_params(setup, rm, setup.init_params), 'replay_buffer': buffer}, None)
    sinks = Sinks(workdir, MetricWriter(workdir, active=distributed.is_main_process()), Interrupt(),
                  log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, checkpoint_keep=cfg.checkpoint_keep,
                  compute_dtype=cfg.model.dtype, max_nonfinite_steps=cfg.max_nonfinite_steps)
    _, summary = run_stage(stage, sinks)
    sinks.writer.close()
    result = {'preference_file': cfg.reward_model.preference_file, **summary}
    if distributed.is_main_process():
      workdir_lib.write_json(os.path.join(workdir, 'reward_model.json'), result, indent=2)
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None or _WORKDIR.value is None or _PREFERENCES.value is None:
    raise app.UsageError('give --config, --workdir and --preferences')
  cfg = _CONFIG.value
  cfg.reward_model.preference_file = _PREFERENCES.value
  cfg.reward_model.label_samples = False  # pairs from the file only: there is no policy to sample
  cfg.rl.reward_source = 'reward_model'  # so the config checks read config.reward_model
  try:
    result = train(cfg, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'grpo_jax.reward_model: {e}') from None
  distributed.print0(json.dumps({k: result[k] for k in ('heldout_accuracy_before', 'heldout_accuracy', 'train_pairs',
                                                        'heldout_pairs', 'steps')}))
  distributed.print0(f'held-out pairwise accuracy {result["heldout_accuracy"]:.3f} (before training '
                     f'{result["heldout_accuracy_before"]:.3f}); {os.path.join(_WORKDIR.value, "reward_model.json")}')


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'grpo_jax.reward_model'))
