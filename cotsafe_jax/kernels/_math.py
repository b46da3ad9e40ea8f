"""Per-block maths shared by every fused implementation (XLA loops, Mosaic TPU, Triton).

Plain jnp on one [rows, cols] tile of scaled logits, so the same lines run in all three backends.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def rowsum(x_rc: jax.Array, keep: bool) -> jax.Array:
  return jnp.sum(x_rc, axis=1, keepdims=keep)


def col(x_r: jax.Array, keep: bool) -> jax.Array:
  """A per-row statistic ([rows, 1] when keep, else [rows]) broadcastable against a tile."""
  return x_r if keep else x_r[:, None]


def init_stats(rows: int, keep: bool) -> tuple[jax.Array, ...]:
  shape = (rows, 1) if keep else (rows,)
  zero = jnp.zeros(shape, jnp.float32)
  return (jnp.full(shape, NEG_INF, jnp.float32), zero, zero, zero)


def update_stats(stats: tuple[jax.Array, ...], x_rc: jax.Array, valid_rc: jax.Array,
                 hit_rc: jax.Array, scale: float, keep: bool) -> tuple[jax.Array, ...]:
  """Online logsumexp step: fold one tile of raw logits x = h W into (m, s, u, x_y).

  With z = scale * x: m = running max of x, s = sum exp(z - scale m), u = sum (z - scale m) exp(..),
  x_y = the target's raw logit. Invalid columns (beyond V, block padding) are -inf before max and
  exp and 0 in u; `hit_rc` is the target's one-hot, already restricted to valid columns.
  The max is kept in raw units and shifts are formed as (x - m) * scale: the max column's shift is
  then exactly 0 (a compiler may fuse scale * x - m into one FMA, which is not), so s >= 1 and
  u <= 0 hold in floating point and give logp <= 0, H >= 0 even for very peaked rows.
  """
  m, s, u, xy = stats
  x_rc = jnp.where(valid_rc, x_rc, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(x_rc, axis=1, keepdims=keep))
  shift = (m - m_new) * scale
  alpha = jnp.exp(shift)
  d_rc = (x_rc - col(m_new, keep)) * scale
  e_rc = jnp.exp(d_rc)  # 0 on invalid columns
  # u was relative to the old max: alpha (u + shift s); before the first valid column s = 0 and
  # m = -inf, where that product would be NaN.
  u_old = jnp.where(s > 0, alpha * (u + shift * s), 0.0)
  s_new = alpha * s + rowsum(e_rc, keep)
  u_new = u_old + rowsum(jnp.where(valid_rc, d_rc, 0.0) * e_rc, keep)
  xy_new = xy + rowsum(jnp.where(hit_rc, x_rc, 0.0), keep)
  return m_new, s_new, u_new, xy_new


def finish(m, s, u, xy, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logp, entropy, lse) from the streamed statistics: lse = scale m + log s, H = log s - u / s."""
  log_s = jnp.log(s)
  return (xy - m) * scale - log_s, log_s - u / s, m * scale + log_s


def dz_tile(x_rc: jax.Array, valid_rc: jax.Array, hit_rc: jax.Array, lse: jax.Array, mu: jax.Array,
            g_logp: jax.Array, g_ent: jax.Array, scale: float, keep: bool) -> jax.Array:
  """d loss / d z on one tile of raw logits: g_logp (onehot_y - p) - g_H p (z - mu), z = scale x,
  mu = lse - H = E_p[z]. Zero wherever `valid_rc` is false (padding, which may hold garbage).
  """
  z_rc = jnp.where(valid_rc, x_rc * scale, NEG_INF)
  p_rc = jnp.exp(z_rc - col(lse, keep))
  centred_rc = jnp.where(valid_rc, z_rc - col(mu, keep), 0.0)
  dz_rc = (col(g_logp, keep) * (hit_rc.astype(jnp.float32) - p_rc)
           - col(g_ent, keep) * p_rc * centred_rc)
  return jnp.where(valid_rc, dz_rc, 0.0)


def matmul_precision(dtype) -> jax.lax.Precision:
  """float32 inputs get full-precision products (TPU defaults to bf16 passes); bf16 ones are exact."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
