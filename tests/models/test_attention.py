"""Attention without [T, S] scores against the dense [T, S] softmax: the chunked flash path, the splash kernel (Pallas
interpreter), the cuDNN wrapper's roll-to-the-front (through jax's XLA twin of the same call); values and gradients,
left and right padding, GQA, a T that is not a multiple of the block; through the whole model; compiled for a TPU
slice (Mosaic) with no [T, S] buffer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models import attention


def _inputs(seed=0, b=3, t=37, g=2, r=3, dh=8):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, g, r, dh), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, g, dh), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, g, dh), jnp.float32)
  lengths = np.array([t, t - 5, 1])[:b]
  valid = np.arange(t)[None, :] >= (t - lengths)[:, None]  # left padding
  valid[0, -4:] = False  # and right padding (a response that stopped early)
  w = jax.random.normal(ks[3], q.shape, jnp.float32) * valid[:, :, None, None, None]  # real queries only
  return q, k, v, jnp.asarray(valid), w


def _check_against_dense(fn, q, k, v, valid, w, tol=1e-5):
  """Values on real query rows and gradients of a loss over them (a padded query never reaches a loss)."""
  def dense(q, k, v):
    return attention.attend(q, k, v, valid, impl="dense")
  real = np.asarray(valid)[:, :, None, None, None]
  np.testing.assert_allclose(np.where(real, fn(q, k, v), 0), np.where(real, dense(q, k, v), 0), atol=tol, rtol=tol)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
  for a, b in zip(jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("block", [1, 8, 16, 36, 37, 64])
def test_chunked_equals_dense(block):
  q, k, v, valid, w = _inputs()
  _check_against_dense(lambda q, k, v: attention.attend(q, k, v, valid, impl="chunked", block=block),
                       q, k, v, valid, w)


def test_chunked_padded_query_rows_are_zero_and_finite():
  q, k, v, valid, _ = _inputs()
  valid = valid.at[2].set(False)  # a row with no real token at all
  out = attention.attend(q, k, v, valid, impl="chunked", block=8)
  assert np.isfinite(np.asarray(out)).all()
  assert not np.asarray(out)[2].any()


def test_splash_kernel_equals_dense_in_the_interpreter():
  q, k, v, valid, w = _inputs(b=2, t=37, g=2, r=2, dh=128)  # the kernel pads T to its 128-row tile
  _check_against_dense(lambda q, k, v: attention.splash(q, k, v, valid, interpret=True), q, k, v, valid, w)


def test_cudnn_wrapper_equals_dense_through_the_xla_twin(monkeypatch):
  """The cuDNN path rolls each row's real tokens to the front and passes lengths; jax's "xla" implementation of
  the same dot_product_attention call (causal + lengths) checks that on CPU. cuDNN itself needs a GPU."""
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
  q, k, v, valid, w = _inputs()
  _check_against_dense(lambda q, k, v: attention.cudnn(q, k, v, valid), q, k, v, valid, w)


def test_auto_picks_per_platform_and_bad_names_fail():
  assert [attention.resolve_impl("auto", p, jnp.bfloat16) for p in ("cpu", "tpu", "gpu", "cuda")] == \
      ["chunked", "splash", "cudnn", "cudnn"]
  assert attention.resolve_impl("auto", "cuda", jnp.float32) == "chunked"  # cuDNN has no float32 flash
  assert attention.resolve_impl("dense", "tpu") == "dense"
  with pytest.raises(CotsafeError, match="'cudnn' with dtype float32"):
    attention.resolve_impl("cudnn", "cuda", jnp.float32)
  with pytest.raises(CotsafeError, match="ModelConfig.attention='flash'"):
    models.tiny_config("qwen2").replace(attention="flash")
  with pytest.raises(CotsafeError, match="ModelConfig.attention_block=0"):
    models.tiny_config("qwen2").replace(attention_block=0)


def test_model_hidden_states_chunked_equal_dense():
  cfg = models.tiny_config("qwen2", vocab_size=97, num_heads=4, num_kv_heads=2)
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, 97)
  mask = jnp.arange(37)[None, :] >= jnp.array([[0], [11]])
  dense, chunked = cfg.replace(attention="dense"), cfg.replace(attention="chunked", attention_block=8)
  real = np.asarray(mask)[..., None]  # padded slots only ever feed padded slots
  np.testing.assert_allclose(np.where(real, models.hidden_states(chunked, params, tokens, attention_mask_bt=mask), 0),
                             np.where(real, models.hidden_states(dense, params, tokens, attention_mask_bt=mask), 0),
                             atol=1e-5, rtol=1e-5)

  def loss(p, c):
    return jnp.sum(models.hidden_states(c, p, tokens, attention_mask_bt=mask) * mask[..., None])
  for a, b in zip(jax.tree.leaves(jax.grad(loss)(params, chunked)), jax.tree.leaves(jax.grad(loss)(params, dense))):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)  # sums over 6k terms in another order


def _buffers_with(text: str, t: int) -> list[str]:
  """Array shapes in compiled HLO text with two dims of size t (a [T, S] scores / bias / probs buffer)."""
  import re
  shapes = re.findall(r"[a-z0-9]+\[([0-9,]+)\]", text)
  return [s for s in shapes if s.split(",").count(str(t)) >= 2]


@pytest.mark.parametrize("target,impl,kernel", [("v5e-4", "auto", "tpu_custom_call"), ("v5e-4", "dense", None),
                                                ("2xH100", "auto", "cudnn")])
def test_compiled_for_the_target_has_no_t_by_s_buffer(target, impl, kernel):
  """Training forward + backward compiled for a v5e:2x2 slice (libtpu, Mosaic) and two H100s (deviceless CUDA):
  splash / cuDNN leave no [T, S] buffer in the program; the dense twin has them (so the check can fail)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cotsafe_jax import parallel
  from cotsafe_jax.plan import planner, targets
  devices = targets.devices(targets.parse_target(target))
  mesh = parallel.make_mesh(fsdp=len(devices) // 2, tensor=2, devices=devices)
  cfg = models.tiny_config("qwen2", vocab_size=256).replace(attention=impl, dtype=jnp.bfloat16)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        models.param_shapes(cfg), models.param_shardings(cfg, mesh))
  t = 1024
  rows = jax.ShapeDtypeStruct((4, t), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  mask = jax.ShapeDtypeStruct((4, t), jnp.bool_, sharding=rows.sharding)

  def loss(p, tokens, m):
    return jnp.sum(models.hidden_states(cfg, p, tokens, attention_mask_bt=m).astype(jnp.float32) ** 2)
  with jax.set_mesh(mesh):  # under the tests' "highest" matmul precision: bf16 splash must still compile
    compiled, _ = planner.compile_program("grad", jax.jit(jax.grad(loss)), (params, rows, mask))
  text = compiled.as_text()
  if kernel:
    assert kernel in text and not _buffers_with(text, t)
  else:
    assert _buffers_with(text, t)


def test_chunked_inside_the_layer_scan_saves_no_block_pair_residuals():
  """Under jax.grad through the model's scanned layers, the chunked path keeps its custom VJP's O(T) residuals: no
  array stacked over (query block, key block) pairs in the compiled program. A lax.cond per block pair made JAX
  save every pair's scores there (91 GiB per H200 for two 7B layers at 16k tokens)."""
  import re
  cfg = models.tiny_config("qwen2", vocab_size=256).replace(attention="chunked", attention_block=128, remat="full",
                                                            dtype=jnp.bfloat16)
  t, n = 1024, 8
  tokens, mask = jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.bool_)

  def train(p, tk, mk):
    return jax.grad(lambda p: jnp.mean(models.hidden_states(cfg, p, tk, attention_mask_bt=mk)
                                       .astype(jnp.float32) ** 2))(p)
  text = jax.jit(train).lower(models.param_shapes(cfg), tokens, mask).compile().as_text()
  pairs = [s for s in re.findall(r"\[([0-9,]+)\]", text) if s.startswith(f"{n},{n},")]
  assert not pairs, pairs
