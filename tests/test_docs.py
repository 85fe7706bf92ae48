"""The docs cannot rot: every command in a bash / sh / console code block of README.md and docs/*.md parses.

How each command is checked (`check_command`):
  python -m grpo_jax.<mod> ...   every flag it names exists in that command (its own --help, run once per module in
                                 one subprocess); with --config (or --config.* overrides) a dry run: the config file
                                 and preset load through ml_collections' config flag as the CLI loads them, the
                                 overrides apply, and the project's config checks pass (pipeline/config_checks).
  python <file>.py ...           the file exists, each flag it names is defined in its source; --config as above.
  bash / sbatch <script> ...     the script exists; a launcher's arguments are the trainer's flags (checked as
                                 grpo_jax.train with the launcher's CONFIG); launch/test.sh's paths exist.
  pip install, cd, export        skipped.
Anything else fails, naming the doc file and line, so a new kind of command in the docs is handled on purpose.
Model paths in the docs (/models/...) are the reader's: a stand-in directory or .gguf file takes their place, so
the check covers the command, not the reader's disk. Relative links must name files and headings that exist.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
SHELL_BLOCKS = {'bash', 'sh', 'shell', 'console'}
LAUNCHERS = {'launch/local.sh', 'launch/tpu_pod.sh', 'launch/slurm.sh'}  # their arguments go to grpo_jax.train
EXPERIMENT_CONFIG = 'configs/default.py'  # grpo_jax.experiments.* use it when --config is not given
LAYOUT_ONLY = {'grpo_jax.plan'}  # checks only the mesh and batch layout: it needs no weights or tokenizer
SEPARATORS = {';', '&&', '||', '|', '&'}


@dataclasses.dataclass(frozen=True)
class Command:
  where: str  # 'docs/x.md:12', the line the command starts on
  argv: tuple[str, ...]  # environment assignments removed
  env: tuple[tuple[str, str], ...]

  def __str__(self) -> str:
    return f'{self.where}: {shlex.join(self.argv)}'


def _shell_lines(text: str) -> list[tuple[int, str, bool]]:
  """(line number, line, is console) of each line inside a bash / sh / console fence."""
  out, lang = [], None
  for number, line in enumerate(text.split('\n'), 1):
    fence = re.match(r'^\s*```\s*(\S*)', line)
    if fence:
      lang = (fence.group(1).lower() or 'text') if lang is None else None
    elif lang in SHELL_BLOCKS:
      out.append((number, line, lang == 'console'))
  return out


def doc_commands(path: Path, name: str | None = None) -> list[Command]:
  """The commands of a doc's shell blocks: continuations joined, comments dropped, `a && b` split, console output
  (lines without a `$ ` prompt) skipped. Commands are located as `name:line` (default: the path in the repo)."""
  rel = name or path.relative_to(ROOT).as_posix()
  commands, pending, start = [], '', 0
  for number, line, console in _shell_lines(path.read_text()):
    if not pending:
      if console:
        if not line.startswith('$ '):
          continue
        line = line[2:]
      start = number
    pending += line
    if pending.endswith('\\'):
      pending = pending[:-1] + ' '
      continue
    lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
      tokens = list(lexer)
    except ValueError as e:
      raise AssertionError(f'{rel}:{start}: the shell cannot parse this line ({e}): {pending}') from None
    pending = ''
    for simple in _split(tokens):
      env = []
      while simple and re.match(r'^[A-Za-z_]\w*=', simple[0]):
        env.append(tuple(simple.pop(0).split('=', 1)))
      if simple:
        commands.append(Command(f'{rel}:{start}', tuple(simple), tuple(env)))
  return commands


def _split(tokens: list[str]) -> list[list[str]]:
  out = [[]]
  for token in tokens:
    if token in SEPARATORS:
      out.append([])
    else:
      out[-1].append(token)
  return [c for c in out if c]


ALL_COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


# ------------------------------------------------------------------------------------------------ flags per module

# Runs in one subprocess: each module as __main__ with --help (then --helpfull), the flags its help lists (lines that
# start with --name, absl's and argparse's layout) collected, the flags it defined removed before the next. A module
# whose help fails has its flags read from its source instead.
FLAG_LISTER = r'''
import ast, contextlib, importlib.util, io, json, re, runpy, sys
from absl import app, flags
app.define_help_flags()
BASE = set(flags.FLAGS)
FLAG = re.compile(r'^\s*--(?:\[no\])?([A-Za-z][\w.-]*)', re.M)  # a flag's own help line, not prose

def help_flags(module, arg):
  out = io.StringIO()
  saved = sys.argv
  try:
    sys.argv = [module, arg]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      runpy.run_module(module, run_name='__main__', alter_sys=True)
  except SystemExit:
    pass
  finally:
    sys.argv = saved
    for name in set(flags.FLAGS) - BASE:
      delattr(flags.FLAGS, name)
  return {m for m in FLAG.findall(out.getvalue()) if m not in ('help', 'helpfull', 'helpshort', 'helpxml')}

def source_flags(module):
  names, todo, seen = set(), [module], set()
  while todo:
    name = todo.pop()
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # `from package.module import function`: not a module
      continue
    if name in seen or spec is None or not spec.origin or not spec.origin.endswith('.py'):
      continue
    seen.add(name)
    tree = ast.parse(open(spec.origin).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('grpo_jax') and name == module:
        todo += [node.module] + [f'{node.module}.{a.name}' for a in node.names]
      if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = getattr(node.func, 'attr', getattr(node.func, 'id', ''))
        if func.startswith('DEFINE_') or func == 'add_argument':
          names.add(str(node.args[0].value).lstrip('-'))
  return names

result = {}
for module in sys.argv[1:]:
  try:
    found, how = set(), 'help'
    for arg in ('--help', '--helpfull'):
      found = help_flags(module, arg)
      if found:
        break
    if not found:
      found, how = source_flags(module), 'source'
    result[module] = {'flags': sorted(found), 'how': how}
  except BaseException as e:
    result[module] = {'error': f'{type(e).__name__}: {e}'}
print('FLAGS-JSON ' + json.dumps(result))
'''


def _module_of(argv: tuple[str, ...]) -> str | None:
  return argv[2] if len(argv) > 2 and argv[0] in ('python', 'python3') and argv[1] == '-m' else None


BROKEN_MODULE = 'grpo_jax.no_such_module'  # the self-test below needs its error


@pytest.fixture(scope='module')
def module_flags() -> dict[str, dict]:
  modules = sorted({m for c in ALL_COMMANDS if (m := _module_of(c.argv)) and m.startswith('grpo_jax.')}
                   | {'grpo_jax.train', BROKEN_MODULE})
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', FLAG_LISTER, *modules], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  line = next((x for x in proc.stdout.splitlines() if x.startswith('FLAGS-JSON ')), None)
  assert line, f'the flag lister failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return json.loads(line.removeprefix('FLAGS-JSON '))


@pytest.fixture(scope='module')
def stand_ins(tmp_path_factory) -> dict[str, str]:
  """A model directory (config.json) and a .gguf file standing in for the reader's model paths."""
  root = tmp_path_factory.mktemp('doc_models')
  (root / 'hf_model').mkdir()
  (root / 'hf_model' / 'config.json').write_text('{}')
  (root / 'model.gguf').write_bytes(b'')
  return {'dir': str(root / 'hf_model'), 'gguf': str(root / 'model.gguf')}


