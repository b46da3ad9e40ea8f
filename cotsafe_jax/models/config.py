"""ModelConfig for the Llama 3.x, Qwen2/2.5 and Qwen3 decoder families, read from HF config.json.

Both config layouts are read: transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from cotsafe_jax.errors import CotsafeError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ATTENTION_IMPLS = ("auto", "chunked", "splash", "cudnn", "dense")  # models.attention.IMPLS
REMAT_POLICIES = ("none", "full", "save_dots")  # models.transformer.remat_policy
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer; `dtype` is the compute dtype, `param_dtype` storage.
  `remat`: what each layer keeps for the backward pass, one of REMAT_POLICIES (True / False read as
  "full" / "none"). `attention`: the attention without a KV cache (training, scoring, prefill), one of
  models.attention.IMPLS ("auto": splash on TPU, cuDNN on GPU, "chunked" elsewhere; none holds [T, S] scores);
  where it resolves to splash, one-token decode steps over the KV cache run kernels.decode_attention.
  `attention_block`: the query / key block of "chunked" (scores alive at once: [block, block] per head)."""
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3: factor, low/high_freq_factor, original_max
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  remat: str = "none"
  attention: str = "auto"
  attention_block: int = 512

  def __post_init__(self):
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if isinstance(self.attention_block, bool) or not isinstance(self.attention_block, int) or self.attention_block < 1:
      raise CotsafeError(f"ModelConfig.attention_block={self.attention_block!r}, expected a positive int")
    if self.attention not in ATTENTION_IMPLS:
      raise CotsafeError(f"ModelConfig.attention={self.attention!r}, expected one of {', '.join(ATTENTION_IMPLS)}")
    if self.remat not in REMAT_POLICIES:
      raise CotsafeError(f"ModelConfig.remat={self.remat!r}, expected one of {', '.join(REMAT_POLICIES)}")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise CotsafeError(f"unknown model_type {self.model_type!r} "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if self.num_heads % self.num_kv_heads:
      raise CotsafeError(f"num_attention_heads={self.num_heads} is not a multiple of "
                         f"num_key_value_heads={self.num_kv_heads}")

  @property
  def rope_scaling_dict(self) -> dict[str, float] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def num_params(self) -> int:
    d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
    attn += 2 * self.head_dim if self.qk_norm else 0
    layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + l * layer + d

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf(cls, dir_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
    """From an HF model dir (its config.json) or a config dict; unsupported options are errors."""
    if isinstance(dir_or_dict, Mapping):
      hf, where = dict(dir_or_dict), "config"
    else:
      from cotsafe_jax import paths
      path = os.fspath(dir_or_dict)
      where = path if path.endswith(".json") else os.path.join(path, "config.json")
      if not paths.exists(where):
        raise CotsafeError(f"{where}: not found (expected a Hugging Face model dir with config.json)")
      try:
        hf = json.loads(paths.read_text(where))
      except json.JSONDecodeError as e:
        raise CotsafeError(f"{where}: not valid JSON ({e})") from None
    return cls(**{**_parse_hf(hf, where), **overrides})

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json content (transformers 5 layout, also read by transformers 4.45+)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling_dict}
      rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    out: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": self.rope_theta,
        "dtype": jnp.dtype(self.param_dtype).name,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.rope_scaling is not None:
      out["rope_scaling"] = dict(rope)
    if self.model_type in ("llama", "qwen3"):
      out["attention_bias"] = self.o_bias
    if self.model_type in ("qwen2", "qwen3"):
      out["use_sliding_window"] = False
      out["sliding_window"] = None
      out["layer_types"] = ["full_attention"] * self.num_layers
      out["max_window_layers"] = self.num_layers
    return out


def _get(hf: Mapping[str, Any], key: str, where: str, default: Any = KeyError) -> Any:
  if key in hf and hf[key] is not None:
    return hf[key]
  if default is KeyError:
    raise CotsafeError(f"{where}: field {key!r} missing (required for model_type {hf.get('model_type')!r})")
  return default


def _parse_rope(hf: Mapping[str, Any], where: str) -> tuple[float, tuple[tuple[str, float], ...] | None]:
  params = hf.get("rope_parameters")  # transformers 5
  scaling = hf.get("rope_scaling")  # transformers 4
  theta = hf.get("rope_theta")
  if isinstance(params, Mapping):
    theta = params.get("rope_theta", theta)
    if params.get("rope_type", "default") != "default" or scaling is None:
      scaling = params
  theta = 10000.0 if theta is None else float(theta)
  if not scaling:
    return theta, None
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise CotsafeError(f"{where}: rope scaling type {rope_type!r} is not supported "
                       f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
  if rope_type == "default":
    return theta, None
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise CotsafeError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
  return theta, tuple((k, float(scaling[k])) for k in keys)


def _parse_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CotsafeError(f"unknown model_type {model_type!r} in {where} "
                       f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise CotsafeError(f"{where}: hidden_act {act!r} is not supported (supported: silu)")
  for moe_key in ("num_experts", "num_local_experts", "n_routed_experts"):
    if hf.get(moe_key):
      raise CotsafeError(f"{where}: mixture-of-experts ({moe_key}={hf[moe_key]}) is not supported "
                         f"(supported: dense {', '.join(SUPPORTED_MODEL_TYPES)})")
  if hf.get("mlp_bias"):
    raise CotsafeError(f"{where}: mlp_bias=true is not supported")
  if hf.get("pretraining_tp", 1) not in (1, None):
    raise CotsafeError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported (expected 1)")
  layer_types = hf.get("layer_types") or []
  sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
  if hf.get("use_sliding_window") or sliding:
    raise CotsafeError(f"{where}: an active sliding window (use_sliding_window / layer_types "
                       f"{sorted(set(layer_types))}) is not supported (supported: full attention)")
  num_heads = int(_get(hf, "num_attention_heads", where))
  hidden = int(_get(hf, "hidden_size", where))
  head_dim = hf.get("head_dim") or hidden // num_heads
  theta, scaling = _parse_rope(hf, where)
  bias = bool(hf.get("attention_bias", False))
  eos = hf.get("eos_token_id")
  dtype_name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return dict(
      model_type=model_type,
      vocab_size=int(_get(hf, "vocab_size", where)),
      hidden_size=hidden,
      intermediate_size=int(_get(hf, "intermediate_size", where)),
      num_layers=int(_get(hf, "num_hidden_layers", where)),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=True if model_type == "qwen2" else bias,
      o_bias=False if model_type == "qwen2" else bias,
      qk_norm=model_type == "qwen3",
      param_dtype=jnp.dtype(dtype_name) if dtype_name in ("float32", "bfloat16", "float16") else jnp.float32,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf.get("pad_token_id"),
  )


def tiny_config(model_type: str = "qwen2", *, vocab_size: int = 256, hidden_size: int = 64,
                intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                head_dim: int | None = None, tie_word_embeddings: bool = False,
                rope_scaling: Mapping[str, float] | None = None, max_position_embeddings: int = 512,
                rope_theta: float = 10000.0, **kw) -> ModelConfig:
  """A tiny config of a family for tests and the CPU demo."""
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CotsafeError(f"unknown model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  scaling = None
  if rope_scaling is not None:
    _, scaling = _parse_rope({"rope_scaling": {"rope_type": "llama3", **rope_scaling}}, "tiny_config")
  return ModelConfig(
      model_type=model_type, vocab_size=vocab_size, hidden_size=hidden_size,
      intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim or hidden_size // num_heads,
      tie_word_embeddings=tie_word_embeddings, rope_scaling=scaling, rope_theta=rope_theta,
      max_position_embeddings=max_position_embeddings, qkv_bias=model_type == "qwen2",
      qk_norm=model_type == "qwen3", **kw)
