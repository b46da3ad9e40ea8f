"""KV-cache incremental decoding equals the full forward, with left padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_then_decode_equals_full_forward(family):
  cfg = models.tiny_config(family, vocab_size=97, rope_scaling={"factor": 4.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 8}
                           if family == "llama" else None)
  params = models.init_params(cfg, jax.random.key(0))
  rs = np.random.RandomState(0)
  b, p, n = 3, 6, 5
  tokens = rs.randint(1, cfg.vocab_size, (b, p + n))
  mask = np.ones((b, p + n), bool)
  mask[1, :2] = False  # left-padded prompts
  mask[2, :5] = False
  tokens = np.where(mask, tokens, 0)
  full = np.asarray(models.forward(cfg, params, jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask)))

  cache = models.init_cache(cfg, b, p + n + 3)
  prefill = jax.jit(models.prefill, static_argnums=0)
  decode = jax.jit(models.decode_step, static_argnums=0)
  logits, cache = prefill(cfg, params, jnp.asarray(tokens[:, :p]), jnp.asarray(mask[:, :p]), cache)
  steps = [np.asarray(logits)]
  for i in range(p, p + n - 1):
    logits, cache = decode(cfg, params, jnp.asarray(tokens[:, i]), cache)
    steps.append(np.asarray(logits))
  inc = np.stack(steps, axis=1)  # [B, n, V]: predictions after positions p-1 .. p+n-2
  np.testing.assert_allclose(inc, full[:, p - 1:p + n - 1], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache["pos_b"]), mask.sum(1) - 1)
  assert int(cache["index"]) == p + n - 1


def test_hidden_states_and_unembedding_give_logits():
  cfg = models.tiny_config("qwen2", vocab_size=50, tie_word_embeddings=True)
  params = models.init_params(cfg, jax.random.key(1))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50, (2, 7)))
  h = models.hidden_states(cfg, params, tokens)
  w = models.unembedding(cfg, params)
  assert w.shape == (cfg.hidden_size, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(h @ w), np.asarray(models.forward(cfg, params, tokens)), atol=1e-5)
