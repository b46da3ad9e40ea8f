"""Triton (Pallas GPU) kernels of the fused log-prob + entropy: forward statistics and the backward's dz.

Logit tiles are rebuilt from [block, 16..64] chunks of D in registers. The forward runs one program per token
block over the whole vocabulary (online logsumexp). The backward goes over the vocabulary in chunks: one program
per [token block, vocabulary block] tile writes that tile of dz once, and dh / dW come from two matmuls per chunk
(`grads`). An earlier backward accumulated dh and dW in float32 tiles that every block read back and rewrote in
global memory (dh's tile once per vocabulary block, dW's once per token block) and held a float32 [D, V]
buffer; neither is left.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.kernels import _math

BLOCKS = (64, 128)
DZ_CHUNK_BYTES = 256 << 20  # per backward chunk: dz [N, C], the W slice and float32 dW [D, C] (`chunk_cols`)


def check_blocks(block_t: int, block_v: int, *, where: str) -> None:
  for name, b in (("block_t", block_t), ("block_v", block_v)):
    if b < 16 or b & (b - 1):
      raise CotsafeError(f"{where}: {name}={b} for pallas_gpu (expected a power of two >= 16: "
                         "Triton tiles)")


def _pow2_tile(block: int, size: int) -> int:
  return min(block, max(16, pl.next_power_of_2(size)))


class _Geom:
  """Static tile geometry shared by the three kernels."""

  def __init__(self, n: int, d: int, v: int, block_t: int, block_v: int, cdt, inv_temp: float):
    self.n, self.d, self.v, self.inv_temp, self.cdt = n, d, v, inv_temp, cdt
    self.bt, self.bv = _pow2_tile(block_t, n), _pow2_tile(block_v, v)
    self.bd = next(b for b in (64, 32, 16) if d % b == 0)
    self.nd = d // self.bd
    self.prec = _math.matmul_precision(cdt)

  def x_tile(self, h_ref, w_ref, r0, c0, row_ok_t, col_ok_c) -> jax.Array:
    """Raw logits of rows r0.. x columns c0..; masked-off rows / columns load as 0."""
    bt, bv, bd = self.bt, self.bv, self.bd

    def chunk(k, acc_tc):
      h_tk = plgpu.load(h_ref.at[pl.ds(r0, bt), pl.ds(k * bd, bd)], mask=row_ok_t[:, None],
                        other=0.0)
      w_kc = plgpu.load(w_ref.at[pl.ds(k * bd, bd), pl.ds(c0, bv)], mask=col_ok_c[None, :],
                        other=0.0)
      return acc_tc + plgpu.dot(h_tk.astype(self.cdt), w_kc.astype(self.cdt), precision=self.prec)

    return jax.lax.fori_loop(0, self.nd, chunk, jnp.zeros((bt, bv), jnp.float32))

  def dz_tile(self, x_tc, cols_c, row_ok_t, col_ok_c, tok) -> jax.Array:
    y_t, lse_t, mu_t, gl_t, ge_t = tok
    valid_tc = row_ok_t[:, None] & col_ok_c[None, :]
    hit_tc = (cols_c[None, :] == y_t[:, None]) & valid_tc
    dz_tc = _math.dz_tile(x_tc, valid_tc, hit_tc, lse_t, mu_t, gl_t, ge_t, self.inv_temp,
                          keep=False)
    return (dz_tc * self.inv_temp).astype(self.cdt)


def _load_tok(refs, r0, bt, row_ok_t):
  y_ref, *f_refs = refs
  y_t = plgpu.load(y_ref.at[pl.ds(r0, bt)], mask=row_ok_t, other=-1)
  return (y_t, *(plgpu.load(r.at[pl.ds(r0, bt)], mask=row_ok_t, other=0.0) for r in f_refs))


def _stats_kernel(h_ref, w_ref, y_ref, m_ref, s_ref, u_ref, zy_ref, *, g: _Geom):
  r0 = pl.program_id(0) * g.bt
  row_ok_t = r0 + jnp.arange(g.bt) < g.n
  y_t = plgpu.load(y_ref.at[pl.ds(r0, g.bt)], mask=row_ok_t, other=-1)

  def vocab(j, stats):
    cols_c = j * g.bv + jnp.arange(g.bv)
    col_ok_c = cols_c < g.v
    x_tc = g.x_tile(h_ref, w_ref, r0, j * g.bv, row_ok_t, col_ok_c)
    valid_tc = jnp.broadcast_to(col_ok_c[None, :], x_tc.shape)
    hit_tc = (cols_c[None, :] == y_t[:, None]) & valid_tc
    return _math.update_stats(stats, x_tc, valid_tc, hit_tc, g.inv_temp, keep=False)

  stats = jax.lax.fori_loop(0, pl.cdiv(g.v, g.bv), vocab, _math.init_stats(g.bt, keep=False))
  for ref, x_t in zip((m_ref, s_ref, u_ref, zy_ref), stats):
    plgpu.store(ref.at[pl.ds(r0, g.bt)], x_t, mask=row_ok_t)


def _dz_kernel(h_ref, w_ref, *refs, g: _Geom):
  """dz of one [bt, bv] tile of this vocabulary chunk, in the compute dtype; each tile is written once."""
  *tok_refs, dz_ref = refs
  r0, c0 = pl.program_id(0) * g.bt, pl.program_id(1) * g.bv
  row_ok_t = r0 + jnp.arange(g.bt) < g.n
  cols_c = c0 + jnp.arange(g.bv)
  col_ok_c = cols_c < g.v
  tok = _load_tok(tok_refs, r0, g.bt, row_ok_t)
  dz_tc = g.dz_tile(g.x_tile(h_ref, w_ref, r0, c0, row_ok_t, col_ok_c), cols_c, row_ok_t, col_ok_c, tok)
  plgpu.store(dz_ref.at[pl.ds(r0, g.bt), pl.ds(c0, g.bv)], dz_tc,
              mask=row_ok_t[:, None] & col_ok_c[None, :])


def _prepare(h_nd, w_dv, block_t, block_v, inv_temp):
  (n, d), v = h_nd.shape, w_dv.shape[1]
  if d % 16:  # Triton dots need K >= 16; zero columns of h / rows of W add nothing to z
    pad = 16 - d % 16
    h_nd, w_dv = jnp.pad(h_nd, ((0, 0), (0, pad))), jnp.pad(w_dv, ((0, pad), (0, 0)))
  cdt = jnp.promote_types(h_nd.dtype, w_dv.dtype)
  return h_nd, w_dv, _Geom(n, h_nd.shape[1], v, block_t, block_v, cdt, inv_temp)


def _params(g: _Geom) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=4 if g.bt * g.bv <= 64 * 64 else 8, num_stages=2)


def stats(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, *, inv_temp: float, block_t: int,
          block_v: int, interpret: bool) -> tuple[jax.Array, ...]:
  """Per-token (m, s, u, x_y) over this vocabulary slice (see _math.update_stats)."""
  h_nd, w_dv, g = _prepare(h_nd, w_dv, block_t, block_v, inv_temp)
  out = jax.ShapeDtypeStruct((g.n,), jnp.float32)
  return tuple(pl.pallas_call(
      functools.partial(_stats_kernel, g=g), grid=(pl.cdiv(g.n, g.bt),), out_shape=[out] * 4,
      compiler_params=_params(g), interpret=interpret, name="logprob_entropy_stats",
  )(h_nd, w_dv, y_n))


def chunk_cols(n: int, d: int, v: int, block_v: int, dtype, chunk_bytes: int | None = None) -> int:
  """Vocabulary columns C per backward chunk: the chunk's dz [n, C] and W slice [d, C] in the compute dtype plus
  its float32 dW [d, C] within `chunk_bytes` (default DZ_CHUNK_BYTES, read at call time); C is a multiple of
  block_v, at least one block, at most V."""
  chunk_bytes = DZ_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  per_col = (n + d) * jnp.dtype(dtype).itemsize + d * 4
  return min(v, max(block_v, chunk_bytes // per_col // block_v * block_v))


def _dz_call(g: _Geom, h_nd, w_dc, y_n, per_token, interpret: bool) -> jax.Array:
  return pl.pallas_call(
      functools.partial(_dz_kernel, g=g), grid=(pl.cdiv(g.n, g.bt), pl.cdiv(g.v, g.bv)),
      out_shape=jax.ShapeDtypeStruct((g.n, g.v), g.cdt), compiler_params=_params(g), interpret=interpret,
      name="logprob_entropy_dz")(h_nd, w_dc, y_n, *per_token)


def grads(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, lse_n: jax.Array, mu_n: jax.Array,
          g_logp_n: jax.Array, g_ent_n: jax.Array, *, inv_temp: float, block_t: int,
          block_v: int, interpret: bool, chunk_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(dh float32 [N, D], dW in W's dtype [D, V]), one vocabulary chunk of C columns (`chunk_cols`) at a time.

  Per chunk the kernel rebuilds the logits tile by tile and writes dz [N, C] in the compute dtype, each tile
  once; dh += dz W_c^T and dW[:, chunk] = h^T dz are two plain matmuls with float32 accumulation (cuBLAS on a
  GPU), and the chunk's dW is written once, in W's dtype. The full chunks run in a loop (one chunk's buffers
  alive at a time), then the remaining V mod C columns. No float32 tile of dh or dW is read back and rewritten
  in global memory; the temporaries are one chunk's dz, W slice and float32 dW, and dh [N, D].
  """
  (n, d), v, w_dtype = h_nd.shape, w_dv.shape[1], w_dv.dtype
  h_pad, w_pad, g = _prepare(h_nd, w_dv, block_t, block_v, inv_temp)
  cdt, prec, dp = g.cdt, g.prec, g.d
  h_cast = h_nd.astype(cdt)
  per_token = (lse_n, mu_n, g_logp_n, g_ent_n)
  cols = chunk_cols(n, dp, v, g.bv, cdt, chunk_bytes)

  def chunk(c0, width, carry):
    dh_nd, dw_dv = carry
    w_dc = jax.lax.dynamic_slice_in_dim(w_pad, c0, width, axis=1)
    dz_nc = _dz_call(_Geom(n, dp, width, block_t, block_v, cdt, inv_temp), h_pad, w_dc, y_n - c0, per_token,
                     interpret)
    dh_nd = dh_nd + jax.lax.dot_general(dz_nc, w_dc[:d].astype(cdt), (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32, precision=prec)
    dw_dc = jax.lax.dot_general(h_cast, dz_nc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                                precision=prec)
    return dh_nd, jax.lax.dynamic_update_slice_in_dim(dw_dv, dw_dc.astype(w_dtype), c0, axis=1)

  carry = (jnp.zeros((n, d), jnp.float32), jnp.zeros((d, v), w_dtype))
  full = v // cols
  carry = jax.lax.fori_loop(0, full, lambda j, c: chunk(j * cols, cols, c), carry)
  if v % cols:
    carry = chunk(full * cols, v % cols, carry)
  return carry
