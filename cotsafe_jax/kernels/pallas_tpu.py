"""Mosaic TPU kernels of the fused log-prob + entropy: forward statistics, dh and dW.

Each is a pallas_call over a (parallel, reduction) grid of [block_t x block_v] logit tiles that live
only in VMEM; per-token values travel lane-packed in [N, 128] float32 tiles (TPU lane width).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.kernels import _math

BLOCKS = (256, 512)
_LANES = 128
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the kernels need of a TPU generation: VMEM per TensorCore (the figures of jax's Pallas tpu_info, which
  needs a live TPU to be asked) and the default (block_t, block_v)."""
  name: str
  vmem_bytes: int
  blocks: tuple[int, int]


# keyed on jax's device_kind (also the deviceless topology devices' kind, so a plan compiles for the right chip)
CHIPS = {"v4": Chip("v4", 16 * _MIB, (256, 256)), "v5e": Chip("v5e", 128 * _MIB, (512, 512)),
         "v5p": Chip("v5p", 64 * _MIB, (256, 512)), "v6e": Chip("v6e", 128 * _MIB, (512, 512))}
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
          "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
# a kind not in the table (a newer or older TPU): the smallest VMEM of the table, so what compiles fits
UNKNOWN = Chip("unknown TPU", 16 * _MIB, BLOCKS)
# of VMEM for the estimate below (Mosaic's own scratch): checked by compiling the shapes for every chip
# (tests/kernels/test_pallas_tpu_chips.py); v4 at D = 8192 compiles at an estimate of 16.6 MiB of its 16
_BUDGET = 0.85
_NT = (((1,), (0,)), ((), ()))  # [t, d] x [d, v]
_TRANS_B = (((1,), (1,)), ((), ()))  # [t, v] x [d, v] -> [t, d]
_TRANS_A = (((0,), (0,)), ((), ()))  # [t, d] x [t, v] -> [d, v]


def check_blocks(block_t: int, block_v: int, *, where: str) -> None:
  if block_t % 16:
    raise CotsafeError(f"{where}: block_t={block_t} for pallas_tpu (expected a multiple of 16: "
                       "bf16 sublane tiling)")
  if block_v % _LANES:
    raise CotsafeError(f"{where}: block_v={block_v} for pallas_tpu (expected a multiple of 128: "
                       "TPU lane width)")


def chip_of(device_kind: str | None) -> Chip:
  return CHIPS[_KINDS[device_kind]] if device_kind in _KINDS else UNKNOWN


def vmem_estimate(n: int, d: int, v: int, bt: int, bv: int, h_dtype, w_dtype) -> int:
  """Bytes of VMEM the largest of the three kernels holds at these blocks: double-buffered input and output
  tiles, the float32 accumulator (dh: and the product added to it), the [bt, bv] logit-tile temporaries, the
  copies of input tiles cast to the compute dtype, and the masked copy of the W tile (dh: when V is not a
  multiple of bv) or of the h tile (dW: the same for N). Checked against Mosaic by compiling (the tests); with
  float32 W it first missed the float32 copy of the h tile (v5e at D 8192: 162 MiB used of 128)."""
  ih, iw = jnp.dtype(h_dtype).itemsize, jnp.dtype(w_dtype).itemsize
  ic = jnp.dtype(jnp.promote_types(h_dtype, w_dtype)).itemsize
  # every kernel casts an input tile not in the compute dtype (float32 W makes a float32 copy of the h tile)
  casts = (bt * d * ic if ih != ic else 0) + (d * bv * ic if iw != ic else 0)
  common = 2 * (bt * d * ih + d * bv * iw) + 2 * bt * _LANES * 4 + 6 * bt * bv * 4 + casts
  stats = common + 3 * bt * _LANES * 4
  dh = common + 4 * bt * d * 4 + (d * bv * ic if v % bv else 0)
  dw = common + 2 * d * bv * iw + d * bv * 4 + (bt * d * ic if n % bt else 0)
  return max(stats, dh, dw)


