"""The package's layering, checked statically with `ast` (nothing is imported, so it runs in well under a second).

Every .py file under grpo_jax/ is parsed; every Import and ImportFrom is checked, including those nested in functions,
classes, `if TYPE_CHECKING:` blocks and try/except (a deferred import is still a dependency), with relative imports
resolved against the file's package. The layer of a module is its first sub-package under grpo_jax; the top-level
grpo_jax/{train,eval,generate,plan,reward_model,report}.py and grpo_jax/experiments/{paper_table,group_size,
default_seeds,iterative_rl,prefix_credit}.py are the CLI layer; grpo_jax/__init__.py is the root.

Rules:
1. Layers (LAYERS below): core imports only core; models imports core, parallel; data and rewards import core, models,
   parallel and each other; rollout imports core, models, data, rewards, parallel; parallel imports only parallel;
   pipeline imports any library layer; experiments (whole training runs as processes, above pipeline) and the CLIs
   import any library layer and experiments. grpo_jax/__init__.py imports nothing.
2. Nothing imports a CLI module (grpo_jax.train, .eval, .generate, .plan): not the package (CLIs included), not
   benchmarks/. Tests may import them (to call run/main); library code may not, because a CLI's import pulls in
   absl flags and the whole stack, and a CLI is an entry point, not an API.
3. core/ is pure array math: besides the standard library it imports only jax and numpy (no flax, optax, ...).
4. Only pipeline/, experiments/ and the CLIs read the run config. Every other module takes the values it needs as
   explicit arguments, so it neither imports ml_collections nor has a function parameter named `cfg`, `config` or
   `opt_cfg` (the names the codebase gives the run config and its sub-configs) that is untyped or typed ConfigDict.
   A typed value object (`model_cfg: ModelConfig`, `config: LossConfig`) is an explicit argument, not the run config.

The checker is plain functions (`layer_of`, `imports_of`, `violations`, ...) so the meta-tests at the bottom can run it
on a synthetic tree and prove it reports what it should: a checker that finds nothing would otherwise pass silently.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = 'grpo_jax'
CLI_MODULES = frozenset({'train', 'eval', 'generate', 'plan', 'reward_model', 'report', 'experiments.paper_table',
                         'experiments.group_size', 'experiments.default_seeds', 'experiments.iterative_rl',
                         'experiments.prefix_credit'})
CLI = 'cli'
PKG_ROOT = 'root'  # grpo_jax/__init__.py, or a name imported from it (e.g. __version__)

_LIBRARY = frozenset({'core', 'models', 'data', 'rewards', 'rollout', 'parallel', 'pipeline'})
# Layer -> the grpo_jax layers it may import. Importing the root package is always allowed (its __init__ imports
# nothing, so it adds no dependency); importing a CLI never is (rule 2), so CLI appears in no set.
LAYERS: dict[str, frozenset[str]] = {
  'core': frozenset({'core'}),
  'models': frozenset({'models', 'core', 'parallel'}),
  'data': frozenset({'data', 'rewards', 'core', 'models', 'parallel'}),
  'rewards': frozenset({'rewards', 'data', 'core', 'models', 'parallel'}),
  'rollout': frozenset({'rollout', 'core', 'models', 'data', 'rewards', 'parallel'}),
  'parallel': frozenset({'parallel'}),
  'pipeline': _LIBRARY,
  'experiments': _LIBRARY | {'experiments'},
  CLI: _LIBRARY | {'experiments'},
  PKG_ROOT: frozenset(),
}
CORE_THIRD_PARTY = frozenset({'jax', 'numpy'})
CONFIG_READERS = frozenset({'pipeline', 'experiments', CLI})
CONFIG_PARAMS = frozenset({'cfg', 'config', 'opt_cfg'})
CONFIG_PACKAGE = 'ml_collections'


class Import(NamedTuple):
  line: int
  module: str  # absolute, resolved; for `from pkg import name`, pkg.name when that is a module, else pkg
  statement: str  # the source statement, for the message


def module_name(path: Path, root: Path) -> str:
  parts = list(path.relative_to(root).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def layer_of(module: str) -> str | None:
  """The layer of a grpo_jax module: its first sub-package, CLI for CLI_MODULES, None if outside every layer."""
  parts = module.split('.')
  if parts[0] != PKG:
    raise ValueError(f'{module} is not a {PKG} module')
  if len(parts) == 1:
    return PKG_ROOT
  if parts[1] in CLI_MODULES or '.'.join(parts[1:3]) in CLI_MODULES:
    return CLI
  return parts[1] if parts[1] in LAYERS and parts[1] not in (CLI, PKG_ROOT) else None


def python_files(directory: Path) -> list[Path]:
  # Hidden folders are not the project's code: benchmarks/.venv-trl holds TRL's installed packages.
  hidden = lambda p: any(part.startswith('.') for part in p.relative_to(directory).parts)  # noqa: E731
  return sorted(p for p in directory.rglob('*.py') if '__pycache__' not in p.parts and not hidden(p))


def package_modules(root: Path) -> frozenset[str]:
  return frozenset(module_name(p, root) for p in python_files(root / PKG))


def _resolve_relative(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
  # A package's __init__ is its own package; a plain module's package is its parent. Level 1 is that package and each
  # further level one parent up; None if that climbs above the top-level package (an import error at runtime).
  package = module.split('.') if is_package else module.split('.')[:-1]
  if node.level - 1 >= len(package):
    return None
  base = package[:len(package) - (node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path, known: frozenset[str]) -> list[Import]:
  """Every import in the file (at any depth), one entry per imported module, relative imports made absolute.

  `known` is the set of grpo_jax module names, used to tell `from grpo_jax.models import hf` (the module
  grpo_jax.models.hf) from `from grpo_jax import __version__` (an attribute of grpo_jax)."""
  module = module_name(path, root)
  source = path.read_text(encoding='utf-8')
  out = []
  for node in ast.walk(ast.parse(source, filename=str(path))):
    if isinstance(node, ast.Import):
      out += [Import(node.lineno, alias.name, ast.unparse(node)) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module if node.level == 0 else _resolve_relative(node, module, path.name == '__init__.py')
      if base is None:
        out.append(Import(node.lineno, '.' * node.level + (node.module or ''), ast.unparse(node)))
        continue
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        out.append(Import(node.lineno, sub if sub in known else base, ast.unparse(node)))
  return sorted(out)


def _where(path: Path, root: Path, line: int) -> str:
  return f'{path.relative_to(root).as_posix()}:{line}'


def _is_package_import(target: str) -> bool:
  return target == PKG or target.startswith(PKG + '.')


def layer_violations(root: Path) -> list[str]:
  """Rule 1: every grpo_jax import respects LAYERS; grpo_jax/__init__.py imports nothing."""
  known = package_modules(root)
  out = []
  for path in python_files(root / PKG):
    module = module_name(path, root)
    layer = layer_of(module)
    if layer is None:
      out.append(f'{_where(path, root, 1)}: {module} is in no layer (add it to one of {sorted(_LIBRARY)})')
      continue
    for imp in imports_of(path, root, known):
      where = _where(path, root, imp.line)
      if imp.module.startswith('.'):
        out.append(f'{where}: relative import beyond the top-level package: `{imp.statement}`')
      elif layer == PKG_ROOT and imp.module != '__future__':  # a __future__ import is a compiler directive
        out.append(f'{where}: {PKG}/__init__.py must import nothing, imports {imp.module}: `{imp.statement}`')
      elif _is_package_import(imp.module):
        target = layer_of(imp.module)
        if target == PKG_ROOT or target in LAYERS[layer]:
          continue
        allowed = ', '.join(sorted(LAYERS[layer])) or 'nothing'
        shown = 'a CLI' if target == CLI else (target or 'no layer')
        out.append(f'{where}: {layer} imports {imp.module} ({shown}); {layer} may import only {allowed}: '
                   f'`{imp.statement}`')
  return out


def cli_import_violations(root: Path) -> list[str]:
  """Rule 2: neither grpo_jax/ (CLIs included) nor benchmarks/ imports a CLI module."""
  known = package_modules(root)
  out = []
  for directory in (root / PKG, root / 'benchmarks'):
    for path in python_files(directory):
      for imp in imports_of(path, root, known):
        if _is_package_import(imp.module) and layer_of(imp.module) == CLI:
          out.append(f'{_where(path, root, imp.line)}: imports the CLI module {imp.module}: `{imp.statement}`')
  return out


def core_third_party_violations(root: Path) -> list[str]:
  """Rule 3: core/ imports nothing outside the standard library, grpo_jax, jax and numpy."""
  known = package_modules(root)
  out = []
  for path in python_files(root / PKG / 'core'):
    for imp in imports_of(path, root, known):
      top = imp.module.split('.')[0]
      if top and top not in sys.stdlib_module_names and top not in {PKG, '__future__'} | CORE_THIRD_PARTY:
        out.append(f'{_where(path, root, imp.line)}: core imports the third-party package {top} '
                   f'(only {", ".join(sorted(CORE_THIRD_PARTY))} allowed): `{imp.statement}`')
  return out


def _config_params(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
      a = node.args
      for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
        untyped_or_config_dict = arg is not None and (arg.annotation is None or
                                                      'ConfigDict' in ast.unparse(arg.annotation))
        if untyped_or_config_dict and arg.arg in CONFIG_PARAMS:
          name = node.name if not isinstance(node, ast.Lambda) else '<lambda>'
          annotation = f': {ast.unparse(arg.annotation)}' if arg.annotation else ''
          yield arg.lineno, name, f'{arg.arg}{annotation}'


def config_violations(root: Path) -> list[str]:
  """Rule 4: outside pipeline/ and the CLIs, no ml_collections import and no parameter named cfg/config/opt_cfg."""
  known = package_modules(root)
  out = []
  for path in python_files(root / PKG):
    if layer_of(module_name(path, root)) in CONFIG_READERS:
      continue
    for imp in imports_of(path, root, known):
      if imp.module.split('.')[0] == CONFIG_PACKAGE:
        out.append(f'{_where(path, root, imp.line)}: imports {CONFIG_PACKAGE} outside pipeline/ and the CLIs: '
                   f'`{imp.statement}`')
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
    for line, function, param in sorted(_config_params(tree)):  # ast.walk is breadth-first, not in line order
      out.append(f'{_where(path, root, line)}: {function}() takes the parameter `{param}` outside pipeline/ and the '
                 f'CLIs (pass the values it needs instead)')
  return out


def violations(root: Path) -> list[str]:
  """Every rule's violations under `root` (a directory holding grpo_jax/ and, optionally, benchmarks/)."""
  return (layer_violations(root) + cli_import_violations(root) + core_third_party_violations(root)
          + config_violations(root))


