"""One decode step's attention over a KV cache on TPU (Pallas / Mosaic), without [rows, S] scores in HBM.

The XLA form of the sampler's cached attention (`models.attention.cached`) writes float32 scores [B, kv_heads,
group, S] per layer and reads them back for the softmax and the value product: at 16k cache slots that is more
traffic than the step's weights. Here one program per (row, kv head) streams the cache in blocks of S with an
online softmax: scores of a block live in VMEM only, and the cache is read once. A segmented cache (the sampler's
decode phases) runs one call per segment; the segments' partial results combine by their logsumexp.

Twin: `models.attention.cached` (the XLA form); tests hold the two equal in the Pallas interpreter.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cotsafe_jax.kernels import _math

BLOCK_S = 2048  # cache slots per block: 2 x 128 x 2048 bf16 of k / v (1 MiB) per program step
_LANES = 128


def _kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, s: int, bs: int,
            scale: float):
  j = pl.program_id(2)
  prec = _math.matmul_precision(k_ref.dtype)  # explicit: Mosaic has no fp32-contract matmul of bf16 operands

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  q_mk = q_ref[0, 0]
  v_sk = v_ref[0, 0]
  sc_ms = jnp.dot(q_mk, k_ref[0, 0], preferred_element_type=jnp.float32, precision=prec) * scale + bias_ref[0]
  if s % bs:  # the last block runs past S: its columns / value rows there hold garbage (never every column)
    sc_ms = jnp.where(j * bs + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1) < s, sc_ms, -jnp.inf)
    v_sk = jnp.where(j * bs + jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0) < s, v_sk, 0)
  m_prev = m_scr[:, :1]
  m_new = jnp.maximum(m_prev, jnp.max(sc_ms, axis=1, keepdims=True))
  p_ms = jnp.exp(sc_ms - m_new)
  alpha = jnp.exp(m_prev - m_new)  # 0 on the first block (m_prev = -inf, m_new finite)
  l_new = alpha * l_scr[:, :1] + jnp.sum(p_ms, axis=1, keepdims=True)
  acc_scr[...] = alpha * acc_scr[...] + jnp.dot(p_ms.astype(v_sk.dtype), v_sk, preferred_element_type=jnp.float32,
                                                precision=prec)
  m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
  l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

  @pl.when(j == pl.num_programs(2) - 1)
  def _done():
    l_m1 = l_scr[:, :1]  # >= 1: the max column contributes exp(0)
    o_ref[0, 0] = acc_scr[...] / l_m1
    lse_ref[0, 0] = jnp.broadcast_to(m_scr[:, :1] + jnp.log(l_m1), lse_ref.shape[2:])


def _segment(q_bgmk: jax.Array, k_bgks: jax.Array, v_bgsk: jax.Array, bias_b1s: jax.Array, *, interpret: bool,
             block_s: int) -> tuple[jax.Array, jax.Array]:
  """(out [B, G, M, dh] float32 normalised over this segment, lse [B, G, M] float32)."""
  b, g, m, dh = q_bgmk.shape
  s = k_bgks.shape[-1]
  bs = s if s <= block_s else block_s
  itemsize = jnp.dtype(k_bgks.dtype).itemsize
  cost = pl.CostEstimate(flops=4 * b * g * m * s * dh, transcendentals=b * g * m * s,
                         bytes_accessed=2 * b * g * s * dh * itemsize + b * s * 4 + b * g * m * dh * (itemsize + 4)
                         + b * g * m * _LANES * 4)
  out, lse = pl.pallas_call(
      functools.partial(_kernel, s=s, bs=bs, scale=1.0 / math.sqrt(dh)),
      grid=(b, g, pl.cdiv(s, bs)),
      in_specs=[pl.BlockSpec((1, 1, m, dh), lambda i, h, j: (i, h, 0, 0)),
                pl.BlockSpec((1, 1, dh, bs), lambda i, h, j: (i, h, 0, j)),
                pl.BlockSpec((1, 1, bs, dh), lambda i, h, j: (i, h, j, 0)),
                pl.BlockSpec((1, 1, bs), lambda i, h, j: (i, 0, j))],
      out_specs=[pl.BlockSpec((1, 1, m, dh), lambda i, h, j: (i, h, 0, 0)),
                 pl.BlockSpec((1, 1, m, _LANES), lambda i, h, j: (i, h, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, g, m, dh), jnp.float32),
                 jax.ShapeDtypeStruct((b, g, m, _LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((m, _LANES), jnp.float32), pltpu.VMEM((m, _LANES), jnp.float32),
                      pltpu.VMEM((m, dh), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="decode_attention",
  )(q_bgmk, k_bgks, v_bgsk, bias_b1s)
  return out, lse[..., 0]


def decode_attention(q_b1grk: jax.Array, kv_segments: Sequence[tuple[jax.Array, jax.Array]],
                     bias_segments: Sequence[jax.Array], dt: Any, *, interpret: bool = False,
                     block_s: int = BLOCK_S) -> jax.Array:
  """One new query per row [B, 1, kv_heads, group, dh] over cache segments (keys [B, kv_heads, dh, S_j], values
  [B, kv_heads, S_j, dh]) with additive biases [B, 1, S_j] -> [B, 1, kv_heads, group, dh] in `dt`. Same maths as
  `models.attention.cached` (float32 scores and softmax, probabilities in the value dtype for the product)."""
  b, t, g, r, dh = q_b1grk.shape
  assert t == 1, q_b1grk.shape
  m = -(-r // 8) * 8  # query rows per (row, kv head), padded to a sublane multiple
  q_bgmk = jnp.pad(q_b1grk[:, 0], ((0, 0), (0, 0), (0, m - r), (0, 0)))
  parts = [_segment(q_bgmk.astype(k.dtype), k, v, bias.astype(jnp.float32), interpret=interpret, block_s=block_s)
           for (k, v), bias in zip(kv_segments, bias_segments)]
  if len(parts) == 1:
    out_bgmk = parts[0][0]
  else:  # each segment normalised over itself: reweigh by exp(lse_j - lse)
    lse_jbgm = jnp.stack([lse for _, lse in parts])
    w_jbgm = jnp.exp(lse_jbgm - jax.nn.logsumexp(lse_jbgm, axis=0))
    out_bgmk = sum(w[..., None] * o for w, (o, _) in zip(w_jbgm, parts))
  return out_bgmk[:, None, :, :r].astype(dt)
