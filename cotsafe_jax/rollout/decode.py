"""Prefill and one-token decode over per-layer params and KV caches: the sampler without the layer scan.

Inside a while loop the model's scan over stacked layers copies each layer's weights out of the stack every
step (about a third of a CPU decode step); slicing once before the loop and unrolling the layers avoids it.
The prefill reads the same slices, so the layers are copied out of the stack once per `generate`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models import attention, transformer
from cotsafe_jax.parallel import mesh as mesh_lib

# {"kv": [(k [B, kv_heads, head_dim, S], v [B, kv_heads, S, head_dim]) per layer], "mask_bs": [B, S], "pos_b": [B],
#  "index": []}
LayerCache = dict[str, Any]


def decode_params(cfg: models.ModelConfig, params: Any, *, unembedding_vd: bool = False) -> dict[str, Any]:
  """`params` rearranged once, before a decode loop, for `decode_step`.

  "layers" becomes a list of per-layer trees sliced from the scanned (stacked on axis 0) layers. With
  `unembedding_vd`, "unembed_vd" holds the unembedding as [V, D] (the embedding itself when tied, else
  lm_head transposed once): on XLA CPU the per-step [B, D] x [V, D]^T product is faster than [B, D] x [D, V]
  (benchmarks/README.md), at the cost of one [V, D] copy when the head is untied.
  """
  stacked = params["layers"]
  layers = [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(cfg.num_layers)]
  out = {**params, "layers": layers}
  if unembedding_vd:
    out["unembed_vd"] = params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T
  return out


def _constrain(cfg: models.ModelConfig, cache: LayerCache, mesh: Mesh | None) -> LayerCache:
  """Each layer's k / v sharded per `models.KV_CACHE_AXES` (without the layer axis) under `mesh`."""
  if mesh is None:
    return cache
  shapes = models.cache_shapes(cfg, *cache["mask_bs"].shape)
  k_sharding, v_sharding = (mesh_lib.logical_sharding(mesh, axes[1:], shape[1:])
                            for axes, shape in zip(models.KV_CACHE_AXES, shapes))
  kv = jax.lax.with_sharding_constraint(cache["kv"], [(k_sharding, v_sharding)] * len(cache["kv"]))
  return {**cache, "kv": kv}


def decode_step(cfg: models.ModelConfig, dparams: dict[str, Any], token_b: jax.Array,
                cache: LayerCache) -> tuple[jax.Array, LayerCache]:
  """`models.decode_step` with the layers unrolled over `decode_params(cfg, params)`: logits [B, V] f32, cache.

  Same maths, same modules (transformer.Block per layer); tests hold it equal to `models.decode_step`.
  """
  b = token_b.shape[0]
  index = cache["index"]
  key_valid_bs = jax.lax.dynamic_update_slice_in_dim(cache["mask_bs"], jnp.ones((b, 1), bool), index, 1)
  bias_bts = models.attention_bias(key_valid_bs, index[None], jnp.arange(key_valid_bs.shape[1]))
  cos_btd, sin_btd = transformer.rope_cos_sin(cfg, cache["pos_b"][:, None])  # new token's position
  x_btd = jnp.take(dparams["embed"], token_b[:, None], axis=0).astype(cfg.dtype)
  kv = []
  for layer, layer_kv in zip(dparams["layers"], cache["kv"]):
    x_btd, layer_kv = transformer.Block(cfg).apply({"params": layer}, x_btd, layer_kv, cos_btd, sin_btd,
                                                   bias_bts, index)
    kv.append(layer_kv)
  new_cache = {"kv": kv, "mask_bs": key_valid_bs, "pos_b": cache["pos_b"] + 1, "index": index + 1}
  return _logits(cfg, dparams, x_btd[:, 0]), new_cache


def prefill(cfg: models.ModelConfig, dparams: dict[str, Any], tokens_bp: jax.Array, mask_bp: jax.Array,
            slots: int, mesh: Mesh | None = None) -> tuple[jax.Array, LayerCache]:
  """`models.prefill` into a fresh cache of `slots` slots, over `decode_params` layers: (logits [B, V], cache).

  The prompt attends over its own P slots only (not all `slots`: the rest are empty at prefill) and reads the
  per-layer weights the decode loop reads (no second slicing of the stacked layers); each layer's k / v are
  then padded to `slots`. Same maths as `models.prefill` on `models.init_cache(cfg, B, slots)`; tests hold
  the two equal.
  """
  b, p = tokens_bp.shape
  if slots < p:
    raise CotsafeError(f"decode.prefill: slots={slots} is less than the prompt length {p}")
  mask_bp = mask_bp.astype(bool)
  self_mask = attention.SelfMask(mask_bp)  # attention over the prompt's own slots: no [P, P] scores
  cos_btd, sin_btd = transformer.rope_cos_sin(cfg, models.positions_from_mask(mask_bp))
  x_btd = jnp.take(dparams["embed"], tokens_bp, axis=0).astype(cfg.dtype)
  k_shape, v_shape = models.cache_shapes(cfg, b, p)
  dtype = cfg.dtype
  kv = []
  for layer in dparams["layers"]:
    empty = (jnp.zeros(k_shape[1:], dtype), jnp.zeros(v_shape[1:], dtype))
    x_btd, (k_bgks, v_bgsk) = transformer.Block(cfg).apply({"params": layer}, x_btd, empty, cos_btd, sin_btd,
                                                           self_mask, jnp.int32(0))
    kv.append((k_bgks, v_bgsk))
  cache = {"kv": kv, "mask_bs": mask_bp, "pos_b": mask_bp.sum(axis=1, dtype=jnp.int32), "index": jnp.int32(p)}
  return _logits(cfg, dparams, x_btd[:, -1]), grow_cache(cfg, cache, slots, mesh)


def grow_cache(cfg: models.ModelConfig, cache: LayerCache, slots: int, mesh: Mesh | None = None) -> LayerCache:
  """`cache` with every layer's k / v (and the key mask) padded with empty slots up to `slots`."""
  extra = slots - cache["mask_bs"].shape[1]
  if extra < 0:
    raise CotsafeError(f"decode.grow_cache: slots={slots} is less than the cache's "
                       f"{cache['mask_bs'].shape[1]} slots")
  kv = [(jnp.pad(k_bgks, ((0, 0), (0, 0), (0, 0), (0, extra))),
         jnp.pad(v_bgsk, ((0, 0), (0, 0), (0, extra), (0, 0)))) for k_bgks, v_bgsk in cache["kv"]]
  grown = {**cache, "kv": kv, "mask_bs": jnp.pad(cache["mask_bs"], ((0, 0), (0, extra)))}
  return _constrain(cfg, grown, mesh)


def _logits(cfg: models.ModelConfig, dparams: dict[str, Any], x_bd: jax.Array) -> jax.Array:
  """Final norm + unembedding of the last layer's output rows [B, D] -> logits [B, V] in float32."""
  norm = transformer.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
  h_bd = norm.apply({"params": dparams["final_norm"]}, x_bd)
  if "unembed_vd" not in dparams:
    return models.logits_from_hidden(cfg, dparams, h_bd)
  return jnp.einsum("bd,vd->bv", h_bd.astype(cfg.dtype), dparams["unembed_vd"].astype(cfg.dtype),
                    preferred_element_type=jnp.float32)
