"""Decoder models (Llama 3.x, Qwen2/2.5, Qwen3): config, params, forward, KV cache, HF checkpoint I/O."""
from cotsafe_jax.models.api import (KV_CACHE_AXES, attention_bias, cache_shapes, cache_shardings, decode_step,
                                    extend, forward, hidden_states, init_cache, init_params, logits_from_hidden,
                                    param_logical_axes, param_shapes, param_shardings, positions_from_mask,
                                    prefill, unembedding)
from cotsafe_jax.models.config import REMAT_POLICIES, SUPPORTED_MODEL_TYPES, ModelConfig, tiny_config
from cotsafe_jax.models.hf_io import load_hf, save_hf
from cotsafe_jax.models.tokenizer import (apply_chat_template, check_vocab, load_tokenizer,
                                          split_reasoning)

__all__ = ["KV_CACHE_AXES", "ModelConfig", "REMAT_POLICIES", "SUPPORTED_MODEL_TYPES", "apply_chat_template", "attention_bias",
           "cache_shapes", "cache_shardings", "check_vocab", "decode_step", "extend", "forward", "hidden_states",
           "init_cache", "init_params", "load_hf", "load_tokenizer", "logits_from_hidden", "param_logical_axes",
           "param_shapes", "param_shardings", "positions_from_mask", "prefill", "save_hf", "split_reasoning",
           "tiny_config", "unembedding"]
