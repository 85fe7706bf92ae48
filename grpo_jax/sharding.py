"""Mesh and sharding rules, in one place.

Model code names logical axes only (`logical_axes=('embed', 'mlp')` on each Param). `LOGICAL_RULES` maps
them to mesh axes; the config sets the mesh shape. Batches shard their leading axis over ('data', 'fsdp').
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or None: replicated along it).
LOGICAL_RULES: dict[str, str | None] = {
    'batch': None,  # batches use BATCH_AXES below
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'norm': None,
}
BATCH_AXES = ('data', 'fsdp')


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


def logical_to_spec(axes: tuple[str | None, ...] | None) -> P:
  if axes is None:
    return P()
  unknown = [a for a in axes if a is not None and a not in LOGICAL_RULES]
  if unknown:
    raise ValueError(f'logical axes {unknown} have no rule in sharding.LOGICAL_RULES')
  return P(*(LOGICAL_RULES[a] if a else None for a in axes))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drop mesh axes that do not divide a dimension (tiny models on big meshes replicate instead of failing)."""
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = math.prod(mesh.shape[n] for n in names)
    fitted.append(axis if size and dim % size == 0 else None)
  return P(*fitted)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for any tree holding nnx Params (params, optimizer state); other leaves replicate."""
  def one(x):
    if _is_variable(x):
      spec = fit_spec(logical_to_spec(getattr(x, 'logical_axes', None)), x.shape, mesh)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis over the data-parallel axes, the rest replicated (any rank >= 1)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