# ------------------------------------------------------------------------------------------------- the checks

def _flags(args: list[str]) -> list[tuple[str, str | None]]:
  """(name, value) of each --flag; a value may be the next argument (`--config configs/x.py`)."""
  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if arg.startswith('-') and arg != '-':
      name, eq, value = arg.lstrip('-').partition('=')
      if not eq and i + 1 < len(args) and not args[i + 1].startswith('-'):
        value, i = args[i + 1], i + 1
      out.append((name, value if (eq or value) else None))
    i += 1
  return out


def _stand_in(path: str, stand_ins: dict[str, str]) -> str:
  from grpo_jax.models import gguf
  if not path:
    return path
  try:
    resolved = gguf.resolve_path(path)  # a malformed wheel: path fails here, as it would in the run
  except FileNotFoundError:  # a package the reader installs first (the docs say how)
    return stand_ins['gguf']
  if os.path.exists(resolved):
    return path
  return stand_ins['gguf'] if gguf.is_gguf(resolved) else stand_ins['dir']


def dry_run_config(where: str, config: str, overrides: list[str], stand_ins: dict[str, str],
                   num_devices: int | None = None, *, layout_only: bool = False) -> None:
  """Load `config` (path[:preset]) with its overrides as the CLIs do, then run the config checks (with layout_only,
  those grpo_jax.plan runs)."""
  from absl import flags
  from ml_collections import config_flags

  from grpo_jax.pipeline.config_checks import check_batch_layout, check_config
  path, sep, preset = config.partition(':')
  assert (ROOT / path).is_file(), f'{where}: no config file {path}'
  argv = ['doc', f'--config={ROOT / path}{sep}{preset}', *overrides]
  fv = flags.FlagValues()
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # config files import `configs.<name>`
  try:
    config_flags.DEFINE_config_file('config', None, 'doc', flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    cfg = fv.config
  except Exception as e:  # whatever the CLI would die of
    raise AssertionError(f'{where}: --config={config} {" ".join(overrides)} does not load: '
                         f'{type(e).__name__}: {e}') from None
  cfg.model.path = _stand_in(cfg.model.path, stand_ins)
  if 'reward_model' in cfg and 'path' in cfg.reward_model:
    cfg.reward_model.path = _stand_in(cfg.reward_model.path, stand_ins)
  if num_devices is None:  # a CPU host as the config describes it; -1 takes its devices
    sizes = [cfg.mesh[a] for a in ('data', 'fsdp', 'tensor')]
    num_devices = math.prod(s for s in sizes if s > 0) * (max(cfg.cpu_devices, 1) if -1 in sizes else 1)
  try:
    (check_batch_layout if layout_only else check_config)(cfg, num_devices)
  except (ValueError, FileNotFoundError) as e:
    raise AssertionError(f'{where}: the config checks refuse --config={config} {" ".join(overrides)}: {e}') from None


def check_flags_and_config(where: str, args: list[str], known: set[str], stand_ins: dict[str, str], *,
                           default_config: str | None = None, layout_only: bool = False) -> None:
  named = _flags(args)
  unknown = [n for n, _ in named if not n.startswith('config.') and n not in known
             and not (n.startswith('no') and n[2:] in known)]
  assert not unknown, f'{where}: unknown flag(s) {unknown}; known: {sorted(known)}'
  config = next((v for n, v in named if n == 'config'), None) or default_config
  overrides = [f'--{n}={v}' if v is not None else f'--{n}' for n, v in named if n.startswith('config.')]
  if overrides and config is None:
    raise AssertionError(f'{where}: --config.* overrides without --config')
  if config and 'config' in known:
    devices = next((v for n, v in named if n == 'num_devices'), None)  # grpo_jax.plan's simulated mesh
    dry_run_config(where, config, overrides, stand_ins, None if devices is None else int(devices),
                   layout_only=layout_only)


def _source_flags(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      func = getattr(node.func, 'attr', getattr(node.func, 'id', ''))
      if func.startswith('DEFINE_') or func == 'add_argument':
        names.add(str(node.args[0].value).lstrip('-'))
      if func == 'add_argument' and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
        names.add(str(node.args[1].value).lstrip('-'))
  return names


def _check_script(where: str, script: str, args: list[str], env: dict[str, str], modules: dict,
                  stand_ins: dict[str, str]) -> None:
  assert (ROOT / script).is_file(), f'{where}: no script {script}'
  if script in LAUNCHERS:
    known = set(modules['grpo_jax.train'].get('flags', ()))
    check_flags_and_config(where, args, known, stand_ins, default_config=env.get('CONFIG', 'configs/default.py'))
  elif script == 'launch/test.sh':
    missing = [a for a in args if not a.startswith('-') and ('/' in a or a.endswith('.py')) and
               not (ROOT / a.split('::')[0]).exists()]
    assert not missing, f'{where}: no test file {missing}'


def check_command(command: Command, modules: dict[str, dict], stand_ins: dict[str, str]) -> None:
  """Raise AssertionError naming the doc and line when `command` would not parse; see the module docstring."""
  argv, where, env = list(command.argv), command.where, dict(command.env)
  head = argv[0]
  if head in ('python', 'python3') and len(argv) > 2 and argv[1] == '-m':
    module, args = argv[2], argv[3:]
    if not module.startswith('grpo_jax.'):
      raise AssertionError(f'{where}: a module this test does not know how to check: {command}')
    info = modules.get(module) or {'error': 'not listed'}
    assert 'error' not in info, f'{where}: python -m {module} fails to start: {info["error"]}'
    default = EXPERIMENT_CONFIG if module.startswith('grpo_jax.experiments.') else None
    check_flags_and_config(where, args, set(info['flags']), stand_ins, default_config=default,
                           layout_only=module in LAYOUT_ONLY)
  elif head in ('python', 'python3') and len(argv) > 1 and argv[1].endswith('.py'):
    path = ROOT / argv[1]
    assert path.is_file(), f'{where}: no file {argv[1]}'
    check_flags_and_config(where, argv[2:], _source_flags(path), stand_ins)
  elif head in ('bash', 'sh') and len(argv) > 1:
    _check_script(where, argv[1], argv[2:], env, modules, stand_ins)
  elif head == 'sbatch':
    script = next((a for a in argv[1:] if a.endswith('.sh')), None)
    assert script, f'{where}: sbatch without a script: {command}'
    _check_script(where, script, argv[argv.index(script) + 1:], env, modules, stand_ins)
  elif head == 'pip' and argv[1:2] == ['install'] or head in ('cd', 'export'):
    return
  else:
    raise AssertionError(f'{where}: a command this test does not know how to check (teach tests/test_docs.py, or '
                         f'show it outside a bash block): {command}')


# ---------------------------------------------------------------------------------------------------- the tests

def test_the_docs_show_the_main_commands():
  readme = [c.argv for c in ALL_COMMANDS if c.where.startswith('README.md:')]
  assert ('bash', 'launch/local.sh') in readme and ('bash', 'launch/test.sh') in readme
  assert any(_module_of(a) == 'grpo_jax.train' for a in readme)
  assert len(ALL_COMMANDS) >= 30, [str(c) for c in ALL_COMMANDS]  # every doc page's blocks were read


@pytest.mark.parametrize('command', ALL_COMMANDS, ids=lambda c: c.where)
def test_doc_command_parses(command, module_flags, stand_ins):
  check_command(command, module_flags, stand_ins)


@pytest.mark.parametrize('line, why', [
    ('python -m grpo_jax.train --config configs/default.py --workdir w --config.rl.no_such_knob=1', 'does not load'),
    ('python -m grpo_jax.train --config configs/default.py:no_such_preset --workdir w', 'does not load'),
    ('python -m grpo_jax.train --config configs/default.py --workdir w --config.rl.group_size=1', 'refuse'),
    ('python -m grpo_jax.train --config configs/default.py --workdir w --no_such_flag=1', 'unknown flag'),
    ('python -m grpo_jax.train --workdir w --config.rl.lr=1e-5', 'without --config'),
    (f'python -m {BROKEN_MODULE} --x=1', 'fails to start'),
    ('python benchmarks/no_such_file.py', 'no file'),
    ('python benchmarks/long_run.py --grpo_steps 2', 'unknown flag'),
    ('CONFIG=configs/default.py:tiny bash launch/local.sh --config.rl.no_such_knob=1', 'does not load'),
    ('bash launch/no_such_script.sh', 'no script'),
    ('bash launch/test.sh tests/test_no_such_file.py', 'no test file'),
    ('rm -rf runs', 'does not know how to check'),
])
def test_a_broken_command_fails_naming_its_line(tmp_path, module_flags, stand_ins, line, why):
  doc = tmp_path / 'doc.md'
  doc.write_text(f'# a page\n\n```bash\n{line}\n```\n')
  (command,) = doc_commands(doc, 'doc.md')
  with pytest.raises(AssertionError, match=re.escape(why)) as e:
    check_command(command, module_flags, stand_ins)
  assert str(e.value).startswith('doc.md:4: ')


def test_a_good_command_passes_and_console_output_is_skipped(tmp_path, module_flags, stand_ins):
  doc = tmp_path / 'doc.md'
  doc.write_text('```console\n$ python -m grpo_jax.train --config configs/default.py:tiny --workdir w \\\n'
                 '    --config.rl.group_size=4   # a comment\nstage    held-out acc\n```\n')
  (command,) = doc_commands(doc, 'doc.md')
  assert command.where == 'doc.md:2' and command.argv[-1] == '--config.rl.group_size=4'
  check_command(command, module_flags, stand_ins)


# --------------------------------------------------------------------------------------------------- the links

def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(path: Path) -> set[str]:
  text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)
  seen, out = {}, set()
  for heading in re.findall(r'^#{1,6}\s+(.+?)\s*$', text, flags=re.M):
    slug = _slug(heading)
    out.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
    seen[slug] = seen.get(slug, 0) + 1
  return out


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
  text = re.sub(r'```.*?```', '', doc.read_text(), flags=re.S)
  bad = []
  for target in re.findall(r'\[[^\]]*\]\(\s*([^)\s]+)\s*\)', text):
    if re.match(r'^[a-z]+:', target):
      continue  # https:, mailto:
    file, _, anchor = target.partition('#')
    path = (doc.parent / file).resolve() if file else doc
    if not path.exists():
      bad.append(f'{target} (no such file)')
    elif anchor and path.suffix == '.md' and anchor not in _anchors(path):
      bad.append(f'{target} (no such heading in {path.name})')
  assert not bad, f'{doc.relative_to(ROOT)}: broken links: {bad}'