def fit_blocks(chip: Chip, n: int, d: int, v: int, h_dtype, w_dtype, block_t: int | None = None,
               block_v: int | None = None, *, where: str) -> tuple[int, int, int]:
  """(block_t, block_v, vmem_limit_bytes) for this chip: the given blocks, or the chip's default halved (block_v
  down to 128, then block_t down to 16) until vmem_estimate fits 85% of its VMEM. Given blocks that do not fit
  are an error naming the chip and the bytes."""
  given = block_t is not None or block_v is not None
  bt, bv = block_t or chip.blocks[0], block_v or chip.blocks[1]

  def clamp(bt, bv):  # a block equal to the whole dim is always legal
    return (n if n <= bt else bt), (v if v <= bv else bv)

  budget = int(_BUDGET * chip.vmem_bytes)
  while not given and vmem_estimate(n, d, v, *clamp(bt, bv), h_dtype, w_dtype) > budget:
    if bv > _LANES:
      bv //= 2
    elif bt > 16:
      bt //= 2
    else:
      break
  bt, bv = clamp(bt, bv)
  need = vmem_estimate(n, d, v, bt, bv, h_dtype, w_dtype)
  if need > budget:
    raise CotsafeError(f"{where}: pallas_tpu blocks ({bt}, {bv}) at D={d} need ~{need / _MIB:.1f} MiB of VMEM, "
                       f"over {_BUDGET:.0%} of the {chip.vmem_bytes // _MIB} MiB of a {chip.name} core (expected "
                       "smaller block_t / block_v, W in a 2-byte dtype, or impl='xla')")
  return bt, bv, min(chip.vmem_bytes, max(int(1.25 * need), 16 * _MIB))


def _lane(x_rl: jax.Array, k: int) -> jax.Array:
  """Lane k of a lane-packed [rows, 128] tile as [rows, 1] (a masked lane sum: exact)."""
  lane_rl = jax.lax.broadcasted_iota(jnp.int32, x_rl.shape, 1)
  return jnp.sum(jnp.where(lane_rl == k, x_rl, 0.0), axis=1, keepdims=True)


def _pack(shape: tuple[int, int], *cols_r1: jax.Array) -> jax.Array:
  lane_rl = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  out_rl = jnp.zeros(shape, jnp.float32)
  for k, c_r1 in enumerate(cols_r1):
    out_rl = jnp.where(lane_rl == k, c_r1, out_rl)
  return out_rl


def _lanes_n(*cols_n: jax.Array) -> jax.Array:
  """[N] per-token arrays -> one [N, 128] float32 tile set, array k in lane k."""
  stacked_nk = jnp.stack([c.astype(jnp.float32) for c in cols_n], axis=1)
  return jnp.pad(stacked_nk, ((0, 0), (0, _LANES - len(cols_n))))


def _logits(h_ref, w_ref, *, cdt) -> jax.Array:
  """Raw (unscaled) float32 logits of this tile."""
  return jax.lax.dot_general(h_ref[...].astype(cdt), w_ref[...].astype(cdt), _NT,
                             preferred_element_type=jnp.float32,
                             precision=_math.matmul_precision(cdt))


def _stats_kernel(h_ref, w_ref, tok_ref, out_ref, acc_ref, *, v: int, inv_temp: float, cdt):
  j, nv = pl.program_id(1), pl.num_programs(1)
  bt, bv = h_ref.shape[0], w_ref.shape[1]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = _pack(acc_ref.shape, jnp.full((bt, 1), _math.NEG_INF, jnp.float32))

  x_tc = _logits(h_ref, w_ref, cdt=cdt)
  cols_tc = j * bv + jax.lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
  valid_tc = cols_tc < v  # a partial last block reads unspecified columns
  y_t1 = _lane(tok_ref[...], 0).astype(jnp.int32)
  stats = tuple(_lane(acc_ref[...], k) for k in range(4))
  stats = _math.update_stats(stats, x_tc, valid_tc, (cols_tc == y_t1) & valid_tc, inv_temp,
                             keep=True)
  acc_ref[...] = _pack(acc_ref.shape, *stats)

  @pl.when(j == nv - 1)
  def _out():
    out_ref[...] = acc_ref[...]