def _fail_on(found: list[str], rule: str) -> None:
  assert not found, f'{rule}: {len(found)} violation(s)\n' + '\n'.join(found)


def test_walk_sees_the_package():
  # A wrong root or a broken walk would make every rule pass vacuously.
  modules = package_modules(ROOT)
  assert {'grpo_jax', 'grpo_jax.core.losses', 'grpo_jax.pipeline', 'grpo_jax.train'} <= modules
  assert len(modules) >= 30
  assert python_files(ROOT / 'benchmarks')


def test_layers():
  _fail_on(layer_violations(ROOT), 'layer table')


def test_nothing_imports_a_cli():
  _fail_on(cli_import_violations(ROOT), 'CLI imports')


def test_core_is_jax_and_numpy_only():
  _fail_on(core_third_party_violations(ROOT), 'core third-party imports')


def test_only_pipeline_and_clis_read_the_config():
  _fail_on(config_violations(ROOT), 'config readers')


# The checker checked: each rule on a synthetic tree, one clean file and one offending file per rule.


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
  for rel, source in {'grpo_jax/__init__.py': '', 'grpo_jax/core/__init__.py': '',
                      'grpo_jax/pipeline/__init__.py': '', **files}.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding='utf-8')
  return tmp_path


@pytest.mark.parametrize('layer,module', [('core', 'grpo_jax.core.kl'), ('models', 'grpo_jax.models'),
                                          (CLI, 'grpo_jax.plan'), (CLI, 'grpo_jax.train.main'),
                                          (CLI, 'grpo_jax.experiments.paper_table'),
                                          ('experiments', 'grpo_jax.experiments.runs'),
                                          (PKG_ROOT, 'grpo_jax'), (None, 'grpo_jax.utils')])
