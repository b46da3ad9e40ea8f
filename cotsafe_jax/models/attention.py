"""Causal self-attention over a left- / right-padded batch that never holds [T, S] scores.

One entry point, `attend(q, k, v, key_valid_bs, impl=...)`: causal over slots and over real keys only
(`key_valid_bs`: padding is a key that no real query sees). Implementations:
- "chunked": pure JAX flash attention (online softmax over key blocks, query blocks one after another, a
  custom VJP that recomputes each block's probabilities once from the saved log-sum-exp): alive at once are
  [B, heads, block, block] scores. Blocks wholly above the diagonal are skipped. Runs everywhere; CPU default.
- "splash": the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
  padding as segment ids, causal as its lazy mask; TPU default (off TPU: the Pallas interpreter, for tests).
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention`; each row's real tokens are rolled
  to the front (left padding becomes right padding), so lengths express the padding. It needs each row's
  real tokens to be one run (left and / or right padding, as every batch of this project is) and a bf16 / fp16
  compute dtype. GPU default in those dtypes (float32 on GPU: chunked).
- "dense": the [B, heads, T, S] float32 softmax: the reference twin the others are tested against.

A padded query (it never reaches a loss: its outputs only feed later padded slots) gets what each implementation
gives it (0 from "chunked" over several blocks); real queries agree across implementations. Under a mesh, the kernels run per shard
(shard_map over the batch and kv-head axes of the logical rules); "chunked" is plain XLA and partitions itself.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.kernels import decode_attention
from cotsafe_jax.models.config import ATTENTION_IMPLS
from cotsafe_jax.parallel import mesh as mesh_lib

Array = jax.Array
IMPLS = ATTENTION_IMPLS
_NEG = -1e30  # finite: a fully masked row stays NaN-free
_SPLASH_BLOCK = 512  # splash's q / kv tiles at long sequences (multiples of 128; MaxText's defaults)


class SelfMask(NamedTuple):
  """The mask of attention without a KV cache: causal over the sequence's own slots, real keys only."""
  key_valid_bs: Array


def resolve_impl(impl: str, platform: str, dtype: Any = jnp.bfloat16) -> str:
  """auto: splash on TPU; cuDNN on GPU when the compute dtype is bf16 / fp16 (cuDNN's flash attention has no
  float32), else chunked."""
  if impl not in IMPLS:
    raise CotsafeError(f"ModelConfig.attention={impl!r}, expected one of {', '.join(IMPLS)}")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "cudnn" and not half:
    raise CotsafeError(f"ModelConfig.attention='cudnn' with dtype {jnp.dtype(dtype).name}: cuDNN flash attention "
                       "needs bfloat16 or float16 (use 'chunked' or 'auto')")
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "splash"
  return "cudnn" if platform in ("gpu", "cuda") and half else "chunked"


def bias(key_valid_bs: Array, q_slot_t: Array, k_slot_s: Array) -> Array:
  """Additive float32 bias [B, T, S]: 0 where key slot s holds a real token at or before query slot t, else a
  large finite negative. Only for the KV-cache path (a decode step's [B, 1, S]) and the dense reference."""
  ok_bts = (k_slot_s[None, None, :] <= q_slot_t[None, :, None]) & key_valid_bs[:, None, :]
  return jnp.where(ok_bts, 0.0, _NEG).astype(jnp.float32)


def dense(q_btgrk: Array, k_bsgk: Array, v_bsgk: Array, bias_bts: Array, dt: Any) -> Array:
  """softmax(q k^T / sqrt(dh) + bias) v with float32 scores and softmax: [B, kv_heads, group, T, S] scores."""
  scores = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk, preferred_element_type=jnp.float32)
  scores = mesh_lib.constrain(scores / math.sqrt(q_btgrk.shape[-1]) + bias_bts[:, None, None, :, :],
                              ("batch", "act_kv_heads", None, "length", None))
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # softmax in float32
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v_bsgk)


