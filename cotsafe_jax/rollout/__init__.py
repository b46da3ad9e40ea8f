"""Rollout: the jitted KV-cache sampler (`generate`) and its text-level helper in thinking format."""
from cotsafe_jax.rollout.sampler import GenerateOutput, bucket_length, generate
from cotsafe_jax.rollout.text import TextCompletion, decode_completions, encode_chat, generate_text

__all__ = ["GenerateOutput", "TextCompletion", "bucket_length", "decode_completions", "encode_chat", "generate",
           "generate_text"]
