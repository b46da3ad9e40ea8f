"""rollout.decode (layers unrolled over unstacked params) equals models.decode_step, step after step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models
from cotsafe_jax.rollout import decode


@pytest.mark.parametrize("family,unembedding_vd", [("qwen3", True), ("qwen3", False), ("llama", True)])
def test_unrolled_decode_equals_models_decode_step(family, unembedding_vd):
  # qwen2: the sampler tests, against the full forward; llama: tied embeddings (unembed_vd is the embedding)
  cfg = models.tiny_config(family, vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2, tie_word_embeddings=family == "llama")
  params = models.init_params(cfg, jax.random.key(2))
  rs = np.random.RandomState(0)
  b, p, n = 3, 5, 2
  prompt = rs.randint(1, 53, (b, p))
  mask = np.ones((b, p), bool)
  mask[0, :3] = False  # left padding
  cache = models.init_cache(cfg, b, p + n)
  _, cache = models.prefill(cfg, params, jnp.asarray(prompt), jnp.asarray(mask), cache)

  @jax.jit
  def both(params, cache, tokens_nb):
    ref_cache, ours = cache, decode.split_cache(cfg, cache)
    dparams = decode.decode_params(cfg, params, unembedding_vd=unembedding_vd)
    ref, got = [], []
    for tok_b in tokens_nb:
      logits, ref_cache = models.decode_step(cfg, params, tok_b, ref_cache)
      ref.append(logits)
      logits, ours = decode.decode_step(cfg, dparams, tok_b, ours)
      got.append(logits)
    return jnp.stack(ref), jnp.stack(got), ref_cache, ours

  ref, got, ref_cache, ours = both(params, cache, jnp.asarray(rs.randint(0, 53, (n, b))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.stack([np.asarray(k) for k, _ in ours["kv"]]), np.asarray(ref_cache["k"]),
                             atol=1e-5)
  np.testing.assert_allclose(np.stack([np.asarray(v) for _, v in ours["kv"]]), np.asarray(ref_cache["v"]),
                             atol=1e-5)
  for key in ("mask_bs", "pos_b", "index"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(ref_cache[key]))