def cached(q_btgrk: Array, kv_segments: Sequence[tuple[Array, Array]], bias_segments: Sequence[Array],
           dt: Any, *, impl: str = "auto") -> Array:
  """Attention of T new queries over a KV cache in segments (layouts: models.cache_shapes, keys [B, kv_heads,
  head_dim, S_j], values [B, kv_heads, S_j, head_dim]) with additive biases [B, T, S_j]: one float32 softmax over
  every segment's scores, the value products summed over segments (in float32 when there are several).

  (query position, head in group) merge into one row axis m, so both dots are plain batched matmuls over (row, kv
  head) that read the cache in place (a one-token decode step has m = group). Where `impl` resolves to splash (TPU)
  a one-token step runs `kernels.decode_attention` instead (same maths; no [rows, S] scores in HBM; off a TPU the
  Pallas interpreter, for tests).
  """
  b, t, g, r, dh = q_btgrk.shape
  mesh = jax.sharding.get_abstract_mesh()
  mesh = None if mesh.empty else mesh
  platform = mesh_lib.target_platform(mesh)
  if t == 1 and resolve_impl(impl, platform, q_btgrk.dtype) == "splash":
    return _decode_kernel(q_btgrk, kv_segments, bias_segments, dt, mesh, interpret=platform != "tpu")
  q_bgmk = q_btgrk.transpose(0, 2, 1, 3, 4).reshape(b, g, t * r, dh)
  scores = [jnp.einsum("bgmk,bgks->bgms", q_bgmk, k_bgks.astype(dt), preferred_element_type=jnp.float32)
            .reshape(b, g, t, r, -1) / math.sqrt(dh) + bias_bts[:, None, :, None, :]
            for (k_bgks, _), bias_bts in zip(kv_segments, bias_segments)]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
  probs = probs.astype(dt).reshape(b, g, t * r, -1)  # softmax in float32
  if len(kv_segments) == 1:
    out_bgmk = jnp.einsum("bgms,bgsk->bgmk", probs, kv_segments[0][1].astype(dt))
  else:
    out_bgmk, start = jnp.zeros((b, g, t * r, dh), jnp.float32), 0
    for _, v_bgsk in kv_segments:
      s = v_bgsk.shape[2]
      out_bgmk += jnp.einsum("bgms,bgsk->bgmk", probs[..., start:start + s], v_bgsk.astype(dt),
                             preferred_element_type=jnp.float32)
      start += s
    out_bgmk = out_bgmk.astype(dt)
  return out_bgmk.reshape(b, g, t, r, dh).transpose(0, 2, 1, 3, 4)


def _decode_kernel(q_b1grk: Array, kv_segments: Sequence[tuple[Array, Array]], bias_segments: Sequence[Array],
                   dt: Any, mesh: Any, *, interpret: bool) -> Array:
  """`kernels.decode_attention`, per shard under a mesh (batch and kv heads as the cache's logical axes split
  them)."""
  kernel = functools.partial(decode_attention.decode_attention, dt=dt, interpret=interpret)
  if mesh is None or mesh.size == 1:
    return kernel(q_b1grk, kv_segments, bias_segments)
  b, _, g = q_b1grk.shape[:3]
  batch, heads = mesh_lib.logical_to_spec(("batch", "kv_heads"), (b, g), mesh)
  q_spec, k_spec, bias_spec = P(batch, None, heads, None, None), P(batch, heads, None, None), P(batch, None, None)
  specs = ([(k_spec, k_spec) for _ in kv_segments], [bias_spec for _ in bias_segments])
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, *specs),
                       out_specs=q_spec, check_vma=False)(q_b1grk, list(kv_segments), list(bias_segments))


def _dense_self(q_btgrk: Array, k_bsgk: Array, v_bsgk: Array, key_valid_bs: Array, dt: Any) -> Array:
  """`dense` over the sequence's own slots (causal, real keys only)."""
  slots = jnp.arange(q_btgrk.shape[1])
  return dense(q_btgrk, k_bsgk, v_bsgk, bias(key_valid_bs, slots, slots), dt)