def test_layer_of(layer, module):
  assert layer_of(module) == layer


def test_clean_tree_has_no_violations(tmp_path):
  root = _tree(tmp_path, {
    'grpo_jax/core/a.py': 'import math\nimport jax.numpy as jnp\nfrom . import b\nfrom grpo_jax import __version__\n',
    'grpo_jax/core/b.py': 'def f(x, model_cfg):\n  import numpy as np\n  return np.asarray(x)\n',
    'grpo_jax/pipeline/loop.py': 'import ml_collections\nfrom grpo_jax.core import a\n\ndef run(cfg):\n  pass\n',
    'grpo_jax/train.py': 'from grpo_jax.pipeline.loop import run\n',
    'benchmarks/bench.py': 'from grpo_jax.pipeline import loop\n',
  })
  assert violations(root) == []


def test_catches_a_core_module_importing_pipeline(tmp_path):
  # Absolute, relative, and nested in a function: all three must be found, with the file, line and import named.
  root = _tree(tmp_path, {
    'grpo_jax/pipeline/loop.py': '',
    'grpo_jax/core/bad.py': ('from grpo_jax.pipeline.loop import run\n'
                             'def f():\n'
                             '  from ..pipeline import loop\n'
                             '  return loop\n'),
  })
  found = layer_violations(root)
  assert len(found) == 2, found
  assert found[0].startswith('grpo_jax/core/bad.py:1: core imports grpo_jax.pipeline.loop (pipeline)')
  assert '`from grpo_jax.pipeline.loop import run`' in found[0]
  assert found[1].startswith('grpo_jax/core/bad.py:3: core imports grpo_jax.pipeline.loop (pipeline)')
  assert '`from ..pipeline import loop`' in found[1]
  assert found == [v for v in violations(root) if 'core imports grpo_jax' in v]


