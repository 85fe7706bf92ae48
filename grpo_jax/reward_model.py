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

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax.parallel import distributed
from grpo_jax.pipeline import reward_model
from grpo_jax.pipeline.config_checks import parse_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the result go.')
_PREFERENCES = flags.DEFINE_string('preferences', None, 'Preference pairs, JSONL: {"prompt", "chosen", "rejected"}.')


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
    result = reward_model.train_alone(cfg, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'grpo_jax.reward_model: {e}') from None
  distributed.print0(json.dumps({k: result[k] for k in ('heldout_accuracy_before', 'heldout_accuracy', 'train_pairs',
                                                        'heldout_pairs', 'steps')}))
  distributed.print0(f'held-out pairwise accuracy {result["heldout_accuracy"]:.3f} (before training '
                     f'{result["heldout_accuracy_before"]:.3f}); {os.path.join(_WORKDIR.value, "reward_model.json")}')


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'grpo_jax.reward_model'))