def attend(q_btgrk: Array, k_bsgk: Array, v_bsgk: Array, key_valid_bs: Array, *, impl: str = "auto",
           block: int = 512, dt: Any = jnp.float32) -> Array:
  """Causal attention of queries [B, T, kv_heads, group, dh] (query heads grouped by their kv head) over keys /
  values [B, T, kv_heads, dh] of the same slots; `key_valid_bs` [B, T] bool marks real tokens. -> [B, T, G, R, dh]."""
  mesh = jax.sharding.get_abstract_mesh()
  mesh = None if mesh.empty else mesh
  platform = mesh_lib.target_platform(mesh)
  impl = resolve_impl(impl, platform, q_btgrk.dtype)
  key_valid_bs = key_valid_bs.astype(bool)
  if impl == "dense":
    return _dense_self(q_btgrk, k_bsgk, v_bsgk, key_valid_bs, dt)
  if impl == "chunked":
    return chunked(q_btgrk, k_bsgk, v_bsgk, key_valid_bs, block=block)
  kernel = cudnn if impl == "cudnn" else functools.partial(splash, interpret=platform != "tpu")
  if mesh is None or mesh.size == 1:
    return kernel(q_btgrk, k_bsgk, v_bsgk, key_valid_bs)
  b, _, g = k_bsgk.shape[:3]
  batch = mesh_lib.logical_to_spec(("batch",), (b,), mesh)[0]
  heads = mesh_lib.logical_to_spec(("act_kv_heads",), (g,), mesh)[0]
  q_spec, kv_spec = P(batch, None, heads, None, None), P(batch, None, heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)), out_specs=q_spec,
                       check_vma=False)(q_btgrk, k_bsgk, v_bsgk, key_valid_bs)


# ---------------------------------------------------------------------------------------------------------------
# chunked: flash attention in plain JAX


def _blocks(x: Array, n: int, block: int, axis: int) -> Array:
  """x padded with zeros along `axis` to n * block and split into a leading axis of n blocks."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * block - x.shape[axis])
  x = jnp.pad(x, pad)
  x = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unblock(x: Array, axis: int, length: int) -> Array:
  """Inverse of _blocks (its leading block axis merged back at `axis`), cut to `length`."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _scores(q_c: Array, k_j: Array, ok_bcs: Array, scale: float) -> Array:
  """Masked float32 scores [B, G, R, c, s] of one query block against one key block."""
  s = jnp.einsum("bcgrk,bsgk->bgrcs", q_c, k_j, preferred_element_type=jnp.float32) * scale
  return jnp.where(ok_bcs[:, None, None], s, _NEG)


def _ok(q_slot_c: Array, k_slot_s: Array, valid_bs: Array) -> Array:
  return (k_slot_s[None, None, :] <= q_slot_c[None, :, None]) & valid_bs[:, None, :]


