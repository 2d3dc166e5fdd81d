"""Device meshes, logical axis rules and shardings.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ...).
An ordered list of rules maps each logical name to mesh axes (``data``,
``fsdp``, ``tensor``); the first rule whose logical name matches wins and a mesh
axis is never used twice in one spec. Activations are constrained with the same
rules through :func:`constrain`, which applies while a mesh is active (see
:func:`use_mesh`), on every backend including CPU.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters carry *logical* axis names, which are not mesh axes: flax must not
# try to shard them eagerly at creation. Shardings come from the rules below.
nnx.use_eager_sharding(False)

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
# Order matters: the first matching rule is used.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_heads", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("kv_length", None),
    # Adapter rank over fsdp: a rank-1024 adapter of an [embed, mlp] layer is
    # then split like its base weight instead of replicated on every device.
    ("lora_rank", "fsdp"),
    ("layers", None),
    ("norm", None),
    ("items", None),
)


class ShardingError(ValueError):
  """Raised for impossible mesh shapes or unknown logical names."""


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves a {data, fsdp, tensor} config (one may be -1) against a device count."""
  sizes = {axis: int(getattr(mesh_config, axis)) for axis in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ShardingError(f"mesh.{axis}={size}: each mesh axis must be >= 1 or -1 (fill)")
  if len(fill) > 1:
    raise ShardingError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  # Name the axes the user fixed (not the one that fills), as they are what to change.
  fixed = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s not in (-1, 1)) or "mesh"
  if fill:
    if num_devices % known:
      raise ShardingError(
          f"{fixed}: {num_devices} devices are not divisible by the fixed axes' product "
          f"{known} (mesh.{fill[0]}=-1 takes the rest)")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ShardingError(
        f"{fixed}: the mesh {_fmt(sizes)} needs {known} devices but {num_devices} are available")
  return sizes


def _fmt(sizes) -> str:
  return " x ".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``Mesh`` with axes (data, fsdp, tensor) from ``config.mesh``."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    # Topology-aware placement on TPU/GPU; falls back to a plain reshape.
    device_array = mesh_utils.create_device_mesh(
        shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU and unusual topologies
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(rules_config) -> tuple[tuple[str, Any], ...]:
  """Accepts a list of [name, axis-or-list-or-None] pairs (e.g. from a config)."""
  if rules_config is None:
    return DEFAULT_RULES
  out = []
  for pair in rules_config:
    name, axes = pair
    out.append((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


def logical_to_spec(logical_axes: Iterable[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a ``PartitionSpec`` by the first matching rule.

  A mesh axis already used by an earlier dimension is not reused (the later
  dimension is replicated), and mesh axes of size 1 are dropped when a mesh
  is given, which keeps specs minimal.
  """
  if logical_axes is None:
    return PartitionSpec()
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    for rule_name, target in rules:
      if rule_name == name:
        break
    else:
      raise ShardingError(f"no sharding rule for logical axis {name!r}")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


# --- the active mesh, for activation constraints inside modules -------------

_CONTEXT = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Makes `mesh` and `rules` visible to :func:`constrain` within the block."""
  previous = getattr(_CONTEXT, "value", None)
  _CONTEXT.value = None if mesh is None else (mesh, tuple(rules))
  try:
    yield mesh
  finally:
    _CONTEXT.value = previous


def active_mesh() -> tuple[Mesh, tuple] | None:
  return getattr(_CONTEXT, "value", None)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, by logical axis names.

  Without an active mesh (plain single-device use) this is the identity.
  Dimensions whose size does not divide the mesh axes are left replicated.
  """
  ctx = active_mesh()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = fit_spec(logical_to_spec(logical_axes, rules, mesh), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops the partitioning of any dimension whose size the mesh axes don't divide."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if n and dim % n == 0 else None)
  return PartitionSpec(*out)


# --- NNX state shardings -----------------------------------------------------

def _variable_axes(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    if meta.get(key) is not None:
      return tuple(meta[key])
  return None


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.State:
  """A ``NamedSharding`` per leaf of an NNX state, from its logical axis names."""

  def one(variable):
    value = variable.get_value()
    axes = _variable_axes(variable)
    spec = logical_to_spec(axes, rules, mesh) if axes else PartitionSpec()
    return variable.replace(NamedSharding(mesh, fit_spec(spec, np.shape(value), mesh)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `module` into its sharding, in place."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(module, jax.device_put(state, shardings))
  return module


def put(host_array, mesh: Mesh, logical_axes: Sequence[str | None] | None = None,
        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> jax.Array:
  """Places a host (numpy) array, identical on every process, into a sharding."""
  spec = logical_to_spec(logical_axes, rules, mesh) if logical_axes else PartitionSpec()
  sharding = NamedSharding(mesh, fit_spec(spec, np.shape(host_array), mesh))
  return jax.make_array_from_callback(np.shape(host_array), sharding,
                                      lambda idx: np.asarray(host_array)[idx])


def batch_sharding(mesh: Mesh, ndim: int,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def data_parallel_size(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
  spec = logical_to_spec(("batch",), rules, mesh)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict[str, jax.Array]:
  """Global arrays sharded over `batch` from the rows of a whole global batch.

  The data-feeding convention of a multi-process run: every process derives the
  same global rows (from the same seeds and data), and each places only the rows
  its own devices hold (the callback is asked for addressable shards only), so a
  global batch never crosses the host boundary and a run gives the same batch
  whatever the number of processes.
  """
  out = {}
  for k, v in batch.items():
    host = np.asarray(v)
    out[k] = jax.make_array_from_callback(host.shape, batch_sharding(mesh, host.ndim, rules),
                                          lambda idx, host=host: host[idx])
  return out
