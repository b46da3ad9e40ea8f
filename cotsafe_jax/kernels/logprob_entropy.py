"""Fused log-prob + entropy of sampled tokens, never materialising the [tokens x vocab] logits.

Public op, input checks, dispatch by backend, the custom VJP and the vocabulary-parallel combine.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.kernels import _math, pallas_gpu, pallas_tpu, reference
from cotsafe_jax.parallel.mesh import MESH_AXES, logical_to_spec, target_device_kind, target_platform

IMPLS = ("auto", "naive", "xla", "pallas_tpu", "pallas_gpu")
# CPU-tuned (benchmarks/logprob_entropy.py): big enough for efficient matmuls, small enough that
# one float32 [block_t, block_v] tile and its temporaries stay a few MiB.
XLA_BLOCKS = (1024, 2048)
_WHERE = "kernels.logprob_entropy"


@dataclasses.dataclass(frozen=True)
class _Plan:
  impl: str
  inv_temp: float
  block_t: int | None  # pallas_tpu: None = the chip's (fitted to its VMEM)
  block_v: int | None
  interpret: bool = False  # Pallas off its own platform: the interpreter (tests on CPU)
  chip: Any = None  # pallas_tpu: the TPU generation (pallas_tpu.Chip), which sizes blocks and VMEM
  mesh: Any = None  # jax.sharding.Mesh or AbstractMesh; None = single program
  token_axes: Any = None  # mesh axes the token dim is split over (None = replicated)
  vocab_axes: Any = None  # mesh axes the vocabulary is split over (None = replicated)


def logprob_entropy(hidden: jax.Array, w_unembed: jax.Array, targets: jax.Array, *,
                    temperature: float = 1.0, impl: str = "auto", block_t: int | None = None,
                    block_v: int | None = None, mesh: Any = None) -> tuple[jax.Array, jax.Array]:
  """Log-probability of each target token and entropy of each next-token distribution.

  z = hidden @ w_unembed / temperature is streamed over vocabulary blocks with an online
  logsumexp: m = running max, s = sum exp(z - m), u = sum (z - m) exp(z - m), so
  lse = m + log s, logp = z_y - lse, entropy H = log s - u / s. lse and H are saved per token; the
  backward recomputes z blockwise, dz = g_logp (onehot_y - p) - g_H p (z - mu) with mu = lse - H,
  scaled by 1/temperature; dh = dz W^T and dW = h^T dz, accumulated in float32.

  Args:
    hidden: [T, D] or [B, T, D], any float dtype (float64 is computed in float32).
    w_unembed: [D, V]; every one of its V columns is part of the softmax.
    targets: int, hidden.shape[:-1]. A target outside [0, V) (e.g. a -100 pad id) has no z_y:
      its logp is -lse, finite, and contributes no one-hot term to the gradient; mask it out.
    temperature: static positive float.
    impl: "naive" (materialised logits, jax autodiff: the reference twin), "xla" (chunked
      fori loops; default off TPU/GPU), "pallas_tpu" (Mosaic), "pallas_gpu" (Triton), "auto".
      A Pallas kernel off its own platform runs in interpret mode (slow; for tests).
    block_t, block_v: token / vocabulary tile sizes; defaults xla (1024, 2048) (CPU-tuned),
      pallas_tpu (256, 512) (multiples of 16 / 128), pallas_gpu (64, 128) (powers of two >= 16).
    mesh: a mesh with the project's axes; default: the `jax.set_mesh` context, else the mesh of a
      concrete NamedSharding-ed `w_unembed`. Under a mesh whose vocab axis (LOGICAL_AXIS_RULES)
      splits V, each shard streams its own columns and the per-shard max / sums are combined
      across that axis, so the result is the global one; tokens split over the batch axes.

  Returns:
    (logp, entropy), float32, shaped like `targets`. Differentiable in hidden and w_unembed.
  """
  h, w, y = _check(hidden, w_unembed, targets)
  inv_temp = 1.0 / _check_temperature(temperature)
  found = _find_mesh(mesh, w_unembed, single=True)
  platform = target_platform(found)
  impl = _resolve_impl(impl, platform)
  lead_shape = targets.shape
  d, v = w.shape
  h_nd, y_n = h.reshape(-1, d), y.reshape(-1)  # [B, T, D] -> [B*T, D]: batch-major, shards stay whole
  n = h_nd.shape[0]
  if impl == "naive" or n == 0:
    logp_n, ent_n = _naive_op(inv_temp)(h_nd, w, y_n)
  else:
    plan = _plan(impl, inv_temp, block_t, block_v, mesh, w_unembed, n, v, platform)
    if impl == "pallas_tpu":
      plan = dataclasses.replace(plan, chip=pallas_tpu.chip_of(target_device_kind(found)))
    logp_n, ent_n = _fused_op(plan)(h_nd, w, y_n)
  return logp_n.reshape(lead_shape), ent_n.reshape(lead_shape)


def _check(hidden, w_unembed, targets) -> tuple[jax.Array, jax.Array, jax.Array]:
  shape = lambda a: tuple(getattr(a, "shape", ()))
  dtype = lambda a: jnp.result_type(a)
  if len(shape(hidden)) not in (2, 3):
    raise CotsafeError(f"{_WHERE}: hidden has shape {shape(hidden)} (expected [T, D] or [B, T, D])")
  if len(shape(w_unembed)) != 2:
    raise CotsafeError(f"{_WHERE}: w_unembed has shape {shape(w_unembed)} (expected [D, V])")
  if shape(w_unembed)[0] != shape(hidden)[-1]:
    raise CotsafeError(f"{_WHERE}: w_unembed has shape {shape(w_unembed)} but hidden has D="
                       f"{shape(hidden)[-1]} (expected w_unembed [D, V] with D = hidden.shape[-1])")
  if shape(w_unembed)[1] == 0:
    raise CotsafeError(f"{_WHERE}: w_unembed has V=0 columns (expected V >= 1)")
  if shape(targets) != shape(hidden)[:-1]:
    raise CotsafeError(f"{_WHERE}: targets has shape {shape(targets)} (expected hidden.shape[:-1] "
                       f"= {shape(hidden)[:-1]})")
  for name, a in (("hidden", hidden), ("w_unembed", w_unembed)):
    if not jnp.issubdtype(dtype(a), jnp.floating):
      raise CotsafeError(f"{_WHERE}: {name} has dtype {dtype(a)} (expected a float dtype)")
  if not jnp.issubdtype(dtype(targets), jnp.integer):
    raise CotsafeError(f"{_WHERE}: targets has dtype {dtype(targets)} (expected an integer dtype)")
  h, w = jnp.asarray(hidden), jnp.asarray(w_unembed)
  # float64 (under jax_enable_x64) is computed in float32; the outputs are float32 anyway
  h = h.astype(jnp.float32) if h.dtype == jnp.float64 else h
  w = w.astype(jnp.float32) if w.dtype == jnp.float64 else w
  return h, w, jnp.asarray(targets).astype(jnp.int32)


def _check_temperature(temperature) -> float:
  try:
    t = float(temperature)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    raise CotsafeError(f"{_WHERE}: temperature must be a static Python float, got "
                       f"{type(temperature).__name__}") from None
  if not (math.isfinite(t) and t > 0):
    raise CotsafeError(f"{_WHERE}: temperature={temperature} (expected a finite float > 0)")
  return t


def _resolve_impl(impl: str, platform: str) -> str:
  """auto: the Mosaic kernel on TPU; the chunked XLA loops elsewhere (on GPU too, until a lent GPU shows the
  Triton kernel faster: compiled for an H100 its temporaries are larger, benchmarks/README.md)."""
  if impl not in IMPLS:
    raise CotsafeError(f"{_WHERE}: unknown impl {impl!r} (expected one of {', '.join(IMPLS)})")
  if impl != "auto":
    return impl
  return "pallas_tpu" if platform == "tpu" else "xla"


def _check_block(name: str, value: int | None) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise CotsafeError(f"{_WHERE}: {name}={value!r} (expected a positive int or None)")


def _plan(impl, inv_temp, block_t, block_v, mesh, w_unembed, n, v, platform) -> _Plan:
  _check_block("block_t", block_t)
  _check_block("block_v", block_v)
  defaults = {"xla": XLA_BLOCKS, "pallas_gpu": pallas_gpu.BLOCKS}
  if impl == "pallas_tpu":  # None: the chip's blocks, fitted to its VMEM at each call (pallas_tpu.fit_blocks)
    bt, bv = block_t, block_v
    pallas_tpu.check_blocks(bt or pallas_tpu.BLOCKS[0], bv or pallas_tpu.BLOCKS[1], where=_WHERE)
  else:
    bt, bv = block_t or defaults[impl][0], block_v or defaults[impl][1]
  if impl == "pallas_gpu":
    pallas_gpu.check_blocks(bt, bv, where=_WHERE)
  # Pallas off its own platform can only run in the interpreter (tests on CPU)
  own = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
  plan = _Plan(impl, inv_temp, bt, bv, impl in own and own[impl] != platform)
  mesh = _find_mesh(mesh, w_unembed)
  if mesh is None:
    return plan
  token_axes, vocab_axes = (_split_axes(a, mesh) for a in logical_to_spec(("batch", "vocab"),
                                                                           (n, v), mesh))
  if token_axes is None and vocab_axes is None:
    return plan
  return dataclasses.replace(plan, mesh=mesh, token_axes=token_axes, vocab_axes=vocab_axes)


def _split_axes(axes, mesh):
  """The mesh axes of one PartitionSpec entry, or None when they do not actually split it."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if math.prod(mesh.shape[a] for a in names) > 1 else None