def test_catches_root_imports_and_unlayered_modules(tmp_path):
  root = _tree(tmp_path, {'grpo_jax/__init__.py': 'from grpo_jax.core import a\n', 'grpo_jax/utils.py': '',
                          'grpo_jax/core/a.py': 'import grpo_jax.utils\nfrom .... import x\n'})
  found = layer_violations(root)
  assert any(v.startswith('grpo_jax/__init__.py:1: grpo_jax/__init__.py must import nothing') for v in found), found
  assert any(v.startswith('grpo_jax/utils.py:1: grpo_jax.utils is in no layer') for v in found), found
  assert any(v.startswith('grpo_jax/core/a.py:1: core imports grpo_jax.utils (no layer)') for v in found), found
  assert any(v.startswith('grpo_jax/core/a.py:2: relative import beyond') for v in found), found


def test_catches_cli_imports(tmp_path):
  root = _tree(tmp_path, {'grpo_jax/train.py': '', 'grpo_jax/plan.py': 'from grpo_jax import train\n',
                          'benchmarks/bench.py': 'def f():\n  import grpo_jax.eval\n'})
  assert cli_import_violations(root) == [
    'grpo_jax/plan.py:1: imports the CLI module grpo_jax.train: `from grpo_jax import train`',
    'benchmarks/bench.py:2: imports the CLI module grpo_jax.eval: `import grpo_jax.eval`',
  ]
  assert any('plan.py:1: cli imports grpo_jax.train (a CLI)' in v for v in layer_violations(root))


def test_catches_third_party_in_core(tmp_path):
  root = _tree(tmp_path, {'grpo_jax/core/a.py': 'import os\nimport jax\nfrom flax import nnx\n'
                                                'def f():\n  import optax\n'})
  found = core_third_party_violations(root)
  assert [v.split(':')[1] for v in found] == ['3', '5'], found
  assert 'package flax' in found[0] and 'package optax' in found[1]


def test_catches_config_outside_pipeline(tmp_path):
  root = _tree(tmp_path, {'grpo_jax/models/__init__.py': '',
                          'grpo_jax/models/m.py': ('from ml_collections import ConfigDict\n'
                                                   'class M:\n'
                                                   '  def __init__(self, cfg: ConfigDict): pass\n'
                                                   'def g(*, opt_cfg=None): pass\n'
                                                   'h = lambda config: config\n')})
  found = config_violations(root)
  assert [v.split(':')[1] for v in found] == ['1', '3', '4', '5'], found
  assert '`cfg: ConfigDict`' in found[1] and '__init__()' in found[1]


if __name__ == '__main__':  # the whole report without pytest: python tests/test_architecture.py [ROOT]
  found = violations(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
  print('\n'.join(found) or 'no violations')
  sys.exit(1 if found else 0)
