"""Rollout: the jitted KV-cache sampler (`generate`), its weights' decode layout (`decode_params`, built once and
reused across calls) and its text-level helper in thinking format."""
from cotsafe_jax.rollout.decode import DecodeParams, decode_params
from cotsafe_jax.rollout.sampler import GenerateOutput, bucket_length, generate
from cotsafe_jax.rollout.text import TextCompletion, decode_completions, encode_chat, generate_text

__all__ = ["DecodeParams", "GenerateOutput", "TextCompletion", "bucket_length", "decode_completions", "decode_params",
           "encode_chat", "generate", "generate_text"]
