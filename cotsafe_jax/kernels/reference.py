"""The twins of the fused kernels: `naive` materialises the logits (jax autodiff gives its gradients);
`xla` streams [block_t x block_v] tiles through fori loops and never holds more than one tile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cotsafe_jax.kernels import _math


def naive_logprob_entropy(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, *,
                          inv_temp: float) -> tuple[jax.Array, jax.Array]:
  """Materialised [N, V] float32 logits, textbook log-softmax; entropy = -sum p log p.

  A target outside [0, V) gets logp = -lse, like the fused op. Shifts are (x - max x) / T so the max
  column's is exactly 0 (see _math.update_stats): logp <= 0 and H >= 0 in floating point.
  """
  cdt = jnp.promote_types(h_nd.dtype, w_dv.dtype)
  x_nv = jnp.dot(h_nd.astype(cdt), w_dv.astype(cdt), preferred_element_type=jnp.float32,
                 precision=_math.matmul_precision(cdt))
  m_n1 = jax.lax.stop_gradient(jnp.max(x_nv, axis=-1, keepdims=True))
  d_nv = (x_nv - m_n1) * inv_temp
  log_s_n1 = jnp.log(jnp.sum(jnp.exp(d_nv), axis=-1, keepdims=True))
  logp_nv = d_nv - log_s_n1
  hit_nv = jnp.arange(w_dv.shape[1])[None, :] == y_n[:, None]
  logp_n = jnp.where(jnp.any(hit_nv, axis=-1), jnp.sum(jnp.where(hit_nv, logp_nv, 0.0), axis=-1),
                     -(m_n1 * inv_temp + log_s_n1)[:, 0])
  ent_n = -jnp.sum(jnp.exp(logp_nv) * logp_nv, axis=-1)
  return logp_n, ent_n


def _tile_start(k: jax.Array, block: int, size: int) -> jax.Array:
  # The last tile is shifted left to end exactly at `size` (no padded copy of W or h); its
  # overlap with the previous tile is masked out, so every row/column is counted once.
  return jnp.minimum(k * block, size - block)


def xla_stats(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, *, inv_temp: float,
              block_t: int, block_v: int) -> tuple[jax.Array, ...]:
  """Per-token (m, s, u, x_y) over this vocabulary slice: token tiles outside, vocab tiles inside."""
  (n, d), v = h_nd.shape, w_dv.shape[1]
  bt, bv = min(block_t, n), min(block_v, v)
  cdt = jnp.promote_types(h_nd.dtype, w_dv.dtype)
  prec = _math.matmul_precision(cdt)

  def token_tile(i, out_4n):
    ts = _tile_start(i, bt, n)
    h_td = jax.lax.dynamic_slice(h_nd, (ts, 0), (bt, d)).astype(cdt)
    y_t = jax.lax.dynamic_slice(y_n, (ts,), (bt,))

    def vocab_tile(j, stats):
      vs = _tile_start(j, bv, v)
      w_dc = jax.lax.dynamic_slice(w_dv, (0, vs), (d, bv)).astype(cdt)
      cols_c = vs + jnp.arange(bv)
      valid_1c = (cols_c >= j * bv)[None, :]
      x_tc = jnp.dot(h_td, w_dc, preferred_element_type=jnp.float32, precision=prec)
      hit_tc = (cols_c[None, :] == y_t[:, None]) & valid_1c
      return _math.update_stats(stats, x_tc, valid_1c, hit_tc, inv_temp, keep=False)

    stats = jax.lax.fori_loop(0, _cdiv(v, bv), vocab_tile, _math.init_stats(bt, keep=False))
    # Rows of a shifted token tile are recomputed identically, so overwriting them is harmless.
    return jax.lax.dynamic_update_slice(out_4n, jnp.stack(stats), (0, ts))

  out_4n = jax.lax.fori_loop(0, _cdiv(n, bt), token_tile, jnp.zeros((4, n), jnp.float32))
  return tuple(out_4n)


def xla_grads(h_nd: jax.Array, w_dv: jax.Array, y_n: jax.Array, lse_n: jax.Array, mu_n: jax.Array,
              g_logp_n: jax.Array, g_ent_n: jax.Array, *, inv_temp: float, block_t: int,
              block_v: int) -> tuple[jax.Array, jax.Array]:
  """(dh float32 [N, D], dW in W's dtype [D, V]) for this vocabulary slice.

  Vocab tiles outside, token tiles inside: each dW column block is finished (float32) inside one
  outer step and written once, so the only full-size buffer is dW itself; dh is a float32 [N, D]
  carry (O(N)).
  """
  (n, d), v = h_nd.shape, w_dv.shape[1]
  bt, bv = min(block_t, n), min(block_v, v)
  cdt = jnp.promote_types(h_nd.dtype, w_dv.dtype)
  prec = _math.matmul_precision(cdt)

  def vocab_tile(j, carry):
    dh_nd, dw_dv = carry
    vs = _tile_start(j, bv, v)
    w_dc = jax.lax.dynamic_slice(w_dv, (0, vs), (d, bv)).astype(cdt)
    cols_c = vs + jnp.arange(bv)
    col_ok_c = cols_c >= j * bv

    def token_tile(i, inner):
      dh_nd, dw_dc = inner
      ts = _tile_start(i, bt, n)
      rows_t = ts + jnp.arange(bt)
      h_td = jax.lax.dynamic_slice(h_nd, (ts, 0), (bt, d)).astype(cdt)
      y_t, lse_t, mu_t, gl_t, ge_t = (jax.lax.dynamic_slice(a, (ts,), (bt,))
                                      for a in (y_n, lse_n, mu_n, g_logp_n, g_ent_n))
      valid_tc = (rows_t >= i * bt)[:, None] & col_ok_c[None, :]
      x_tc = jnp.dot(h_td, w_dc, preferred_element_type=jnp.float32, precision=prec)
      hit_tc = (cols_c[None, :] == y_t[:, None]) & valid_tc
      dz_tc = (_math.dz_tile(x_tc, valid_tc, hit_tc, lse_t, mu_t, gl_t, ge_t, inv_temp, keep=False)
               * inv_temp).astype(cdt)
      dh_td = jax.lax.dynamic_slice(dh_nd, (ts, 0), (bt, d)) + jax.lax.dot_general(
          dz_tc, w_dc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec)
      dw_dc = dw_dc + jax.lax.dot_general(
          h_td, dz_tc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=prec)
      return jax.lax.dynamic_update_slice(dh_nd, dh_td, (ts, 0)), dw_dc

    dh_nd, dw_dc = jax.lax.fori_loop(0, _cdiv(n, bt), token_tile,
                                     (dh_nd, jnp.zeros((d, bv), jnp.float32)))
    # Columns this shifted tile shares with the previous one already hold their final value.
    old_dc = jax.lax.dynamic_slice(dw_dv, (0, vs), (d, bv))
    new_dc = jnp.where(col_ok_c[None, :], dw_dc.astype(dw_dv.dtype), old_dc)
    return dh_nd, jax.lax.dynamic_update_slice(dw_dv, new_dc, (0, vs))

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros_like(w_dv))
  return jax.lax.fori_loop(0, _cdiv(v, bv), vocab_tile, init)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)
