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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad --config.<key> override is one line, not three chained tracebacks: for a key
  the config lacks, ml_collections raises a plain KeyError / AttributeError, and absl only reports flags.Error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, IndexError) as e:
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(message))
      e = e.args[0]
    lines = str(e.args[0] if e.args else '').split('\n')
    # ConfigDict's message: "'key'", then, if a key is close, 'Did you mean "k" instead of "key"?'.
    key = lines[0][1:-1] if len(lines[0]) > 1 and lines[0][0] == lines[0][-1] == "'" else None
    better = lines[1].split('"')[1] if len(lines) > 1 and lines[1].startswith('Did you mean "') else None
    for arg in argv[1:]:
      if not arg.lstrip('-').startswith('config.'):
        continue
      path = arg.lstrip('-').split('=')[0].removeprefix('config.')
      if key in path.split('.'):
        hint = f' (did you mean {".".join(better if p == key else p for p in path.split("."))}?)' if better else ''
        raise SystemExit(f'grpo_jax.train: unknown config key {path}{hint}') from None
      if path in lines[0]:  # config_path's "Attribute <class 'int'>.x does not exist ... lookup: rl.group_size.x"
        raise SystemExit(f'grpo_jax.train: bad override --config.{path}: {lines[0]}') from None
    raise  # not about an override (a fault in the config file itself): then the traceback is the useful part


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
