"""Blocked attention (query blocks, each with its own bias) against the dense [T, S] softmax: values and
gradients, left padding, GQA, a T that is not a multiple of the block; and through the whole model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models
from cotsafe_jax.models import transformer


def _inputs(seed=0, b=3, t=37, g=2, r=3, dh=8):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, g, r, dh), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, g, dh), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, g, dh), jnp.float32)
  lengths = np.array([t, t - 5, 1])[:b]
  valid = np.arange(t)[None, :] >= (t - lengths)[:, None]  # left padding
  return q, k, v, jnp.asarray(valid)


@pytest.mark.parametrize("block", [1, 8, 16, 36, 37, 64, None])
def test_blocked_attention_equals_dense(block):
  q, k, v, valid = _inputs()
  slots = jnp.arange(q.shape[1])
  mask = (valid, slots, slots)

  def dense(q, k, v):
    return transformer._softmax_attend(q, k, v, transformer.attention_bias(*mask), jnp.float32)

  def blocked(q, k, v):
    return transformer.blocked_attention(q, k, v, mask, block=block, dt=jnp.float32)

  np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), atol=1e-5, rtol=1e-5)
  w = jax.random.normal(jax.random.key(9), q.shape[:2] + q.shape[2:], jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w * valid[:, :, None, None, None])  # noqa: E731
  g_dense = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  g_blocked = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_blocked, g_dense):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_model_hidden_states_do_not_depend_on_the_block():
  cfg = models.tiny_config("qwen2", vocab_size=97, num_heads=4, num_kv_heads=2)
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, 97)
  mask = jnp.arange(37)[None, :] >= jnp.array([[0], [11]])
  dense = models.hidden_states(cfg.replace(attention_block=None), params, tokens, attention_mask_bt=mask)
  blocked = models.hidden_states(cfg.replace(attention_block=8), params, tokens, attention_mask_bt=mask)
  np.testing.assert_allclose(blocked, dense, atol=1e-5, rtol=1e-5)

  def loss(p, c):
    return jnp.sum(models.hidden_states(c, p, tokens, attention_mask_bt=mask) * mask[..., None])
  g_dense = jax.grad(loss)(params, cfg.replace(attention_block=None))
  g_blocked = jax.grad(loss)(params, cfg.replace(attention_block=8))
  for a, b in zip(jax.tree.leaves(g_blocked), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)  # sums over 6k terms in another order
