"""Triton (Pallas GPU) kernels of the fused log-prob + entropy: forward statistics, dh and dW.

One program per token block (stats, dh) or vocabulary block (dW); logit tiles are rebuilt from
[block, 16..64] chunks of D in registers, and every program owns its output rows / columns, so the
float32 read-modify-write of dh and dW needs no atomics and is deterministic.
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


def _sync(interpret: bool) -> None:
  # Rows / columns just stored are re-read by other threads of this program next iteration.
  if not interpret:
    plgpu.debug_barrier()


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


def _dh_kernel(h_ref, w_ref, *refs, g: _Geom, interpret: bool):
  *tok_refs, dh_ref = refs
  r0 = pl.program_id(0) * g.bt
  row_ok_t = r0 + jnp.arange(g.bt) < g.n
  tok = _load_tok(tok_refs, r0, g.bt, row_ok_t)

  def vocab(j, carry):
    c0 = j * g.bv
    cols_c = c0 + jnp.arange(g.bv)
    col_ok_c = cols_c < g.v
    dz_tc = g.dz_tile(g.x_tile(h_ref, w_ref, r0, c0, row_ok_t, col_ok_c), cols_c, row_ok_t,
                      col_ok_c, tok)

    def chunk(k, carry):
      w_kc = plgpu.load(w_ref.at[pl.ds(k * g.bd, g.bd), pl.ds(c0, g.bv)], mask=col_ok_c[None, :],
                        other=0.0).astype(g.cdt)
      out = dh_ref.at[pl.ds(r0, g.bt), pl.ds(k * g.bd, g.bd)]
      prev_tk = jnp.where(j > 0, plgpu.load(out, mask=row_ok_t[:, None], other=0.0), 0.0)
      new_tk = prev_tk + plgpu.dot(dz_tc, w_kc, trans_b=True, precision=g.prec)
      plgpu.store(out, new_tk, mask=row_ok_t[:, None])
      return carry

    jax.lax.fori_loop(0, g.nd, chunk, 0)
    _sync(interpret)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(g.v, g.bv), vocab, 0)


def _dw_kernel(h_ref, w_ref, *refs, g: _Geom, interpret: bool):
  *tok_refs, dw_ref = refs
  c0 = pl.program_id(0) * g.bv
  cols_c = c0 + jnp.arange(g.bv)
  col_ok_c = cols_c < g.v

  def token(i, carry):
    r0 = i * g.bt
    row_ok_t = r0 + jnp.arange(g.bt) < g.n
    tok = _load_tok(tok_refs, r0, g.bt, row_ok_t)
    dz_tc = g.dz_tile(g.x_tile(h_ref, w_ref, r0, c0, row_ok_t, col_ok_c), cols_c, row_ok_t,
                      col_ok_c, tok)

    def chunk(k, carry):
      h_tk = plgpu.load(h_ref.at[pl.ds(r0, g.bt), pl.ds(k * g.bd, g.bd)], mask=row_ok_t[:, None],
                        other=0.0).astype(g.cdt)
      out = dw_ref.at[pl.ds(k * g.bd, g.bd), pl.ds(c0, g.bv)]
      prev_kc = jnp.where(i > 0, plgpu.load(out, mask=col_ok_c[None, :], other=0.0), 0.0)
      new_kc = prev_kc + plgpu.dot(h_tk, dz_tc, trans_a=True, precision=g.prec)
      plgpu.store(out, new_kc, mask=col_ok_c[None, :])
      return carry

    jax.lax.fori_loop(0, g.nd, chunk, 0)
    _sync(interpret)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(g.n, g.bt), token, 0)


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


def grads(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, lse_n: jax.Array, mu_n: jax.Array,
          g_logp_n: jax.Array, g_ent_n: jax.Array, *, inv_temp: float, block_t: int,
          block_v: int, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """(dh float32 [N, D], dW in W's dtype [D, V]); dW is accumulated in a float32 [D, V] buffer."""
  d, w_dtype = h_nd.shape[1], w_dv.dtype
  h_nd, w_dv, g = _prepare(h_nd, w_dv, block_t, block_v, inv_temp)
  args = (h_nd, w_dv, y_n, lse_n, mu_n, g_logp_n, g_ent_n)
  dh_nd = pl.pallas_call(
      functools.partial(_dh_kernel, g=g, interpret=interpret), grid=(pl.cdiv(g.n, g.bt),),
      out_shape=jax.ShapeDtypeStruct((g.n, g.d), jnp.float32), compiler_params=_params(g),
      interpret=interpret, name="logprob_entropy_dh")(*args)
  dw_dv = pl.pallas_call(
      functools.partial(_dw_kernel, g=g, interpret=interpret), grid=(pl.cdiv(g.v, g.bv),),
      out_shape=jax.ShapeDtypeStruct((g.d, g.v), jnp.float32), compiler_params=_params(g),
      interpret=interpret, name="logprob_entropy_dw")(*args)
  return dh_nd[:, :d], dw_dv[:d].astype(w_dtype)
