"""The sampler's model side: its weights laid out once for decoding, prefill, and a one-token decode step over a KV
cache kept in segments.

`decode_params` turns training params (layers stacked for the scan, float32 masters, split over fsdp) into what the
sampler reads for a whole rollout: one tree per layer (a loop over the stack would copy each layer's weights out of
it every step), in the compute dtype (cast once, not read as float32 every step), split over tensor only (no FSDP
gather every step). It is built once per rollout (the trainer) or per evaluation and reused by every `generate`
call on the same weights; the log-probs PPO trains on still come from the training pass over the params.

The cache is a list of segments per layer: segment 0 holds the prompt and the first decode phase's slots, segment k
phase k's. All are allocated at prefill; a phase attends over the segments filled so far and writes into its own,
so no phase boundary copies the cache (`attention.cached`: one softmax over every segment's scores).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models import attention, transformer
from cotsafe_jax.parallel import mesh as mesh_lib

# {"kv": [[(k [B, kv_heads, head_dim, S_j], v [B, kv_heads, S_j, head_dim]) per segment j] per layer],
#  "mask": [[B, S_j] per segment], "pos_b": [B], "index": [] (the next slot, counted over all segments)}
LayerCache = dict[str, Any]


@flax.struct.dataclass
class DecodeParams:
  """A policy's weights laid out for sampling (`decode_params`): "embed", "layers" (a list, one tree per layer),
  "final_norm", "lm_head" [D, V] (untied), all in the compute dtype (inside the CPU sampler also "unembed_vd",
  `with_unembedding_vd`); `gathered`: whole on data x fsdp (else split like the training params). Pass it to
  `generate` in place of the params to reuse it across calls."""
  weights: dict[str, Any]
  gathered: bool = flax.struct.field(pytree_node=False, default=True)


def _floating(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _layout(cfg: models.ModelConfig, params: Any, *, gathered: bool = True) -> DecodeParams:
  w = jax.tree.map(lambda x: x.astype(cfg.dtype) if _floating(x) else x, params)  # what every use casts to anyway
  out = {k: v for k, v in w.items() if k != "layers"}
  out["layers"] = [jax.tree.map(lambda x, i=i: x[i], w["layers"]) for i in range(cfg.num_layers)]
  return DecodeParams(out, gathered)


def with_unembedding_vd(cfg: models.ModelConfig, dparams: DecodeParams) -> DecodeParams:
  """`dparams` with "unembed_vd", the unembedding as [V, D] (the embedding itself when tied, else one transposed
  copy of lm_head), which `decode_step` then reads: on XLA CPU the per-step [B, D] x [V, D]^T product is faster
  than [B, D] x [D, V] (benchmarks/README.md). The CPU sampler adds it inside its program, before the loop."""
  w = dparams.weights
  return dparams.replace(weights={**w, "unembed_vd": w["embed"] if cfg.tie_word_embeddings else w["lm_head"].T})


def decode_shardings(cfg: models.ModelConfig, mesh: Mesh, *, gathered: bool = True) -> DecodeParams:
  """Where `decode_params` puts each weight: its logical axes' sharding without data x fsdp (`gathered`: what
  FSDP's per-layer gather makes of it, so a decode step gathers nothing), or with them (the training params'
  split: each step gathers each layer, for chips that cannot hold a whole copy)."""
  axes = models.param_logical_axes(cfg)
  tree = {k: v for k, v in axes.items() if k != "layers"}
  layer_axes = jax.tree.map(lambda a: a[1:], axes["layers"], is_leaf=mesh_lib.is_axes)  # without "layers"
  tree["layers"] = [layer_axes] * cfg.num_layers
  shapes = jax.eval_shape(functools.partial(_layout, cfg), models.param_shapes(cfg))
  return DecodeParams(mesh_lib.tree_shardings(mesh, tree, shapes.weights, gathered=gathered), gathered)


def abstract_decode_params(cfg: models.ModelConfig, mesh: Mesh, *, gathered: bool = True) -> DecodeParams:
  """What `decode_params_program(cfg, mesh, gathered)` returns, as ShapeDtypeStructs on their shardings (nothing
  allocated): the `plan` job compiles `generate` over it."""
  shapes = jax.eval_shape(functools.partial(_layout, cfg, gathered=gathered), models.param_shapes(cfg))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      decode_shardings(cfg, mesh, gathered=gathered))


def mesh_of(params: Any) -> Mesh | None:
  """The mesh the params (or a DecodeParams) are sharded over, if more than one device."""
  leaf = jax.tree.leaves(params)[0]
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


@functools.lru_cache(maxsize=32)
def decode_params_program(cfg: models.ModelConfig, mesh: Mesh | None, gathered: bool = True) -> Any:
  """The jitted layout step (training params -> DecodeParams, resharded to `decode_shardings`); `.lower` over
  abstract params is what the `plan` job compiles."""
  fn = functools.partial(_layout, cfg, gathered=gathered)
  if mesh is None:
    return jax.jit(fn)
  return mesh_lib.OnMesh(jax.jit(fn, in_shardings=(models.param_shardings(cfg, mesh),),
                                 out_shardings=decode_shardings(cfg, mesh, gathered=gathered)), mesh)


def decode_params(cfg: models.ModelConfig, params: Any, *, mesh: Mesh | None = None,
                  gathered: bool = True) -> DecodeParams:
  """`params` laid out for sampling (see the module docstring); a DecodeParams is returned as it is. Under a mesh
  (given, or the params') the layout is split over tensor only and whole on data x fsdp, or (gathered=False) split
  like the params, for chips that cannot hold a whole compute-dtype copy of the weights."""
  if isinstance(params, DecodeParams):
    return params
  mesh = mesh_of(params) if mesh is None else mesh
  return decode_params_program(cfg, mesh, gathered)(params)


def segment_specs(cfg: models.ModelConfig, batch: int, slots: int, mesh: Mesh) -> tuple[P, P]:
  """PartitionSpecs of one cache segment's k [B, kv_heads, head_dim, S] and v [B, kv_heads, S, head_dim] under
  `mesh`, per `models.KV_CACHE_AXES` without the layer axis."""
  return tuple(mesh_lib.logical_to_spec(axes[1:], shape[1:], mesh)
               for axes, shape in zip(models.KV_CACHE_AXES, models.cache_shapes(cfg, batch, slots)))


def constrain_cache(cfg: models.ModelConfig, cache: LayerCache, mesh: Mesh | None) -> LayerCache:
  """Each segment's k / v sharded per `segment_specs` under `mesh`."""
  if mesh is None:
    return cache
  b = cache["pos_b"].shape[0]

  def seg(k_bgks, v_bgsk):
    return tuple(jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
                 for x, spec in zip((k_bgks, v_bgsk), segment_specs(cfg, b, k_bgks.shape[-1], mesh)))
  return {**cache, "kv": [[seg(*kv) for kv in layer] for layer in cache["kv"]]}


def decode_step(cfg: models.ModelConfig, dparams: DecodeParams, token_b: jax.Array, cache: LayerCache, *,
                segments: int | None = None) -> tuple[jax.Array, LayerCache]:
  """`models.decode_step` with the layers unrolled over a DecodeParams: logits [B, V] f32 and the cache.

  The token goes into slot `cache["index"]`, which must lie in the last of the first `segments` segments (default:
  all); attention reads those segments only. Same maths, same modules (transformer.Block per layer); tests hold it
  equal to `models.decode_step`.
  """
  w = dparams.weights
  b = token_b.shape[0]
  masks = list(cache["mask"])
  n = len(masks) if segments is None else segments
  sizes = [m.shape[1] for m in masks]
  offsets = [sum(sizes[:j]) for j in range(n)]
  index = cache["index"]
  local = index - offsets[-1]  # the slot within the segment written
  masks[n - 1] = jax.lax.dynamic_update_slice_in_dim(masks[n - 1], jnp.ones((b, 1), bool), local, 1)
  bias = [models.attention_bias(masks[j], index[None], offsets[j] + jnp.arange(sizes[j])) for j in range(n)]
  cos_btd, sin_btd = transformer.rope_cos_sin(cfg, cache["pos_b"][:, None])  # new token's position
  x_btd = jnp.take(w["embed"], token_b[:, None], axis=0).astype(cfg.dtype)
  kv = []
  for layer, layer_kv in zip(w["layers"], cache["kv"]):
    x_btd, segs = transformer.Block(cfg).apply({"params": layer}, x_btd, list(layer_kv[:n]), cos_btd, sin_btd,
                                               bias, local)
    kv.append(list(segs) + list(layer_kv[n:]))
  new_cache = {"kv": kv, "mask": masks, "pos_b": cache["pos_b"] + 1, "index": index + 1}
  return _logits(cfg, w, x_btd[:, 0]), new_cache


def prefill(cfg: models.ModelConfig, dparams: DecodeParams, tokens_bp: jax.Array, mask_bp: jax.Array,
            slots: int | Sequence[int], mesh: Mesh | None = None) -> tuple[jax.Array, LayerCache]:
  """`models.prefill` into a fresh cache: (logits [B, V], cache). `slots`: the cache's size, or its segments'
  sizes (the first holds the prompt); every segment is allocated here.

  The prompt attends over its own P slots only (not the empty rest) and its k / v are written into segment 0 in
  place. Same maths as `models.prefill` on `models.init_cache(cfg, B, sum(slots))`; tests hold the two equal.
  """
  w = dparams.weights
  b, p = tokens_bp.shape
  sizes = [slots] if isinstance(slots, int) else [int(s) for s in slots]
  if sizes[0] < p or min(sizes) < 0:
    raise CotsafeError(f"decode.prefill: cache segments {sizes} (expected the first >= the prompt length {p})")
  mask_bp = mask_bp.astype(bool)
  self_mask = attention.SelfMask(mask_bp)  # attention over the prompt's own slots: no [P, P] scores
  cos_btd, sin_btd = transformer.rope_cos_sin(cfg, models.positions_from_mask(mask_bp))
  x_btd = jnp.take(w["embed"], tokens_bp, axis=0).astype(cfg.dtype)
  dtype = cfg.dtype

  def empty(s):
    k_shape, v_shape = models.cache_shapes(cfg, b, s)
    return jnp.zeros(k_shape[1:], dtype), jnp.zeros(v_shape[1:], dtype)
  kv = []
  for layer in w["layers"]:
    x_btd, first = transformer.Block(cfg).apply({"params": layer}, x_btd, empty(sizes[0]), cos_btd, sin_btd,
                                                self_mask, jnp.int32(0))
    kv.append([first] + [empty(s) for s in sizes[1:]])
  masks = [jnp.pad(mask_bp, ((0, 0), (0, sizes[0] - p)))] + [jnp.zeros((b, s), bool) for s in sizes[1:]]
  cache = {"kv": kv, "mask": masks, "pos_b": mask_bp.sum(axis=1, dtype=jnp.int32), "index": jnp.int32(p)}
  return _logits(cfg, w, x_btd[:, -1]), constrain_cache(cfg, cache, mesh)


def _logits(cfg: models.ModelConfig, w: dict[str, Any], x_bd: jax.Array) -> jax.Array:
  """Final norm + unembedding of the last layer's output rows [B, D] -> logits [B, V] in float32."""
  norm = transformer.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
  h_bd = norm.apply({"params": w["final_norm"]}, x_bd)
  if "unembed_vd" not in w:
    return models.logits_from_hidden(cfg, w, h_bd)
  return jnp.einsum("bd,vd->bv", h_bd.astype(cfg.dtype), w["unembed_vd"].astype(cfg.dtype),
                    preferred_element_type=jnp.float32)
