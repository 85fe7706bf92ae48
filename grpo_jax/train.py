r"""SFT warm-start, then GRPO, then a held-out comparison. The one entry point.

  python -m grpo_jax.train --config configs/default.py --workdir /tmp/grpo
  python -m grpo_jax.train --config configs/default.py:tiny --workdir /tmp/tiny --config.rl.group_size=16

Rerunning with the same --workdir resumes from the last checkpoint of the unfinished stage. What runs is
grpo_jax/pipeline/run.py.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax.parallel import distributed
from grpo_jax.pipeline.run import run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the summary go.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  distributed.initialize()  # before any other jax call: it fixes the global device list on several hosts
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