def _plan(t: int, block: int) -> tuple[int, int]:
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise CotsafeError(f"ModelConfig.attention_block={block!r}, expected a positive int")
  block = min(block, t)
  return -(-t // block), block


def chunked(q_btgrk: Array, k_bsgk: Array, v_bsgk: Array, key_valid_bs: Array, *, block: int = 512) -> Array:
  """Flash attention in blocks of `block` queries and keys. A sequence of one block is the dense softmax (the same
  [block, block] scores, and autodiff without recomputing them: faster on a CPU at short lengths)."""
  n, c = _plan(q_btgrk.shape[1], block)
  if n == 1:
    return _dense_self(q_btgrk, k_bsgk, v_bsgk, key_valid_bs, q_btgrk.dtype)
  return _chunked(n, c, q_btgrk, k_bsgk, v_bsgk, key_valid_bs)


def _chunked_parts(n, c, q, k, v, valid):
  t = q.shape[1]
  slots = jnp.arange(n * c)
  q_n = _blocks(q, n, c, 1)  # [n, B, c, G, R, K]
  k_n, v_n = _blocks(k, n, c, 1), _blocks(v, n, c, 1)  # [n, B, c, G, K]
  valid_n = _blocks(valid, n, c, 1)  # [n, B, c]; padded keys are not valid
  return t, slots.reshape(n, c), q_n, k_n, v_n, valid_n


def _forward(n, c, q, k, v, valid):
  t, slots_nc, q_n, k_n, v_n, valid_n = _chunked_parts(n, c, q, k, v, valid)
  scale = 1.0 / math.sqrt(q.shape[-1])
  b, _, g, r, dh = q.shape

  def one_query_block(args):
    q_c, slot_c, i = args

    def one_key_block(j, carry):
      m, l, acc = carry
      s = _scores(q_c, k_n[j], _ok(slot_c, slots_nc[j], valid_n[j]), scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(s > _NEG / 2, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bgrcs,bsgk->bgrck", p.astype(v.dtype), v_n[j], preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((b, g, r, c), _NEG, jnp.float32), jnp.zeros((b, g, r, c), jnp.float32),
            jnp.zeros((b, g, r, c, dh), jnp.float32))
    # key blocks 0..i: a later one starts after this query block's last slot and holds nothing it may see. A loop
    # with a traced bound, not a cond per block: inside a scan (the layers) under jax.vjp, a cond here made JAX save
    # every (query, key) block pair's scores as residuals (benchmarks/README.md, attention)
    m, l, acc = jax.lax.fori_loop(0, i + 1, one_key_block, init)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse  # [B, G, R, c, K], [B, G, R, c]

  out_n, lse_n = jax.lax.map(one_query_block, (q_n, slots_nc, jnp.arange(n)))
  out = _unblock(jnp.moveaxis(out_n, 4, 2), 1, t)  # [n, B, c, G, R, K] -> [B, T, G, R, K]
  return out, lse_n


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(n, c, q, k, v, valid):
  return _forward(n, c, q, k, v, valid)[0]


def _chunked_fwd(n, c, q, k, v, valid):
  out, lse_n = _forward(n, c, q, k, v, valid)
  return out, (q, k, v, valid, out, lse_n)


def _chunked_bwd(n, c, res, g_out):
  q, k, v, valid, out, lse_n = res
  t, slots_nc, q_n, k_n, v_n, valid_n = _chunked_parts(n, c, q, k, v, valid)
  scale = 1.0 / math.sqrt(q.shape[-1])
  do_n = _blocks(g_out, n, c, 1)  # [n, B, c, G, R, K]
  # D = rowsum(dO * O): the softmax's correction term, per query row, [n, B, G, R, c]
  d_n = jnp.moveaxis(_blocks(jnp.sum(g_out.astype(jnp.float32) * out.astype(jnp.float32), -1), n, c, 1), 2, -1)

  def probs(i, j):
    s = _scores(q_n[i], k_n[j], _ok(slots_nc[i], slots_nc[j], valid_n[j]), scale)
    p = jnp.where(s > _NEG / 2, jnp.exp(s - lse_n[i][..., None]), 0.0)  # [B, G, R, c, s]
    dp = jnp.einsum("bcgrk,bsgk->bgrcs", do_n[i], v_n[j], preferred_element_type=jnp.float32)
    return p, p * (dp - d_n[i][..., None])

  # one pass: key blocks outside, query blocks inside; dq [n, B, c, G, R, K] float32 is carried and added to in
  # place, so each block's probabilities are recomputed once. Key block j is seen by query blocks j..n-1 only.
  def key_block(dq_n, j):
    def step(i, carry):
      dk, dv, dq_n = carry
      p, ds = probs(i, j)
      dv = dv + jnp.einsum("bgrcs,bcgrk->bsgk", p.astype(v.dtype), do_n[i], preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum("bgrcs,bcgrk->bsgk", ds, q_n[i], preferred_element_type=jnp.float32) * scale
      dq_i = jnp.einsum("bgrcs,bsgk->bcgrk", ds, k_n[j], preferred_element_type=jnp.float32) * scale
      return dk, dv, dq_n.at[i].add(dq_i)
    zeros = jnp.zeros(k_n.shape[1:], jnp.float32)
    dk, dv, dq_n = jax.lax.fori_loop(j, n, step, (zeros, zeros, dq_n))
    return dq_n, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq_n, (dk_n, dv_n) = jax.lax.scan(key_block, jnp.zeros(q_n.shape, jnp.float32), jnp.arange(n))
  return (_unblock(dq_n.astype(q.dtype), 1, t), _unblock(dk_n, 1, t), _unblock(dv_n, 1, t), None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------------------------------------
# splash (TPU)


def splash(q_btgrk: Array, k_bsgk: Array, v_bsgk: Array, key_valid_bs: Array, *, interpret: bool = False) -> Array:
  """The Pallas splash kernel per batch row: heads [G * R, T, dh] over kv heads [G, T, dh] (GQA), causal mask,
  padding as segment ids (real 1, padding 0: a padded query sees only padding, so no row is empty).
  `interpret`: off a TPU, the Pallas interpreter (tests)."""
  b, t, g, r, dh = q_btgrk.shape
  blk = _SPLASH_BLOCK if t > _SPLASH_BLOCK else -(-t // 128) * 128
  tp = -(-t // blk) * blk
  pad = ((0, 0), (0, tp - t))
  q = jnp.pad(q_btgrk.reshape(b, t, g * r, dh), pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q = (q.astype(jnp.float32) / math.sqrt(dh)).astype(q_btgrk.dtype)  # the kernel does not scale
  k = jnp.pad(k_bsgk, pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)
  v = jnp.pad(v_bsgk, pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)
  seg = jnp.pad(key_valid_bs.astype(jnp.int32), pad)
  call = functools.partial(_splash_call, blk=blk, interpret=interpret)
  out = (call if q.dtype == jnp.float32 else _at_default_precision(call))(q, k, v, seg)
  return out.transpose(0, 2, 1, 3)[:, :t].reshape(b, t, g, r, dh)


def _splash_call(q_bhtk: Array, k_bgtk: Array, v_bgtk: Array, seg_bt: Array, *, blk: int, interpret: bool) -> Array:
  """The kernel, built here (its mask tables are arrays of the trace that calls it), vmapped over the batch."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  heads, tp = q_bhtk.shape[1], q_bhtk.shape[2]
  mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(heads)])
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(q_bhtk, k_bgtk, v_bgtk,
                                                                                           seg_bt)


def _at_default_precision(fn):
  """fn(q, k, v, segments) with its dots, forward and backward, traced at the default matmul precision: Mosaic has
  no fp32-contract matmul of bf16 operands, which jax_default_matmul_precision="highest" would ask for."""
  def native():
    return jax.default_matmul_precision("default")

  @jax.custom_vjp
  def wrapped(q, k, v, seg):
    with native():
      return fn(q, k, v, seg)

  def fwd(q, k, v, seg):
    with native():
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return out, vjp

  def bwd(vjp, g):
    with native():
      return (*vjp(g), None)

  wrapped.defvjp(fwd, bwd)
  return wrapped


# ---------------------------------------------------------------------------------------------------------------
# cuDNN (GPU)


def _roll_rows(x_bt: Array, shift_b: Array) -> Array:
  """Row b of x rolled left by shift_b[b] along axis 1 (a gather: O(B T) index work, no [T, S] buffer)."""
  t = x_bt.shape[1]
  idx = (jnp.arange(t)[None, :] + shift_b[:, None]) % t
  return jnp.take_along_axis(x_bt, idx.reshape(idx.shape + (1,) * (x_bt.ndim - 2)), axis=1)


def cudnn(q_btgrk: Array, k_bsgk: Array, v_bsgk: Array, key_valid_bs: Array) -> Array:
  """cuDNN flash attention: real tokens rolled to the front of each row, causal + lengths, rolled back."""
  b, t, g, r, dh = q_btgrk.shape
  lead_b = jnp.argmax(key_valid_bs, axis=1).astype(jnp.int32)  # leading padding (0 for an all-padding row)
  length_b = key_valid_bs.sum(axis=1, dtype=jnp.int32)
  q = _roll_rows(q_btgrk.reshape(b, t, g * r, dh), lead_b)
  k, v = _roll_rows(k_bsgk, lead_b), _roll_rows(v_bsgk, lead_b)
  lengths = jnp.maximum(length_b, 1)
  out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(dh), is_causal=True,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation="cudnn")
  return _roll_rows(out, (t - lead_b) % t).reshape(b, t, g, r, dh)

