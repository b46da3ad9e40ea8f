"""Value and token-classification heads: float32 outputs, logical axes, sharded init, parity with NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cotsafe_jax.models.heads import (TokenClassificationHead, ValueHead, apply_head, head_logical_axes,
                                      head_shardings, init_head)
from cotsafe_jax.parallel import make_mesh


def test_token_classification_head_matches_numpy_and_names_axes():
  head = TokenClassificationHead(num_classes=3)
  params = init_head(head, jax.random.key(0), embed_dim=16)
  assert {k: v.shape for k, v in params.items()} == {"kernel": (16, 3), "bias": (3,)}
  assert head_logical_axes(head, embed_dim=16) == {"kernel": ("embed", "classes"), "bias": ("classes",)}
  params = {"kernel": params["kernel"], "bias": jnp.array([0.1, -0.2, 0.3])}
  h = np.random.default_rng(0).normal(size=(2, 5, 16))
  out = apply_head(head, params, jnp.asarray(h, jnp.bfloat16))
  assert out.shape == (2, 5, 3) and out.dtype == jnp.float32
  h_bf16 = np.asarray(jnp.asarray(h, jnp.bfloat16), np.float64)  # the input the head actually saw
  want = np.einsum("btd,dc->btc", h_bf16, np.asarray(params["kernel"], np.float64)) + np.asarray(params["bias"])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_value_head_starts_at_zero_and_is_linear():
  head = ValueHead()
  params = init_head(head, jax.random.key(1), embed_dim=8)
  h = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 8)), jnp.float32)
  v = apply_head(head, params, h)
  assert v.shape == (3, 4) and v.dtype == jnp.float32 and not np.asarray(v).any()
  w = np.random.default_rng(2).normal(size=(8, 1))
  v = apply_head(head, {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.array([0.5])}, h)
  np.testing.assert_allclose(np.asarray(v), np.asarray(h, np.float64) @ w[:, 0] + 0.5, rtol=1e-5)


def test_sharded_init_matches_unsharded():
  mesh = make_mesh(data=4, fsdp=2, tensor=1)
  head = TokenClassificationHead()
  sharded = init_head(head, jax.random.key(3), embed_dim=16, mesh=mesh)
  plain = init_head(head, jax.random.key(3), embed_dim=16)
  assert sharded["kernel"].sharding.spec == P("fsdp", None)  # embed -> fsdp, classes replicated
  assert head_shardings(head, embed_dim=16, mesh=mesh)["bias"].spec == P(None)
  np.testing.assert_array_equal(np.asarray(sharded["kernel"]), np.asarray(plain["kernel"]))
