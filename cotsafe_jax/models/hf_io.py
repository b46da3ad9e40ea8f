"""Hugging Face checkpoint I/O: load an HF dir straight onto shardings; save params as an HF dir.

Safetensors only (never pickle, never remote code). Each device reads only its own slice of each tensor. A dir
may be a gs:// URL: it is read from a local copy and written by uploading a complete local dir.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cotsafe_jax import paths
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models import api
from cotsafe_jax.models.config import ModelConfig
from cotsafe_jax.parallel import distributed

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names a weight may have
MAX_SHARD_BYTES = 2 * 1024**3


def _unreadable(fpath: str, err: Exception) -> CotsafeError:
  detail = str(err).splitlines()[0] if str(err) else type(err).__name__
  return CotsafeError(f"{fpath}: not a readable safetensors file ({detail}), expected a complete file as "
                      "save_pretrained writes it (a truncated or empty copy?)")


def _layout(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable, Callable, tuple[int, ...]]]:
  """param path -> (HF name, ours_from_hf, hf_from_ours, HF shape). Layer names carry `{i}`."""
  d, f, h, k, dh, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.vocab_size)
  ident = (lambda w: w, lambda w: w)
  tr = (lambda w: w.T, lambda w: w.T)

  def qkv(heads):  # HF [heads*dh, d] <-> ours [d, heads, dh]
    return (lambda w: w.T.reshape(d, heads, dh), lambda w: w.reshape(d, heads * dh).T)

  def qkv_bias(heads):
    return (lambda b: b.reshape(heads, dh), lambda b: b.reshape(heads * dh))

  pre = "model.layers.{i}."
  out: dict[tuple[str, ...], tuple[str, Callable, Callable, tuple[int, ...]]] = {
      ("embed",): ("model.embed_tokens.weight", *ident, (v, d)),
      ("final_norm", "scale"): ("model.norm.weight", *ident, (d,)),
      ("layers", "input_norm", "scale"): (pre + "input_layernorm.weight", *ident, (d,)),
      ("layers", "post_attn_norm", "scale"): (pre + "post_attention_layernorm.weight", *ident, (d,)),
      ("layers", "attn", "q_kernel"): (pre + "self_attn.q_proj.weight", *qkv(h), (h * dh, d)),
      ("layers", "attn", "k_kernel"): (pre + "self_attn.k_proj.weight", *qkv(k), (k * dh, d)),
      ("layers", "attn", "v_kernel"): (pre + "self_attn.v_proj.weight", *qkv(k), (k * dh, d)),
      ("layers", "attn", "o_kernel"): (pre + "self_attn.o_proj.weight",
                                       lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T,
                                       (d, h * dh)),
      ("layers", "mlp", "gate_kernel"): (pre + "mlp.gate_proj.weight", *tr, (f, d)),
      ("layers", "mlp", "up_kernel"): (pre + "mlp.up_proj.weight", *tr, (f, d)),
      ("layers", "mlp", "down_kernel"): (pre + "mlp.down_proj.weight", *tr, (d, f)),
  }
  if cfg.qkv_bias:
    for name, heads in (("q", h), ("k", k), ("v", k)):
      out[("layers", "attn", f"{name}_bias")] = (pre + f"self_attn.{name}_proj.bias", *qkv_bias(heads),
                                                 (heads * dh,))
  if cfg.o_bias:
    out[("layers", "attn", "o_bias")] = (pre + "self_attn.o_proj.bias", *ident, (d,))
  if cfg.qk_norm:
    out[("layers", "attn", "q_norm", "scale")] = (pre + "self_attn.q_norm.weight", *ident, (dh,))
    out[("layers", "attn", "k_norm", "scale")] = (pre + "self_attn.k_norm.weight", *ident, (dh,))
  if not cfg.tie_word_embeddings:
    out[("lm_head",)] = ("lm_head.weight", *tr, (v, d))
  return out


def _hf_names(cfg: ModelConfig, path: tuple[str, ...], template: str) -> list[str]:
  return [template.format(i=i) for i in range(cfg.num_layers)] if path[0] == "layers" else [template]


class _Checkpoint:
  """The tensors of a local HF dir: name -> (file, shape), read lazily one tensor at a time."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CotsafeError(f"{index}: not a safetensors index (expected a 'weight_map'): {e}") from None
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files = ["model.safetensors"]
    else:
      pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
      hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" if pickles else ""
      raise CotsafeError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    self.file_of: dict[str, str] = {}
    for fname in files:
      fpath = os.path.join(path, fname)
      if not os.path.exists(fpath):
        raise CotsafeError(f"{index}: names shard {fname}, which is missing from {path}")
      try:
        with safe_open(fpath, framework="np") as f:
          for name in f.keys():
            tensor = f.get_slice(name)
            self.shapes[name], self.dtypes[name] = tuple(tensor.get_shape()), str(tensor.get_dtype())
            self.file_of[name] = fpath
      except SafetensorError as e:  # empty, truncated or not a safetensors file at all
        raise _unreadable(fpath, e) from None

  def get(self, name: str) -> np.ndarray:
    try:
      with safe_open(self.file_of[name], framework="np") as f:
        return f.get_tensor(name)
    except SafetensorError as e:  # the file changed after it was opened
      raise _unreadable(self.file_of[name], e) from None


