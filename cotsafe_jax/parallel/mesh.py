"""Device mesh and the logical-axis rules table: the only place mesh axis names appear.

Model code names logical axes (batch, embed, heads, ...); these rules map them to mesh axes. Weights are
stored split over fsdp (their `embed` dim) and tensor; activations are split over the batch (data x fsdp)
and, inside attention and the MLP, over tensor. Inside a layer each weight is all-gathered over fsdp
(`gather_weight`: FSDP proper), so no matmul ever runs on a d_model-split weight against whole-batch
activations.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cotsafe_jax.errors import CotsafeError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("classes", None),
    # activations: d_model stays whole (the batch already uses fsdp); heads / mlp follow the weights' tensor split
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# mesh axes a weight is all-gathered over inside a layer (FSDP): what stays is the tensor split
_GATHERED_AXES = ("data", "fsdp")

_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all). One of the sizes may be -1 (the rest).

  Default: every device on fsdp (params, gradients and optimizer state split over all devices, the batch too).
  data replicates the params (pure data parallel), tensor splits heads, mlp and vocab within a layer.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sum(1 for s in sizes if s == -1) > 1:
    raise CotsafeError(f"make_mesh: at most one of data={data}, fsdp={fsdp}, tensor={tensor} may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise CotsafeError(f"make_mesh: data={data} x fsdp={fsdp} x tensor={tensor} does not divide "
                       f"the {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise CotsafeError(f"make_mesh: data x fsdp x tensor = {math.prod(sizes)} but there are "
                       f"{len(devices)} devices (use -1 for one axis to take the rest)")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def single_device_mesh() -> Mesh:
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _axis_size(mesh: Mesh, mesh_axes: Any) -> int:
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(mesh.shape[a] for a in mesh_axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, *, drop: Sequence[str] = ()) -> P:
  """PartitionSpec for logical axes; a dim the mesh axes do not divide is left replicated. Mesh axes in
  `drop` are left out (e.g. ("data", "fsdp"): the all-gathered form of a weight)."""
  spec = []
  used: set[str] = set()
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in _RULES:
      raise CotsafeError(f"unknown logical axis {name!r} (known: {', '.join(_RULES)})")
    mesh_axes = _RULES[name]
    if mesh_axes is not None:
      as_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      as_tuple = tuple(a for a in as_tuple if a not in drop)
      mesh_axes = (None if not as_tuple else as_tuple[0] if len(as_tuple) == 1 else as_tuple)
    if mesh_axes is not None:
      if any(a in used for a in as_tuple):
        mesh_axes = None  # a mesh axis shards at most one dim of an array
      elif mesh is not None and shape is not None and shape[i] % _axis_size(mesh, as_tuple):
        mesh_axes = None
      else:
        used.update(as_tuple)
    spec.append(mesh_axes)
  return P(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                     shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def gathered_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                      shape: Sequence[int] | None = None) -> NamedSharding:
  """A weight's form after FSDP's gather (`gather_weight`): split over tensor only, whole on data x fsdp. The
  sampler keeps its weights so for a whole rollout (no per-step gather)."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, drop=_GATHERED_AXES))


def is_axes(x: Any) -> bool:
  """A tuple of logical axis names (a leaf of a logical-axes tree)."""
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh: Mesh, logical_tree: Any, shape_tree: Any, *, gathered: bool = False) -> Any:
  """NamedShardings for a pytree given matching trees of logical-axis tuples and shapes (`gathered`: each leaf's
  `gathered_sharding`)."""
  make = gathered_sharding if gathered else logical_sharding
  return jax.tree.map(lambda axes, s: make(mesh, axes, s.shape), logical_tree, shape_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
  """Shard the leading (batch) dim over data x fsdp; the rest replicated."""
  return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1), shape)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _context_mesh():
  """The mesh set by `jax.set_mesh` (what jitted steps trace under), if it has the project's axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def _target_device(mesh: Any) -> Any:
  """One device of the mesh a program is compiled for (a Mesh's, or an AbstractMesh's abstract device), or None."""
  if mesh is None:
    return None
  device = getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return device
  return mesh.devices.flat[0] if hasattr(mesh, "devices") else None


def target_platform(mesh: Any = None) -> str:
  """The platform a program is compiled for: the mesh's devices (a target compiled ahead of time on a CPU host
  is a TPU or GPU mesh), else the default backend."""
  device = _target_device(mesh)
  return device.platform if device is not None else jax.default_backend()


def target_device_kind(mesh: Any = None) -> str:
  """The device kind a program is compiled for ("TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu"), found like
  target_platform."""
  return (_target_device(mesh) or jax.devices()[0]).device_kind


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding of its logical axes under the context mesh; a no-op without one."""
  mesh = _context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def gather_weight(w: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """A weight all-gathered over data x fsdp (its tensor split kept) under the context mesh: FSDP's per-layer
  gather. Its transpose reduce-scatters the gradient back onto the stored shards."""
  mesh = _context_mesh()
  if mesh is None:
    return w
  return jax.lax.with_sharding_constraint(w, logical_to_spec(logical_axes, w.shape, mesh, drop=_GATHERED_AXES))


class OnMesh:
  """A jitted function called, traced and lowered under `jax.set_mesh(mesh)`, so the model's sharding
  constraints and the fused op's shard_map see the mesh; `.lower` is what the `plan` job compiles."""

  def __init__(self, fn: Any, mesh: Mesh | None):
    self.fn, self.mesh = fn, mesh

  def _ctx(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def __call__(self, *args, **kwargs):
    with self._ctx():
      return self.fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self._ctx():
      return self.fn.lower(*args, **kwargs)
