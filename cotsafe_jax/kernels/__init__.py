"""cotsafe_jax.kernels: fused per-token log-prob + entropy from hidden states and the unembedding.

`logprob_entropy` never materialises the [tokens x vocab] logits (XLA loops, Pallas TPU / GPU).
"""
from cotsafe_jax.kernels.logprob_entropy import IMPLS, logprob_entropy

__all__ = ["IMPLS", "logprob_entropy"]