def _check(cfg: ModelConfig, ckpt: _Checkpoint, layout) -> None:
  expected: dict[str, tuple[int, ...]] = {}
  for path, (template, _, _, shape) in layout.items():
    for name in _hf_names(cfg, path, template):
      expected[name] = shape
  present = {n for n in ckpt.shapes if not n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_word_embeddings:
    present.discard("lm_head.weight")  # tied: the embedding is used
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  misshaped = sorted(f"{n} {list(ckpt.shapes[n])} (expected {list(s)})"
                     for n, s in expected.items() if n in ckpt.shapes and ckpt.shapes[n] != s)
  mistyped = sorted(f"{n} {ckpt.dtypes[n]}" for n in expected if n in ckpt.dtypes
                    and ckpt.dtypes[n] not in _FLOAT_DTYPES)  # e.g. quantised ints: casting them is garbage

  def few(items):
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
  problems = []
  if missing:
    problems.append(f"missing tensors: {few(missing)}")
  if misshaped:
    problems.append(f"mis-shaped tensors: {few(misshaped)}")
  if mistyped:
    problems.append(f"non-float tensors: {few(mistyped)} (expected {', '.join(_FLOAT_DTYPES)})")
  if unexpected:
    problems.append(f"unexpected tensors: {few(unexpected)}")
  if problems:
    raise CotsafeError(f"{ckpt.path}: checkpoint does not match config.json ({cfg.model_type}): "
                       + "; ".join(problems))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def load_hf(path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None,
            compute_dtype: Any = None) -> tuple[ModelConfig, dict]:
  """Load an HF dir (config.json + safetensors) -> (ModelConfig, params) placed on `mesh`.

  Each device's shard is read from the files by a callback, so no device ever holds the whole model. A gs://
  dir is first copied to a local temp dir (once per process).
  """
  path = os.fspath(path)
  if not paths.isdir(path):
    raise CotsafeError(f"{path}: model dir not found (expected a local Hugging Face checkpoint dir)")
  dtype = jnp.dtype(dtype)
  cfg = ModelConfig.from_hf(path, param_dtype=dtype, dtype=jnp.dtype(compute_dtype or dtype))
  layout = _layout(cfg)
  ckpt = _Checkpoint(paths.local_dir(path))
  _check(cfg, ckpt, layout)
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), api.param_shapes(cfg))
  else:
    shardings = api.param_shardings(cfg, mesh)
  shapes = api.param_shapes(cfg)
  params: dict = {}
  for p, (template, ours_from_hf, _, _) in layout.items():
    names = _hf_names(cfg, p, template)
    shape = _get(shapes, p).shape
    stacked = p[0] == "layers"

    def read(index, names=names, conv=ours_from_hf, stacked=stacked):
      if not stacked:
        return np.asarray(conv(ckpt.get(names[0]))[index], dtype=dtype)
      layers = range(len(names))[index[0]]
      return np.stack([np.asarray(conv(ckpt.get(names[i]))[index[1:]], dtype=dtype) for i in layers])
    _set(params, p, jax.make_array_from_callback(shape, _get(shardings, p), read))
  return cfg, params


def save_hf(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, *, tokenizer: Any = None,
            dtype: Any = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Write config.json + safetensors (sharded with an index past `max_shard_bytes`) + tokenizer files.

  Written to a temporary dir and renamed into place (uploaded, for a gs:// dir), so a failed save leaves nothing
  half-written. Every process gathers the params (they may be sharded over all of them); process 0 writes.
  """
  out_dir = os.fspath(out_dir)
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  tensors: dict[str, np.ndarray] = {}
  for p, (template, _, hf_from_ours, _) in _layout(cfg).items():
    value = distributed.to_host(_get(params, p))
    for i, name in enumerate(_hf_names(cfg, p, template)):
      leaf = value[i] if p[0] == "layers" else value
      tensors[name] = np.ascontiguousarray(hf_from_ours(leaf).astype(dtype))
  if jax.process_index() == 0:
    with paths.staged_dir(out_dir) as tmp:
      shards: list[dict[str, np.ndarray]] = [{}]
      size = 0
      for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
          shards.append({})
          size = 0
        shards[-1][name] = t
        size += t.nbytes
      meta = {"format": "pt"}
      if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
      else:
        weight_map = {}
        for j, shard in enumerate(shards):
          fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
          save_file(shard, os.path.join(tmp, fname), metadata=meta)
          weight_map.update({n: fname for n in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
          json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
      hf_cfg = cfg.replace(param_dtype=dtype).to_hf_dict()
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
      if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
          from cotsafe_jax.models.tokenizer import load_tokenizer
          tokenizer = load_tokenizer(tokenizer)
        tokenizer.save_pretrained(tmp)
  distributed.barrier(f"save_hf {out_dir}")  # the others return once the files exist
  return out_dir