def _find_mesh(mesh, w_unembed, *, single: bool = False):
  """The mesh to split over (None: one program); single=True also returns a one-device mesh (its devices name
  the target platform and chip)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      sharding = getattr(w_unembed, "sharding", None)
      concrete = isinstance(w_unembed, jax.Array) and not isinstance(w_unembed, jax.core.Tracer)
      mesh = sharding.mesh if concrete and isinstance(sharding, NamedSharding) else None
  if mesh is None or mesh.empty or (mesh.size == 1 and not single):
    return None
  if mesh.size == 1:
    return mesh
  if not set(MESH_AXES) <= set(mesh.axis_names):
    raise CotsafeError(f"{_WHERE}: mesh axes {tuple(mesh.axis_names)} (expected the project's "
                       f"{MESH_AXES}, from parallel.mesh.make_mesh)")
  return mesh


@functools.lru_cache(maxsize=None)
def _naive_op(inv_temp: float):
  return jax.jit(functools.partial(reference.naive_logprob_entropy, inv_temp=inv_temp))


def _kw(plan: _Plan) -> dict:
  kw = dict(inv_temp=plan.inv_temp, block_t=plan.block_t, block_v=plan.block_v)
  if plan.impl == "pallas_tpu":
    return dict(kw, interpret=plan.interpret, chip=plan.chip or pallas_tpu.UNKNOWN)
  return kw if plan.impl == "xla" else dict(kw, interpret=plan.interpret)


def _local_stats(plan: _Plan, h_nd, w_dv, y_n):
  fn = {"xla": reference.xla_stats, "pallas_tpu": pallas_tpu.stats,
        "pallas_gpu": pallas_gpu.stats}[plan.impl]
  return fn(h_nd, w_dv, y_n, **_kw(plan))


def _local_grads(plan: _Plan, *args):
  fn = {"xla": reference.xla_grads, "pallas_tpu": pallas_tpu.grads,
        "pallas_gpu": pallas_gpu.grads}[plan.impl]
  return fn(*args, **_kw(plan))


def _vocab_offset(plan: _Plan, w_dv):
  return jax.lax.axis_index(plan.vocab_axes) * w_dv.shape[1]


def _w_split(plan: _Plan, w_dv) -> Any:
  """The mesh axes W's D dim enters the shard_map split over: the token (batch) axes when they divide D. W
  is then all-gathered inside, in the dtype it was given (a bf16 cast happens on the shards, never on a
  gathered float32 copy), and its gradient leaves reduce-scattered the same way."""
  tok = plan.token_axes
  return tok if tok is not None and w_dv.shape[0] % _axes_size(plan.mesh, tok) == 0 else None


def _gather_d(w_dv, d_axes):
  return w_dv if d_axes is None else jax.lax.all_gather(w_dv, d_axes, axis=0, tiled=True)


def _forward(plan: _Plan, h_nd, w_dv, y_n):
  """(logp, entropy, lse) per token, global over the vocabulary."""
  if plan.mesh is None:
    return _math.finish(*_local_stats(plan, h_nd, w_dv, y_n), plan.inv_temp)
  d_axes = _w_split(plan, w_dv)

  def shard(h_nd, w_dv, y_n):
    w_dv = _gather_d(w_dv, d_axes)
    if plan.vocab_axes is None:
      return _math.finish(*_local_stats(plan, h_nd, w_dv, y_n), plan.inv_temp)
    m, s, u, xy = _local_stats(plan, h_nd, w_dv, y_n - _vocab_offset(plan, w_dv))
    # Megatron / verl tensor-parallel combine: rescale each shard's sums to the global max.
    m_all = jax.lax.pmax(m, plan.vocab_axes)
    shift = (m - m_all) * plan.inv_temp
    a = jnp.exp(shift)
    s, u, xy = jax.lax.psum((a * s, a * (u + shift * s), xy), plan.vocab_axes)
    return _math.finish(m_all, s, u, xy, plan.inv_temp)

  tok, voc = plan.token_axes, plan.vocab_axes
  return jax.shard_map(shard, mesh=plan.mesh, in_specs=(P(tok, None), P(d_axes, voc), P(tok)),
                       out_specs=(P(tok), P(tok), P(tok)), check_vma=False)(h_nd, w_dv, y_n)


def _backward(plan: _Plan, h_nd, w_dv, y_n, lse_n, mu_n, g_logp_n, g_ent_n):
  if plan.mesh is None:
    return _local_grads(plan, h_nd, w_dv, y_n, lse_n, mu_n, g_logp_n, g_ent_n)
  d_axes = _w_split(plan, w_dv)

  def shard(h_nd, w_dv, y_n, *per_token):
    w_dv = _gather_d(w_dv, d_axes)
    if plan.vocab_axes is not None:
      y_n = y_n - _vocab_offset(plan, w_dv)
    dh_nd, dw_dv = _local_grads(plan, h_nd, w_dv, y_n, *per_token)
    if plan.vocab_axes is not None:
      dh_nd = jax.lax.psum(dh_nd, plan.vocab_axes)
    if d_axes is not None:
      # summed over the token shards and left split over them on D: a reduce-scatter, so no device holds
      # the summed [D, V] gradient
      dw_dv = jax.lax.psum_scatter(dw_dv, d_axes, scatter_dimension=0, tiled=True)
    elif plan.token_axes is not None:
      dw_dv = jax.lax.psum(dw_dv, plan.token_axes)
    return dh_nd, dw_dv

  tok, voc = plan.token_axes, plan.vocab_axes
  return jax.shard_map(shard, mesh=plan.mesh,
                       in_specs=(P(tok, None), P(d_axes, voc)) + (P(tok),) * 5,
                       out_specs=(P(tok, None), P(d_axes, voc)), check_vma=False)(
                           h_nd, w_dv, y_n, lse_n, mu_n, g_logp_n, g_ent_n)


def _axes_size(mesh, axes) -> int:
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in names)


@functools.lru_cache(maxsize=None)
def _fused_op(plan: _Plan):
  @jax.custom_vjp
  def op(h_nd, w_dv, y_n):
    logp_n, ent_n, _ = _forward(plan, h_nd, w_dv, y_n)
    return logp_n, ent_n

  def op_fwd(h_nd, w_dv, y_n):
    logp_n, ent_n, lse_n = _forward(plan, h_nd, w_dv, y_n)
    return (logp_n, ent_n), (h_nd, w_dv, y_n, lse_n, ent_n)

  def op_bwd(res, g):
    h_nd, w_dv, y_n, lse_n, ent_n = res
    g_logp_n, g_ent_n = (x.astype(jnp.float32) for x in g)
    dh_nd, dw_dv = _backward(plan, h_nd, w_dv, y_n, lse_n, lse_n - ent_n, g_logp_n, g_ent_n)
    return dh_nd.astype(h_nd.dtype), dw_dv.astype(w_dv.dtype), None

  op.defvjp(op_fwd, op_bwd)
  return jax.jit(op)
