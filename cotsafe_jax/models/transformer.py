"""Flax linen decoder for Llama 3.x / Qwen2 / Qwen3: RMSNorm, RoPE (llama3 scaling), GQA, SwiGLU, KV cache.

Layers are scanned (params stacked on a leading "layers" axis) so deep models compile once per layer shape,
under a rematerialisation policy (`ModelConfig.remat`). Every weight names its logical axes and is gathered
per layer over fsdp where it is used; activations carry sharding constraints (parallel.mesh, active under
`jax.set_mesh`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cotsafe_jax.models import attention as attention_lib
from cotsafe_jax.models.config import ModelConfig
from cotsafe_jax.parallel.mesh import constrain, gather_weight

Array = jax.Array
_BTD = ("batch", "length", "act_embed")


def _param(mod: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init: Callable, dtype: Any) -> Array:
  """The param, all-gathered over fsdp for use here (its stored form stays split; see gather_weight)."""
  return gather_weight(mod.param(name, nn.with_logical_partitioning(init, axes), shape, dtype), axes)


def remat_policy(name: str) -> Callable | None:
  """What a scanned layer keeps for the backward pass. "full": only its input (everything recomputed);
  "save_dots": the outputs of its weight matmuls (dots without batch dims), elementwise work and attention
  softmax recomputed. "none" (no remat) is handled by the caller."""
  return {"full": jax.checkpoint_policies.nothing_saveable,
          "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class RMSNorm(nn.Module):
  dim: int
  eps: float
  param_dtype: Any
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", (self.dim,), (self.axis_name,), nn.initializers.ones, self.param_dtype)
    x32 = x.astype(jnp.float32)  # float32 statistics whatever the compute dtype
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # the scale rounded to the compute dtype first (as transformers does in bf16): float32 master params and a
    # frozen copy stored in the compute dtype then give bit-identical outputs
    return (scale.astype(x.dtype).astype(jnp.float32) * y).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies [head_dim/2] in float32, with Llama 3.1 scaling when configured."""
  dh = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  sc = cfg.rope_scaling_dict
  if sc is None:
    return inv
  factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
  old = sc["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, positions_bt: Array) -> tuple[Array, Array]:
  freqs_btk = positions_bt.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)[None, None, :]
  emb_btd = jnp.concatenate([freqs_btk, freqs_btk], axis=-1)  # HF rotate_half layout
  return jnp.cos(emb_btd), jnp.sin(emb_btd)


def _apply_rope(x_bthd: Array, cos_btd: Array, sin_btd: Array) -> Array:
  x = x_bthd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos_btd[:, :, None, :] + rot * sin_btd[:, :, None, :]).astype(x_bthd.dtype)


