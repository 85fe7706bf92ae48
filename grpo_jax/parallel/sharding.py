"""Mesh and sharding rules, in one place.

Model code names logical axes only: `logical_axes=('embed', 'mlp')` on each Param, and
`constrain(x, ('batch', 'length', 'act_embed'))` on activations. `LOGICAL_RULES` is the one table that maps
them to mesh axes; `config.sharding.rules` replaces it (same format: (logical axis, mesh axes) pairs) and
`config.mesh` sets the mesh shape. Every function here takes the rules as an argument (default: the table).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
MeshAxes = str | tuple[str, ...] | None

# The table: logical axis -> mesh axis, a tuple of mesh axes, or None (replicated along it).
LOGICAL_RULES: dict[str, MeshAxes] = {
    # Parameter (and optimizer state) dims.
    'vocab': 'tensor',
    'embed': 'fsdp',  # FSDP / ZeRO-3: weights split over fsdp, all-gathered where used
    'mlp': 'tensor',  # Megatron tensor parallelism: column-parallel gate / up, row-parallel down
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'norm': None,
    'lora_rank': None,  # r of LoRA adapters (models/lora.py): small, so whole; their other dims follow the weight's
    # Activation and KV-cache dims; their head / mlp / vocab dims reuse the names above, so they follow the weights.
    'batch': ('data', 'fsdp'),  # examples split over every data-parallel axis (fsdp is data parallel for activations)
    'length': None,  # sequence
    'act_embed': None,  # the residual stream: whole on each tensor shard (row-parallel outputs are all-reduced)
}
BATCH_AXES: tuple[str, ...] = LOGICAL_RULES['batch']  # type: ignore[assignment]


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def parse_rules(pairs: Iterable, *, where: str = 'sharding rules', known: Iterable[str] | None = None,
                complete: bool = True) -> dict[str, MeshAxes]:
  """((logical axis, mesh axes), ...) -> a checked dict. JSON lists are accepted for tuples.

  `known`: the allowed logical names (default: LOGICAL_RULES'); `complete`: every known name needs a rule.
  """
  known = tuple(LOGICAL_RULES if known is None else known)
  table: dict[str, MeshAxes] = {}
  for pair in pairs:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f'{where}: each rule is a (logical axis, mesh axes) pair, got {pair!r}')
    name, axes = pair
    if name in table:
      raise ValueError(f'{where}: logical axis {name!r} has two rules')
    if name not in known:
      raise ValueError(f'{where}: unknown logical axis {name!r}; known: {list(known)}')
    if axes is not None and not isinstance(axes, str):
      axes = tuple(axes)
    names = _axes_tuple(axes)
    bad = [a for a in names if a not in MESH_AXES]
    if bad or len(set(names)) != len(names):
      raise ValueError(f'{where}: {name!r} -> {axes!r} names an unknown or repeated mesh axis; mesh axes: '
                       f'{list(MESH_AXES)}')
    table[name] = axes
  missing = [n for n in known if n not in table]
  if complete and missing:
    raise ValueError(f'{where}: no rule for logical axes {missing} (every one of {list(known)} needs one)')
  return table


@dataclasses.dataclass(frozen=True)
class Rules:
  """Logical axis -> mesh axes, and what to do when a mesh axis does not divide a parameter dim."""
  table: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: dict(LOGICAL_RULES))
  # False: such a parameter is an error naming it. True: replicate that dim (tiny models on big meshes).
  allow_replication_fallback: bool = False

  def override(self, pairs: Iterable, where: str = 'sharding rule overrides') -> Rules:
    """These rules with some logical axes remapped (e.g. the sampler's (('embed', None),))."""
    changes = parse_rules(pairs, where=where, known=self.table, complete=False)
    return dataclasses.replace(self, table={**self.table, **changes})

  def mesh_axes(self, name: str) -> tuple[str, ...]:
    if name not in self.table:
      raise ValueError(f'logical axis {name!r} has no sharding rule; rules exist for {sorted(self.table)}')
    return _axes_tuple(self.table[name])

  def spec(self, axes: tuple[str | None, ...] | None) -> P:
    """Logical names -> PartitionSpec (no shape check). A mesh axis may appear once per array."""
    if axes is None:
      return P()
    out = [self.mesh_axes(a) if a else () for a in axes]
    used = [m for names in out for m in names]
    if len(set(used)) != len(used):
      raise ValueError(f'logical axes {axes} map a mesh axis twice: {out}; fix the sharding rules')
    return P(*(None if not n else n[0] if len(n) == 1 else n for n in out))


DEFAULT_RULES = Rules()


def layout_rules(rules: Iterable, sampler_overrides: Iterable = (), *, allow_replication_fallback: bool = False
                 ) -> tuple[Rules, Rules]:
  """(training rules, sampler rules): the table `rules` ((logical axis, mesh axes), ...), and the same with
  `sampler_overrides` for the samplers' param layout. Malformed pairs are errors naming config.sharding.*."""
  training = Rules(parse_rules(rules, where='config.sharding.rules'), bool(allow_replication_fallback))
  return training, training.override(sampler_overrides, where='config.sharding.sampler_rules')


def mesh_shape(shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """Resolve {'data': d, 'fsdp': f, 'tensor': t} (one entry may be -1: the remaining devices); check it fits."""
  sizes = {a: int(shape[a]) for a in MESH_AXES}
  if sum(s == -1 for s in sizes.values()) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'mesh sizes must be positive with at most one -1, got {sizes}')
  known = math.prod(s for s in sizes.values() if s != -1)
  resolved = {a: (num_devices // known if s == -1 else s) for a, s in sizes.items()}
  if math.prod(resolved.values()) != num_devices:
    raise ValueError(f'config.mesh {sizes} needs {math.prod(resolved.values())} devices; {num_devices} available')
  return resolved


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  sizes = tuple(mesh_shape(shape, devices.size).values())
  return Mesh(devices.reshape(sizes), MESH_AXES)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _mesh_size(mesh, names: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: P, shape: tuple[int, ...], mesh, *, fill=None) -> P:
  """Put `fill` where a dim's mesh axes do not divide it (all or nothing per dim); pads spec to the rank."""
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    size = _mesh_size(mesh, _axes_tuple(axis))
    fitted.append(axis if dim % size == 0 else fill)
  return P(*fitted)


def param_spec(path: str, shape: tuple[int, ...], logical_axes, mesh, rules: Rules = DEFAULT_RULES) -> P:
  """The spec of one parameter. A mesh axis that does not divide its dim is an error naming it, unless the rules
  allow replicating that dim: a silently replicated weight costs memory on every device and goes unnoticed."""
  spec = rules.spec(logical_axes)
  fitted = fit_spec(spec, shape, mesh)
  if not rules.allow_replication_fallback:
    for i, (dim, axis) in enumerate(zip(shape, spec, strict=False)):
      if fitted[i] != axis:
        raise ValueError(
            f'parameter {path} {tuple(shape)}: dim {i} ({logical_axes[i]!r}) = {dim} is not divisible by mesh axis '
            f'{axis!r} of size {_mesh_size(mesh, _axes_tuple(axis))}; change config.mesh or config.sharding.rules, '
            'or set config.sharding.allow_replication_fallback=True to replicate that dim')
  return fitted


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def tree_specs(tree, mesh, rules: Rules = DEFAULT_RULES):
  """PartitionSpecs for a tree holding nnx Params (params, optimizer state); other leaves replicate. `mesh`
  may be abstract (only its axis sizes are read), so layouts can be checked without devices."""
  def one(path, x):
    if _is_variable(x):
      return x.replace(param_spec(_path_str(path), x.shape, getattr(x, 'logical_axes', None), mesh, rules))
    return P()
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def tree_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for a tree holding nnx Params (params, optimizer state); other leaves replicate."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def reshard(tree, shardings):
  """Move a tree to other shardings (e.g. the sampler's layout); leaves already there are returned as-is."""
  return jax.device_put(tree, shardings)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Leading (example) axis over the 'batch' mesh axes, the rest replicated (any rank >= 1)."""
  return NamedSharding(mesh, P(rules.mesh_axes('batch') or None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def split_micro_batches(tree, k: int, group_size: int = 1):
  """Leaves [B, ...] -> [k, B / k, ...]. Micro-batch j holds rows j, j + k, j + 2k, ...: as batch_sharding
  gives each device a contiguous block of rows, every micro-batch keeps an equal share of every device's rows.
  group_size = G > 1: the same over whole groups of G contiguous rows (micro-batch j holds groups j, j + k, ...,
  each group's rows contiguous and in order), so a group's rows stay together (B divisible by k * G)."""
  def split(x):
    x = x.reshape(x.shape[0] // (k * group_size), k, group_size, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(k, -1, *x.shape[3:])
  return jax.tree.map(split, tree)


def merge_micro_batches(tree, group_size: int = 1):
  """The inverse of split_micro_batches: leaves [k, B / k, ...] -> [B, ...], rows in their original order."""
  def merge(x):
    k = x.shape[0]
    x = x.reshape(k, -1, group_size, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(-1, *x.shape[3:])
  return jax.tree.map(merge, tree)


# ------------------------------------------------------------------------------------------ activations

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar('activation_mesh',
                                                                                     default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
  """Within this context (entered inside the function being jitted, so it is part of the trace), `constrain`
  pins activations to `mesh` by `rules`. mesh None: constraints off."""
  token = _ACTIVE.set(None if mesh is None else (mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """with_sharding_constraint by logical names. A no-op without a mesh (neither `activation_mesh` nor
  `jax.set_mesh` with our axis names) and on one device, so model code runs anywhere. A dim its mesh
  axes do not divide (an odd eval batch) is left to the compiler (UNCONSTRAINED) rather than failing."""
  active = _ACTIVE.get()
  if active is None:
    context = jax.sharding.get_abstract_mesh()
    if context.empty or not set(MESH_AXES) <= set(context.axis_names):
      return x
    active = (context, DEFAULT_RULES)
  mesh, rules = active
  if mesh.size == 1:
    return x
  spec = fit_spec(rules.spec(logical_axes), x.shape, mesh, fill=P.UNCONSTRAINED)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def jit_sharded(fn: Callable, mesh: Mesh | None, rules: Rules = DEFAULT_RULES, in_shardings: tuple | None = None, *,
                out_shardings=None, donate_argnums: int | tuple[int, ...] = (), where: str = 'jit_sharded'):
  """jax.jit(fn) with its body traced under activation_mesh(mesh, rules), so the activations the model
  `constrain`s follow the rules; the one wrapper the sampler, the reference forward, the reward model's scorer
  and the train step share.

  in_shardings: one entry per argument: a sharding (tree), 'batch' (leading axis over the batch mesh axes) or
  'replicated'; None leaves the layout to jit. Shardings need the mesh they live on: without one it is an error
  naming `where`. out_shardings: None, 'replicated' or shardings.
  """
  def body(*args):
    with activation_mesh(mesh, rules):
      return fn(*args)

  if in_shardings is None:
    return _jit(body, donate_argnums=donate_argnums)
  if mesh is None:
    raise ValueError(f'{where}: param_shardings needs the mesh they live on (mesh=...)')
  named = {'batch': batch_sharding(mesh, rules), 'replicated': replicated(mesh)}
  resolve = lambda s: named[s] if isinstance(s, str) else s  # noqa: E731
  out = None if out_shardings is None else jax.tree.map(resolve, out_shardings)
  return _jit(body, in_shardings=jax.tree.map(resolve, tuple(in_shardings)), out_shardings=out,
              donate_argnums=donate_argnums)


# XLA:CPU's cse_barrier_expander drops the optimization barriers jax.checkpoint puts around the recomputation, and
# CSE then merges the recomputed forward into the saved one: remat (model.remat, chunked logprobs) would keep every
# activation it was asked to drop. GPU and TPU keep the barriers.
KEEP_REMAT = {'xla_disable_hlo_passes': 'cse_barrier_expander'}


def compiler_options() -> dict[str, str] | None:
  """XLA options for the jitted steps on this backend: on CPU, keep jax.checkpoint's barriers (KEEP_REMAT)."""
  return dict(KEEP_REMAT) if jax.default_backend() == 'cpu' else None


class _TopLevelOptions:
  """jax.jit(fn) compiled with compiler_options() when called on arrays; called inside another jit (on tracers) it is
  the plain jit, as jax takes compiler_options on top-level jits only. Other attributes are the top-level jit's."""

  def __init__(self, fn: Callable, options: dict[str, str], **jit_kwargs):
    self._top = jax.jit(fn, compiler_options=options, **jit_kwargs)
    self._nested = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
      return self._nested(*args)
    return self._top(*args)

  def __getattr__(self, name):
    return getattr(self._top, name)


def _jit(fn: Callable, **jit_kwargs):
  options = compiler_options()
  return jax.jit(fn, **jit_kwargs) if options is None else _TopLevelOptions(fn, options, **jit_kwargs)
