r"""SFT warm-start, then GRPO, then a held-out comparison. The one entry point.

  python -m grpo_jax.train --config configs/default.py --workdir /tmp/grpo
  python -m grpo_jax.train --config configs/default.py:tiny --workdir /tmp/tiny --config.rl.group_size=16

Rerunning with the same --workdir resumes from the last checkpoint of the unfinished stage; a config that
differs in anything that changes the trajectory is refused unless --allow_config_change names it (e.g.
--allow_config_change=rl.num_steps --config.rl.num_steps=400 extends a finished run). What runs is
grpo_jax/pipeline/run.py.
"""
import errno
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from grpo_jax.parallel import distributed
from grpo_jax.pipeline.checkpoint import CheckpointError, DiskFullError
from grpo_jax.pipeline.config_checks import parse_flags
from grpo_jax.pipeline.loop import NonFiniteError, NotTrainedError
from grpo_jax.pipeline.run import run
from grpo_jax.pipeline.workdir import WorkdirError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the summary go.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'Config keys (or sections) that may differ from the config the workdir was trained '
    'with, e.g. rl.num_steps to extend a finished run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  distributed.initialize()  # before any other jax call: it fixes the global device list on several hosts
  try:
    run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except DiskFullError as e:
    # Orbax's writer threads are still failing; exiting now spares the reader a traceback from each of them.
    sys.stderr.write(f'\ngrpo_jax.train: {e}\n')  # after the progress bar's line
    sys.stderr.flush()
    os._exit(1)
  except (ValueError, FileNotFoundError, MemoryError, CheckpointError, WorkdirError, NonFiniteError,
          NotTrainedError) as e:
    sys.exit(f'grpo_jax.train: {e}')  # bad input or a stopped run: the message says what and what to do
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    sys.exit(f'grpo_jax.train: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: parse_flags(argv, 'grpo_jax.train'))