def _written(kv_cache: tuple[Array, Array], k_btgk: Array, v_btgk: Array, index: Array) -> tuple[Array, Array]:
  """The cache (layouts: models.cache_shapes) with the new keys / values written at slot `index` onwards."""
  ck_bgks, cv_bgsk = kv_cache
  ck_bgks = jax.lax.dynamic_update_slice_in_dim(ck_bgks, k_btgk.transpose(0, 2, 3, 1).astype(ck_bgks.dtype), index, 3)
  cv_bgsk = jax.lax.dynamic_update_slice_in_dim(cv_bgsk, v_btgk.transpose(0, 2, 1, 3).astype(cv_bgsk.dtype), index, 2)
  return ck_bgks, cv_bgsk


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, cos_btd: Array, sin_btd: Array, bias_bts: Array,
               kv_cache: tuple[Array, Array] | None, cache_index: Array | None):
    cfg = self.cfg
    d, h, k, dh, dt, pdt = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                            cfg.param_dtype)
    init = nn.initializers.normal(0.02)

    def proj(name, heads, axes):
      w = _param(self, f"{name}_kernel", (d, heads, dh), ("embed", axes, "head_dim"), init, pdt)
      y = jnp.einsum("btd,dhk->bthk", x_btd, w.astype(dt))
      if cfg.qkv_bias:
        y = y + _param(self, f"{name}_bias", (heads, dh), (axes, "head_dim"), nn.initializers.zeros,
                       pdt).astype(dt)
      return y

    q_bthk, k_btgk, v_btgk = proj("q", h, "heads"), proj("k", k, "kv_heads"), proj("v", k, "kv_heads")
    q_bthk = constrain(q_bthk, ("batch", "length", "act_heads", "head_dim"))
    k_btgk = constrain(k_btgk, ("batch", "length", "act_kv_heads", "head_dim"))
    v_btgk = constrain(v_btgk, ("batch", "length", "act_kv_heads", "head_dim"))
    if cfg.qk_norm:
      q_bthk = RMSNorm(dh, cfg.rms_norm_eps, pdt, "head_dim", name="q_norm")(q_bthk)
      k_btgk = RMSNorm(dh, cfg.rms_norm_eps, pdt, "head_dim", name="k_norm")(k_btgk)
    q_bthk = _apply_rope(q_bthk, cos_btd, sin_btd)
    k_btgk = _apply_rope(k_btgk, cos_btd, sin_btd)

    b, t = q_bthk.shape[:2]
    r = h // k  # query heads per kv head
    q_btgrk = q_bthk.reshape(b, t, k, r, dh)  # query heads grouped by their kv head
    # SelfMask: no [T, S] scores (training, scoring; with a cache, a prefill into an empty one: the keys are the
    # new tokens only); a bias array: the KV-cache path below (a decode step's [B, 1, S])
    if isinstance(bias_bts, attention_lib.SelfMask):
      out_btgrk = attention_lib.attend(q_btgrk, k_btgk, v_btgk, bias_bts.key_valid_bs, impl=cfg.attention,
                                       block=cfg.attention_block, dt=dt)
      new_cache = None if kv_cache is None else _written(kv_cache, k_btgk, v_btgk, cache_index)
    elif kv_cache is None:
      new_cache = None
      out_btgrk = attention_lib.dense(q_btgrk, k_btgk, v_btgk, bias_bts, dt)
    else:  # a KV cache (layouts: models.cache_shapes), or a list of its segments (the sampler's) with a bias each
      segments = list(kv_cache) if isinstance(kv_cache, list) else [kv_cache]
      biases = list(bias_bts) if isinstance(kv_cache, list) else [bias_bts]
      segments[-1] = _written(segments[-1], k_btgk, v_btgk, cache_index)  # the new tokens go into the last one
      out_btgrk = attention_lib.cached(q_btgrk, segments, biases, dt, impl=cfg.attention)
      new_cache = segments if isinstance(kv_cache, list) else segments[0]
    out_bthk = out_btgrk.reshape(b, t, h, dh)
    wo = _param(self, "o_kernel", (h, dh, d), ("heads", "head_dim", "embed"), init, pdt)
    y_btd = jnp.einsum("bthk,hkd->btd", out_bthk, wo.astype(dt))
    if cfg.o_bias:
      y_btd = y_btd + _param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros, pdt).astype(dt)
    return constrain(y_btd, _BTD), new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array) -> Array:
    cfg = self.cfg
    d, f, dt, pdt = cfg.hidden_size, cfg.intermediate_size, cfg.dtype, cfg.param_dtype
    init = nn.initializers.normal(0.02)
    wg = _param(self, "gate_kernel", (d, f), ("embed", "mlp"), init, pdt)
    wu = _param(self, "up_kernel", (d, f), ("embed", "mlp"), init, pdt)
    wd = _param(self, "down_kernel", (f, d), ("mlp", "embed"), init, pdt)
    g_btf = constrain(jnp.einsum("btd,df->btf", x_btd, wg.astype(dt)), ("batch", "length", "act_mlp"))
    u_btf = constrain(jnp.einsum("btd,df->btf", x_btd, wu.astype(dt)), ("batch", "length", "act_mlp"))
    return constrain(jnp.einsum("btf,fd->btd", nn.silu(g_btf) * u_btf, wd.astype(dt)), _BTD)


class Block(nn.Module):
  """One pre-norm decoder layer; scanned over layers (carry: hidden; xs: this layer's KV cache)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, layer_cache, cos_btd, sin_btd, bias_bts, cache_index):
    cfg = self.cfg
    kv = layer_cache if layer_cache else None
    h_btd = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, name="input_norm")(x_btd)
    a_btd, new_kv = Attention(cfg, name="attn")(h_btd, cos_btd, sin_btd, bias_bts, kv, cache_index)
    x_btd = x_btd + a_btd
    h_btd = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, name="post_attn_norm")(x_btd)
    x_btd = constrain(x_btd + MLP(cfg, name="mlp")(h_btd), _BTD)
    return x_btd, (new_kv if new_kv is not None else ())


class Decoder(nn.Module):
  """Embedding -> scanned blocks -> final norm. Returns final hidden states [B, T, D] (compute dtype)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                  ("vocab", "embed")),
                            (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
    block = Block if cfg.remat == "none" else nn.remat(Block, prevent_cse=False, policy=remat_policy(cfg.remat))
    self.layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, name="final_norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                        ("embed", "vocab")),
                                (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)

  def __call__(self, tokens_bt: Array, positions_bt: Array, bias_bts: Array,
               cache_kv: tuple[Array, Array] | tuple = (), cache_index: Array | None = None):
    cfg = self.cfg
    # the table stays split over fsdp on d_model: every device looks up all of the micro-batch's (replicated)
    # token ids in its slice of d_model, then one all-to-all makes the rows batch-split; the gradient is a
    # scatter-add into the local slice, so no device ever holds the whole [V, D] table or its gradient
    tokens_bt = constrain(tokens_bt, (None, None))
    x_btd = constrain(jnp.take(self.embed, tokens_bt, axis=0).astype(cfg.dtype), _BTD)
    cos_btd, sin_btd = rope_cos_sin(cfg, positions_bt)
    x_btd, new_cache = self.layers(x_btd, cache_kv, cos_btd, sin_btd, bias_bts, cache_index)
    return self.final_norm(x_btd), new_cache

  def unembedding(self) -> Array:
    return self.embed.T if self.cfg.tie_word_embeddings else self.lm_head

  def init_all(self, tokens_bt: Array):
    positions = jnp.zeros_like(tokens_bt)
    h, _ = self(tokens_bt, positions, attention_lib.SelfMask(jnp.ones(tokens_bt.shape, bool)))
    return h, self.unembedding()