def _dz(h_ref, w_ref, tok_ref, i, j, *, n: int, v: int, inv_temp: float, cdt) -> jax.Array:
  bt, bv = h_ref.shape[0], w_ref.shape[1]
  x_tc = _logits(h_ref, w_ref, cdt=cdt)
  rows_tc = i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, bv), 0)
  cols_tc = j * bv + jax.lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
  valid_tc = (rows_tc < n) & (cols_tc < v)
  tok_tl = tok_ref[...]
  y_t1, lse_t1, mu_t1, gl_t1, ge_t1 = (_lane(tok_tl, k) for k in range(5))
  hit_tc = (cols_tc == y_t1.astype(jnp.int32)) & valid_tc
  dz_tc = _math.dz_tile(x_tc, valid_tc, hit_tc, lse_t1, mu_t1, gl_t1, ge_t1, inv_temp, keep=True)
  return (dz_tc * inv_temp).astype(cdt)


def _dh_kernel(h_ref, w_ref, tok_ref, dh_ref, acc_ref, *, n: int, v: int, inv_temp: float, cdt):
  i, j, nv = pl.program_id(0), pl.program_id(1), pl.num_programs(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  dz_tc = _dz(h_ref, w_ref, tok_ref, i, j, n=n, v=v, inv_temp=inv_temp, cdt=cdt)
  w_dc = w_ref[...]
  if v % w_dc.shape[1]:  # a partial last block: 0 * garbage would be NaN (a [1, bv] mask, no [d, bv] iota)
    cols_1c = j * w_dc.shape[1] + jax.lax.broadcasted_iota(jnp.int32, (1, w_dc.shape[1]), 1)
    w_dc = jnp.where(cols_1c < v, w_dc, 0)
  acc_ref[...] += jax.lax.dot_general(dz_tc, w_dc.astype(cdt), _TRANS_B, preferred_element_type=jnp.float32,
                                      precision=_math.matmul_precision(cdt))

  @pl.when(j == nv - 1)
  def _out():
    dh_ref[...] = acc_ref[...]


def _dw_kernel(h_ref, w_ref, tok_ref, dw_ref, acc_ref, *, n: int, v: int, inv_temp: float, cdt):
  j, i, nt = pl.program_id(0), pl.program_id(1), pl.num_programs(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  dz_tc = _dz(h_ref, w_ref, tok_ref, i, j, n=n, v=v, inv_temp=inv_temp, cdt=cdt)
  h_td = h_ref[...]
  if n % h_td.shape[0]:  # a partial last block: 0 * garbage would be NaN (a [bt, 1] mask)
    rows_t1 = i * h_td.shape[0] + jax.lax.broadcasted_iota(jnp.int32, (h_td.shape[0], 1), 0)
    h_td = jnp.where(rows_t1 < n, h_td, 0)
  acc_ref[...] += jax.lax.dot_general(h_td.astype(cdt), dz_tc, _TRANS_A, preferred_element_type=jnp.float32,
                                      precision=_math.matmul_precision(cdt))

  @pl.when(i == nt - 1)
  def _out():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _sizes(h_nd, w_dv, block_t: int | None, block_v: int | None, chip: Chip, interpret: bool):
  """(n, d, v, bt, bv, compute dtype, compiler params): blocks and VMEM limit from the chip (fit_blocks); in the
  interpreter (no VMEM) the blocks as given (or the default)."""
  (n, d), v = h_nd.shape, w_dv.shape[1]
  if v >= 2**24:
    raise CotsafeError(f"kernels.pallas_tpu: V={v} (expected V < 2**24: targets travel as float32)")
  if interpret:
    bt, bv = block_t or BLOCKS[0], block_v or BLOCKS[1]
    bt, bv, limit = (n if n <= bt else bt), (v if v <= bv else bv), None
  else:
    bt, bv, limit = fit_blocks(chip, n, d, v, h_nd.dtype, w_dv.dtype, block_t, block_v, where="kernels.pallas_tpu")
  params = pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY), vmem_limit_bytes=limit)
  return n, d, v, bt, bv, jnp.promote_types(h_nd.dtype, w_dv.dtype), params


