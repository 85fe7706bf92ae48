"""Every command answers --help: each module under grpo_jax/, benchmarks/*.py and launch/*.py with a top-level
`def main(` or an `if __name__ == '__main__':` block prints its usage and exits 0.

The commands are found by scanning the source, not kept in a list, so a new command is checked the day it lands.
A fresh interpreter per command costs seconds (jax, flax, orbax imports) on a 2-core machine, so one driver process
imports those once and forks a child per command; the child runs the command as __main__ (runpy, which is what
`python -m <module>` and `python <file>` do) with argv [<command>, '--help'], its output in a file of its own.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A command: a top-level main, or a script block (a module run only as a script may have no main).
COMMAND = re.compile(r"^(def main\(|if __name__ == ['\"]__main__['\"]:)", re.MULTILINE)
# A command that ignores --help runs for real; a stuck child is stopped after this many seconds and fails.
CHILD_TIMEOUT_S = 120

DRIVER = r'''
import json, os, runpy, signal, sys, traceback
# What (nearly) every command imports: loaded once here, shared by the forked children.
import jax, numpy, optax, orbax.checkpoint, flax.nnx, ml_collections.config_flags, absl.app  # noqa
import grpo_jax.pipeline.run, grpo_jax.experiments.runs  # noqa: library modules, not commands

commands, out_dir, timeout = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
results = {}
for i, command in enumerate(commands):
  path = os.path.join(out_dir, f'{i}.txt')
  pid = os.fork()
  if pid == 0:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.alarm(timeout)
    sys.argv = [command, '--help']
    code = 0
    try:
      if command.endswith('.py'):
        sys.path.insert(0, os.path.dirname(command))  # as `python <file>` puts the script's folder first
        runpy.run_path(command, run_name='__main__')
      else:
        runpy.run_module(command, run_name='__main__', alter_sys=True)
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  with open(path, errors='replace') as f:
    results[command] = [os.waitstatus_to_exitcode(status), f.read()]
print(json.dumps(results))
'''


def commands(root: Path = ROOT) -> list[str]:
  """Module names (grpo_jax.train) and script paths relative to root (benchmarks/compare.py) of every command."""
  found = []
  for path in sorted((root / 'grpo_jax').rglob('*.py')):
    if COMMAND.search(path.read_text()):
      found.append('.'.join(path.relative_to(root).with_suffix('').parts))
  for folder in ('benchmarks', 'launch'):
    for path in sorted((root / folder).glob('*.py')):  # not the hidden .venv-trl below benchmarks/
      if COMMAND.search(path.read_text()):
        found.append(str(path.relative_to(root)))
  return found


COMMANDS = commands()


@pytest.fixture(scope='module')
def answers(tmp_path_factory):
  """{command: (exit status, what it printed)} for `<command> --help`, every command in one driver process."""
  out_dir = tmp_path_factory.mktemp('help')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', DRIVER, json.dumps(COMMANDS), str(out_dir), str(CHILD_TIMEOUT_S)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {k: tuple(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def test_the_scan_finds_the_commands(tmp_path):
  # Known commands of each kind, so a scan that finds nothing cannot pass the test below vacuously.
  assert {'grpo_jax.train', 'grpo_jax.eval', 'grpo_jax.experiments.paper_table', 'grpo_jax.experiments.group_size',
          'grpo_jax.experiments.iterative_rl', 'benchmarks/compare.py'} <= set(COMMANDS)
  assert 'grpo_jax.pipeline.config_checks' not in COMMANDS  # names app.run in a docstring only: no command
  (tmp_path / 'grpo_jax' / 'sub').mkdir(parents=True)
  (tmp_path / 'grpo_jax' / 'sub' / 'cmd.py').write_text('"""x"""\n\n\nif __name__ == "__main__":\n  pass\n')
  (tmp_path / 'grpo_jax' / 'lib.py').write_text('def helper():\n  """if __name__ == "__main__":"""\n')
  (tmp_path / 'benchmarks').mkdir()
  (tmp_path / 'benchmarks' / 'bench.py').write_text('def main(argv=None):\n  pass\n')
  assert commands(tmp_path) == ['grpo_jax.sub.cmd', 'benchmarks/bench.py']


@pytest.mark.parametrize('command', COMMANDS)
def test_command_prints_its_usage_on_help_and_exits_0(answers, command):
  status, printed = answers[command]
  assert status == 0, printed[-3000:]
  assert 'Traceback' not in printed and 'Unknown command line flag' not in printed, printed[-3000:]
  # The usage names the command's flags (absl lists them as '--name:', argparse as '--name').
  assert re.search(r'^\s*--\w', printed, re.MULTILINE) or re.search(r'\s-h, --help', printed), printed[-3000:]
