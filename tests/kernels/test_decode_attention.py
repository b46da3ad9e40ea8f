"""kernels.decode_attention (Pallas TPU, here in the interpreter) against its twin, the XLA form of
`models.attention.cached`: GQA with a group that is not a sublane multiple, cache segments of awkward sizes (one
shorter than a block, one ending in a partial block whose padding the interpreter fills with NaN), left padding, a
row whose first segment is wholly masked; float32 and bf16; through the model's decode step; compiled by Mosaic
for a v5e slice inside a sharded decode step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models
from cotsafe_jax.kernels import decode_attention
from cotsafe_jax.models import attention


def _inputs(dtype, seed=0, b=3, g=2, r=3, dh=16, sizes=(37, 300)):
  ks = jax.random.split(jax.random.key(seed), 2 + 2 * len(sizes))
  q = jax.random.normal(ks[0], (b, 1, g, r, dh), jnp.float32).astype(dtype)
  segments, biases = [], []
  offset = 0
  for j, s in enumerate(sizes):
    k = (2 * jax.random.normal(ks[1 + 2 * j], (b, g, dh, s), jnp.float32)).astype(dtype)
    v = jax.random.normal(ks[2 + 2 * j], (b, g, s, dh), jnp.float32).astype(dtype)
    slots = offset + np.arange(s)
    valid = np.ones((b, s), bool)
    valid[1] = slots >= 20  # left padding: row 1's first 20 slots
    if j == 0:
      valid[2] = False  # row 2 sees nothing in the first segment
    index = sum(sizes) - 9  # the new token's slot: a few slots of the last segment stay in the future
    biases.append(attention.bias(jnp.asarray(valid), jnp.asarray([index]), jnp.asarray(slots)))
    segments.append((k, v))
    offset += s
  return q, segments, biases


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("sizes", [(300,), (37, 300)])
def test_equals_the_xla_form(dtype, tol, sizes):
  q, segments, biases = _inputs(dtype, sizes=sizes)
  want = attention.cached(q, segments, biases, dtype, impl="dense")  # not splash: the XLA form
  got = decode_attention.decode_attention(q, segments, biases, dtype, interpret=True, block_s=128)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
  # the dispatch: splash (the TPU default) routes a one-token step to the kernel (its default block: one per segment)
  routed = attention.cached(q, segments, biases, dtype, impl="splash")
  np.testing.assert_allclose(np.asarray(routed, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_model_decode_step_with_the_kernel_equals_xla():
  """A prefilled cache, then one decode step of the tiny model with attention='splash' (the kernel, interpreted)
  and 'chunked' (the XLA form): the same logits and cache (the first layer's new k / v exactly; later layers' to
  float rounding, as their inputs went through attention)."""
  cfg = models.tiny_config("qwen2", vocab_size=128).replace(attention="chunked")
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 128)
  mask = jnp.asarray(np.arange(11)[None, :] >= np.array([[0], [4]]))
  cache = models.init_cache(cfg, 2, 16)
  _, cache = models.prefill(cfg, params, tokens, mask, cache)
  step = jnp.array([5, 7], jnp.int32)
  want, want_cache = models.decode_step(cfg, params, step, cache)
  got, got_cache = models.decode_step(cfg.replace(attention="splash"), params, step, cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(got_cache["k"][0]), np.asarray(want_cache["k"][0]))  # layer 0


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_compiled_for_a_tpu_slice_inside_the_sharded_decode_step(impl):
  """The sampler's decode step of a tiny bf16 model compiled for v5e:2x2 (libtpu; batch over fsdp, kv heads over
  tensor): the kernel is in the program (Mosaic compiled it) and no float32 [.., S] scores buffer is; with the XLA
  form (attention='chunked') there is one, so the check can fail."""
  import re
  from cotsafe_jax import parallel
  from cotsafe_jax.plan import planner, targets
  from cotsafe_jax.rollout import decode
  devices = targets.devices(targets.parse_target("v5e-4"))
  mesh = parallel.make_mesh(fsdp=2, tensor=2, devices=devices)
  cfg = models.tiny_config("qwen2", vocab_size=256).replace(dtype=jnp.bfloat16, head_dim=128, attention=impl)
  rows, slots = 4, 4480  # two blocks of 2048 and a partial one
  weights = decode.abstract_decode_params(cfg, mesh)
  k_shape, v_shape = models.cache_shapes(cfg, rows, slots)
  k_sh, v_sh = (parallel.logical_sharding(mesh, a[1:], s[1:]) for a, s in zip(models.KV_CACHE_AXES,
                                                                             (k_shape, v_shape)))
  sds = jax.ShapeDtypeStruct
  batch = parallel.batch_sharding(mesh, 1, (rows,))
  cache = {"kv": [[(sds(k_shape[1:], cfg.dtype, sharding=k_sh), sds(v_shape[1:], cfg.dtype, sharding=v_sh))]
                  for _ in range(cfg.num_layers)],
           "mask": [sds((rows, slots), jnp.bool_, sharding=parallel.batch_sharding(mesh, 2, (rows, slots)))],
           "pos_b": sds((rows,), jnp.int32, sharding=batch), "index": sds((), jnp.int32, sharding=parallel.replicated(mesh))}
  step = jax.jit(lambda w, tok, c: decode.decode_step(cfg, w, tok, c), donate_argnums=(2,))
  with jax.set_mesh(mesh):
    compiled, _ = planner.compile_program("decode step", step, (weights, sds((rows,), jnp.int32, sharding=batch),
                                                                cache))
  text = compiled.as_text()
  assert ("tpu_custom_call" in text) == (impl == "auto")
  per_chip_bias = rows // 2 * slots  # the [B, 1, S] float32 bias on one chip is expected; scores are larger
  scores = [s for s in re.findall(r"f32\[([0-9,]+)\]", text)
            if s.split(",")[-1] == str(slots) and np.prod([int(x) for x in s.split(",")]) > per_chip_bias]
  assert bool(scores) == (impl == "chunked"), scores