def stats(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, *, inv_temp: float, block_t: int | None,
          block_v: int | None, interpret: bool, chip: Chip = UNKNOWN) -> tuple[jax.Array, ...]:
  """Per-token (m, s, u, x_y) over this vocabulary slice (see _math.update_stats)."""
  n, d, v, bt, bv, cdt, params = _sizes(h_nd, w_dv, block_t, block_v, chip, interpret)
  kernel = functools.partial(_stats_kernel, v=v, inv_temp=inv_temp, cdt=cdt)
  out_nl = pl.pallas_call(
      kernel, grid=(pl.cdiv(n, bt), pl.cdiv(v, bv)),
      in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                pl.BlockSpec((bt, _LANES), lambda i, j: (i, 0))],
      out_specs=pl.BlockSpec((bt, _LANES), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((n, _LANES), jnp.float32),
      scratch_shapes=[pltpu.VMEM((bt, _LANES), jnp.float32)],
      compiler_params=params, interpret=interpret, name="logprob_entropy_stats",
  )(h_nd, w_dv, _lanes_n(y_n))
  return tuple(out_nl[:, k] for k in range(4))


def grads(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, lse_n: jax.Array, mu_n: jax.Array,
          g_logp_n: jax.Array, g_ent_n: jax.Array, *, inv_temp: float, block_t: int | None,
          block_v: int | None, interpret: bool, chip: Chip = UNKNOWN) -> tuple[jax.Array, jax.Array]:
  """(dh float32 [N, D], dW in W's dtype [D, V]): two kernels, each recomputing the logit tiles; dW is
  accumulated in a float32 VMEM tile per vocabulary block and written once in W's dtype."""
  n, d, v, bt, bv, cdt, params = _sizes(h_nd, w_dv, block_t, block_v, chip, interpret)
  tok_nl = _lanes_n(y_n, lse_n, mu_n, g_logp_n, g_ent_n)
  kw = dict(n=n, v=v, inv_temp=inv_temp, cdt=cdt)
  nt, nv = pl.cdiv(n, bt), pl.cdiv(v, bv)
  dh_nd = pl.pallas_call(
      functools.partial(_dh_kernel, **kw), grid=(nt, nv),
      in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                pl.BlockSpec((bt, _LANES), lambda i, j: (i, 0))],
      out_specs=pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((n, d), jnp.float32),
      scratch_shapes=[pltpu.VMEM((bt, d), jnp.float32)],
      compiler_params=params, interpret=interpret, name="logprob_entropy_dh",
  )(h_nd, w_dv, tok_nl)
  dw_dv = pl.pallas_call(
      functools.partial(_dw_kernel, **kw), grid=(nv, nt),
      in_specs=[pl.BlockSpec((bt, d), lambda j, i: (i, 0)),
                pl.BlockSpec((d, bv), lambda j, i: (0, j)),
                pl.BlockSpec((bt, _LANES), lambda j, i: (i, 0))],
      out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      out_shape=jax.ShapeDtypeStruct((d, v), w_dv.dtype),
      scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
      compiler_params=params, interpret=interpret, name="logprob_entropy_dw",
  )(h_nd, w_dv, tok_nl)
  return dh_nd, dw_dv
