"""The fused op on a tiny model's hidden states and unembedding equals log-softmax of models.forward.

A tiny qwen2 with tied embeddings (W = embed^T: the orientation that can go wrong), left padding;
float32 tolerances as in test_logprob_entropy.py (rel 2e-6 of the largest value).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax import models
from cotsafe_jax.kernels import logprob_entropy
from tests.kernels.logprob_entropy_ref import assert_close


def test_fused_op_matches_model_logits():
  cfg = models.tiny_config("qwen2", vocab_size=1031, tie_word_embeddings=True)
  params = models.init_params(cfg, jax.random.key(0))
  tokens_bt = jax.random.randint(jax.random.key(1), (2, 19), 0, cfg.vocab_size)
  mask_bt = jnp.ones_like(tokens_bt).at[0, :4].set(0)  # left padding on one row
  targets_bt = jnp.roll(tokens_bt, -1, axis=1)

  @jax.jit
  def both(params):
    h_btd = models.hidden_states(cfg, params, tokens_bt, attention_mask_bt=mask_bt)
    fused = logprob_entropy(h_btd, models.unembedding(cfg, params), targets_bt, temperature=0.6,
                            impl="xla", block_t=16, block_v=256)
    logp_btv = jax.nn.log_softmax(
        models.forward(cfg, params, tokens_bt, attention_mask_bt=mask_bt) / 0.6, axis=-1)
    ref_logp = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    ref_ent = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
    return fused, (ref_logp, ref_ent)

  (logp, ent), (ref_logp, ref_ent) = both(params)
  assert_close("logp", logp, np.asarray(ref_logp), rel=2e-6)
  assert_close("entropy", ent, np.asarray(ref_ent), rel=2e-6)
