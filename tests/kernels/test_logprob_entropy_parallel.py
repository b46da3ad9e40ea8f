"""Vocabulary-parallel logprob_entropy on 8 simulated CPU devices equals the unsharded op.

Values and both gradients, per implementation, under `jax.set_mesh` and with the mesh taken from a
vocab-sharded unembedding; tolerances are the float32 ones of test_logprob_entropy.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax.kernels import logprob_entropy
from cotsafe_jax.parallel.mesh import logical_sharding, make_mesh
from tests.kernels.logprob_entropy_ref import as_f64, assert_close, make_inputs, ref64, value_and_grads

# V = 1000 splits into 125 or 250 columns per shard: ragged tiles inside every shard.
B, T, D, V, TEMP = 2, 24, 16, 1000, 0.6
BLOCKS = {"xla": dict(block_t=16, block_v=64), "pallas_tpu": dict(block_t=16, block_v=128),
          "pallas_gpu": dict(block_t=16, block_v=64)}


def _inputs():
  h, w, y, gl, ge = make_inputs(21, B * T, D, V, jnp.float32)
  return (h.reshape(B, T, D), w, y.reshape(B, T), gl.reshape(B, T), ge.reshape(B, T))


def _check(got, h, w, y, gl, ge, unsharded):
  want = ref64(as_f64(h).reshape(-1, D), as_f64(w), np.asarray(y).reshape(-1), TEMP,
               gl.reshape(-1), ge.reshape(-1))
  want = (want[0].reshape(B, T), want[1].reshape(B, T), want[2].reshape(B, T, D), want[3])
  for name, g, u, ref, rel in zip(("logp", "entropy", "dh", "dW"), got, unsharded, want,
                                  (2e-6, 2e-6, 2e-5, 2e-5)):
    assert_close(f"{name} vs unsharded", g, u, rel=rel)
    assert_close(f"{name} vs float64", g, ref, rel=rel)


@pytest.mark.parametrize("impl,mesh_shape", [
    ("xla", (1, 1, 8)), ("xla", (2, 1, 4)), ("xla", (8, 1, 1)),
    ("pallas_tpu", (2, 1, 4)), ("pallas_gpu", (1, 1, 8))])
def test_sharded_equals_unsharded(impl, mesh_shape):
  h, w, y, gl, ge = _inputs()
  run = value_and_grads(y, gl, ge, temperature=TEMP, impl=impl, **BLOCKS[impl])
  unsharded = run(h, w)
  mesh = make_mesh(*mesh_shape)
  h_s = jax.device_put(h, logical_sharding(mesh, ("batch", "length", "embed"), h.shape))
  w_s = jax.device_put(w, logical_sharding(mesh, ("embed", "vocab"), w.shape))
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(run)(h_s, w_s))
    got = run(h_s, w_s)
  assert "shard_map" in jaxpr
  # the per-shard max / sums are combined across the vocab axis exactly when V is split
  assert ("pmax" in jaxpr) == (mesh_shape[2] > 1)
  _check(got, h, w, y, gl, ge, unsharded)


def test_mesh_taken_from_sharded_unembedding():
  h, w, y, gl, ge = _inputs()
  unsharded = value_and_grads(y, gl, ge, temperature=TEMP, impl="xla", **BLOCKS["xla"])(h, w)
  mesh = make_mesh(1, 1, 8)
  w_s = jax.device_put(w, logical_sharding(mesh, ("embed", "vocab"), w.shape))
  kw = dict(temperature=TEMP, impl="xla", **BLOCKS["xla"])
  # no mesh context: the concrete vocab-sharded W carries it (values); under jax.vjp W is a
  # tracer, so the gradients pass the mesh explicitly
  assert "pmax" in str(jax.make_jaxpr(lambda h: logprob_entropy(h, w_s, y, **kw))(h))
  logp, ent = logprob_entropy(h, w_s, y, **kw)
  _, vjp = jax.vjp(lambda h, w: logprob_entropy(h, w, y, mesh=mesh, **kw), h, w_s)
  _check((logp, ent, *vjp((gl, ge))), h, w, y, gl, ge, unsharded)
