"""Functional model API over plain param pytrees: init (born sharded), forward, hidden states, KV cache.

Positions come from the attention mask, so a left-padded row computes exactly what its unpadded sequence does.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cotsafe_jax.models.config import ModelConfig
from cotsafe_jax.models.attention import SelfMask, bias as attention_bias
from cotsafe_jax.models.transformer import Decoder
from cotsafe_jax.parallel import mesh as mesh_lib

Params = Any
Cache = dict[str, jax.Array]


def _abstract_boxed(cfg: ModelConfig):
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda r, t: Decoder(cfg).init(r, t, method=Decoder.init_all),
                        jax.random.key(0), tokens)["params"]


def param_logical_axes(cfg: ModelConfig) -> Any:
  """Pytree (like params) of logical-axis tuples, e.g. ("layers", "embed", "heads", "head_dim")."""
  specs = nn.get_partition_spec(_abstract_boxed(cfg))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shapes(cfg: ModelConfig) -> Any:
  """Pytree of jax.ShapeDtypeStruct for the params (no memory allocated)."""
  return nn.meta.unbox(_abstract_boxed(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
  return mesh_lib.tree_shardings(mesh, param_logical_axes(cfg), param_shapes(cfg))


@functools.lru_cache(maxsize=32)
def _init_fn(cfg: ModelConfig, mesh: Mesh | None):
  def init(r):
    boxed = Decoder(cfg).init(r, jnp.zeros((1, 1), jnp.int32), method=Decoder.init_all)["params"]
    return nn.meta.unbox(boxed)
  shardings = None if mesh is None else param_shardings(cfg, mesh)
  return jax.jit(init, out_shardings=shardings)  # one compile per (config, mesh)


def init_params(cfg: ModelConfig, rng: jax.Array, *, mesh: Mesh | None = None) -> Params:
  """Random params, created directly on their shardings when a mesh is given."""
  return _init_fn(cfg, mesh)(rng)


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
  """0-based position of each real token; left padding gets position 0."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnums=0)
def hidden_states(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, *,
                  attention_mask_bt: jax.Array | None = None) -> jax.Array:
  """Final-norm hidden states [B, T, D] in the compute dtype (what the fused log-prob op consumes).
  `attention_mask_bt`: each row's real tokens are one run (left and / or right padding), as cuDNN needs."""
  mask_bt = jnp.ones(tokens_bt.shape, bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
  h_btd, _ = Decoder(cfg).apply({"params": params}, tokens_bt, positions_from_mask(mask_bt), SelfMask(mask_bt))
  return h_btd


def unembedding(cfg: ModelConfig, params: Params) -> jax.Array:
  """The [D, V] unembedding matrix (the transposed embedding when tied)."""
  return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(cfg: ModelConfig, params: Params, h_btd: jax.Array) -> jax.Array:
  w_dv = unembedding(cfg, params).astype(cfg.dtype)
  return jnp.einsum("...d,dv->...v", h_btd.astype(cfg.dtype), w_dv, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, *,
            attention_mask_bt: jax.Array | None = None) -> jax.Array:
  """Logits [B, T, V] in float32. Materialises the logits: for training use hidden_states + the fused op."""
  h_btd = hidden_states(cfg, params, tokens_bt, attention_mask_bt=attention_mask_bt)
  return logits_from_hidden(cfg, params, h_btd)


def cache_shapes(cfg: ModelConfig, batch_size: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of the k and v caches: k [L, B, kv_heads, head_dim, S], v [L, B, kv_heads, S, head_dim].

  Keys are stored transposed so the decode attention reads q . k^T as [head_dim, S] per (row, kv head) and
  p . v as [S, head_dim]: both dots read the cache in place, with no per-step transpose of the whole cache.
  """
  n, k, dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  return (n, batch_size, k, dh, max_len), (n, batch_size, k, max_len, dh)


# logical axes of the k and v caches, in the layouts of cache_shapes
KV_CACHE_AXES = (("layers", "batch", "kv_heads", "head_dim", "cache_length"),
                 ("layers", "batch", "kv_heads", "cache_length", "head_dim"))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: Any = None,
               mesh: Mesh | None = None) -> Cache:
  """An empty KV cache of `max_len` slots (layouts: `cache_shapes`)."""
  k_shape, v_shape = cache_shapes(cfg, batch_size, max_len)
  dtype = cfg.dtype if dtype is None else dtype
  cache = {"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype),
           "mask_bs": jnp.zeros((batch_size, max_len), bool),
           "pos_b": jnp.zeros((batch_size,), jnp.int32), "index": jnp.zeros((), jnp.int32)}
  if mesh is not None:
    cache = jax.device_put(cache, cache_shardings(cfg, mesh, batch_size, max_len))
  return cache


def cache_shardings(cfg: ModelConfig, mesh: Mesh, batch_size: int, max_len: int) -> dict[str, Any]:
  k_shape, v_shape = cache_shapes(cfg, batch_size, max_len)
  return {"k": mesh_lib.logical_sharding(mesh, KV_CACHE_AXES[0], k_shape),
          "v": mesh_lib.logical_sharding(mesh, KV_CACHE_AXES[1], v_shape),
          "mask_bs": mesh_lib.logical_sharding(mesh, ("batch", "cache_length"), (batch_size, max_len)),
          "pos_b": mesh_lib.logical_sharding(mesh, ("batch",), (batch_size,)),
          "index": mesh_lib.replicated(mesh)}


def extend(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, mask_bt: jax.Array,
           cache: Cache) -> tuple[jax.Array, Cache]:
  """Append T tokens (mask 0 = padding) at the cache's next slots; returns hidden [B, T, D] and the cache."""
  t = tokens_bt.shape[1]
  mask_bt = mask_bt.astype(bool)
  index = cache["index"]
  key_valid_bs = jax.lax.dynamic_update_slice_in_dim(cache["mask_bs"], mask_bt, index, 1)
  slots_t = index + jnp.arange(t)
  bias_bts = attention_bias(key_valid_bs, slots_t, jnp.arange(cache["mask_bs"].shape[1]))
  positions_bt = jnp.maximum(cache["pos_b"][:, None] + jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1, 0)
  h_btd, (k, v) = Decoder(cfg).apply({"params": params}, tokens_bt, positions_bt, bias_bts,
                                     (cache["k"], cache["v"]), index)
  new_cache = {"k": k, "v": v, "mask_bs": key_valid_bs,
               "pos_b": cache["pos_b"] + mask_bt.sum(axis=1, dtype=jnp.int32), "index": index + t}
  return h_btd, new_cache


def prefill(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, attention_mask_bt: jax.Array,
            cache: Cache) -> tuple[jax.Array, Cache]:
  """Run a left-padded prompt batch into the cache; returns the last position's logits [B, V] (float32)."""
  h_btd, cache = extend(cfg, params, tokens_bt, attention_mask_bt, cache)
  return logits_from_hidden(cfg, params, h_btd[:, -1]), cache


def decode_step(cfg: ModelConfig, params: Params, token_b: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """One new token per row; returns next-token logits [B, V] (float32) and the cache."""
  h_btd, cache = extend(cfg, params, token_b[:, None], jnp.ones((token_b.shape[0], 1), bool), cache)
  return logits_from_hidden(cfg, params, h_btd[:, 0]), cache
