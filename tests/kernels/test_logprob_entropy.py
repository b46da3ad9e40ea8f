"""kernels.logprob_entropy against a float64 NumPy twin: values, both gradients, peaked logits,
input errors, no [T, V] intermediate, memory, and lowering of the Pallas kernels to TPU / GPU.

Shape grid: a pairwise covering design, not the full product. The full product of T {1, 37, 130} x
V {1000, 1031, 4096} x D {16, 48} x temperature {1.0, 0.6} x dtype {float32, bfloat16} x blocks
{default, small} is 144 compiles per implementation, far over the 4-minute CI budget (Pallas in
interpret mode compiles slowly). The 9 rows of DESIGN hold every (T, V) pair once and every pair of
values of any two factors at least once (test_design_is_pairwise_covering); each row runs for every
implementation, with one jit per row.

Tolerances (max-norm relative: max|got - want| <= rel * max|want|), against float64 on the same
(dtype-rounded) inputs; measured errors were ~10x below them:
  float32:  logp, entropy rel 2e-6; dh, dW rel 2e-5 (float32 accumulation over D and V).
  bfloat16: logp, entropy rel 5e-6 (float32 maths on bf16 inputs); dh, dW rel 1.6e-2 (dz enters
            the bf16 matmuls and dh, dW come back in bf16: a few bf16 ulps of 2^-8).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax.kernels import _math, logprob_entropy, pallas_gpu, pallas_tpu
from tests.kernels.logprob_entropy_ref import as_f64, assert_close, make_inputs, ref64, value_and_grads

IMPLS = ("naive", "xla", "pallas_tpu", "pallas_gpu")
# Small tiles force several tiles per axis with a ragged last one (shifted for xla, padded with
# NaN by the Pallas interpreter, so a leak of padding into any sum shows up).
SMALL_BLOCKS = {"naive": {}, "xla": dict(block_t=16, block_v=256),
                "pallas_tpu": dict(block_t=16, block_v=256),
                "pallas_gpu": dict(block_t=16, block_v=128)}
# (T, V, D, temperature, dtype, blocks)
DESIGN = (
    (1, 1000, 16, 1.0, "float32", "small"),
    (1, 1031, 16, 0.6, "bfloat16", "default"),
    (1, 4096, 48, 1.0, "float32", "default"),
    (37, 1000, 16, 1.0, "bfloat16", "default"),
    (37, 1031, 16, 1.0, "float32", "default"),
    (37, 4096, 48, 0.6, "bfloat16", "small"),
    (130, 1000, 48, 0.6, "float32", "small"),
    (130, 1031, 48, 1.0, "float32", "small"),
    (130, 4096, 16, 0.6, "bfloat16", "default"),
)
TOL = {"float32": dict(fwd=2e-6, grad=2e-5), "bfloat16": dict(fwd=5e-6, grad=1.6e-2)}


def test_design_is_pairwise_covering():
  levels = [sorted(set(col)) for col in zip(*DESIGN)]
  assert [len(l) for l in levels] == [3, 3, 2, 2, 2, 2]
  for a, b in itertools.combinations(range(6), 2):
    seen = {(row[a], row[b]) for row in DESIGN}
    assert seen == set(itertools.product(levels[a], levels[b])), (a, b)


def test_float64_reference_gradient_matches_finite_differences():
  rng = np.random.default_rng(7)
  h, w = rng.normal(size=(3, 4)), rng.normal(size=(4, 7))
  y, gl, ge, temp = np.array([2, 6, -100]), rng.normal(size=3), rng.normal(size=3), 0.6

  def loss(h, w):
    logp, ent, _, _ = ref64(h, w, y, temp, gl, ge)
    return float(gl @ logp + ge @ ent)

  _, _, dh, dw = ref64(h, w, y, temp, gl, ge)
  for x, grad in ((h, dh), (w, dw)):
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      orig = x[idx]
      x[idx] = orig + 1e-6
      up = loss(h, w)
      x[idx] = orig - 1e-6
      fd[idx] = (up - loss(h, w)) / 2e-6
      x[idx] = orig
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", range(len(DESIGN)), ids=lambda r: "T{}_V{}_D{}_t{}_{}_{}".format(*DESIGN[r]))
def test_matches_float64(impl, row):
  t, v, d, temp, dtype, blocks = DESIGN[row]
  h, w, y, gl, ge = make_inputs(100 * row + IMPLS.index(impl), t, d, v, jnp.dtype(dtype))
  kw = SMALL_BLOCKS[impl] if blocks == "small" else {}
  logp, ent, dh, dw = value_and_grads(y, gl, ge, temperature=temp, impl=impl, **kw)(h, w)
  want = ref64(as_f64(h), as_f64(w), np.asarray(y), temp, gl, ge)
  assert logp.dtype == ent.dtype == jnp.float32
  assert dh.dtype == h.dtype and dw.dtype == w.dtype
  tol = TOL[dtype]
  for name, got, ref, rel in zip(("logp", "entropy", "dh", "dW"), (logp, ent, dh, dw), want,
                                 (tol["fwd"], tol["fwd"], tol["grad"], tol["grad"])):
    assert_close(f"{impl} {name}", got, ref, rel=rel)


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_logits_stay_finite(impl):
  """Logits scaled to +-50 (then / 0.6): targets at the argmax and argmin of each row."""
  t, d, v, temp = 37, 16, 1031, 0.6
  h, w, _, gl, ge = make_inputs(5, t, d, v, jnp.float32, out_of_range=False)
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  w = w * (50.0 / np.max(np.abs(z)))
  z = z * (50.0 / np.max(np.abs(z)))
  y = jnp.asarray(np.where(np.arange(t) % 2 == 0, z.argmax(1), z.argmin(1)), jnp.int32)
  logp, ent, dh, dw = value_and_grads(y, gl, ge, temperature=temp, impl=impl,
                                      **SMALL_BLOCKS[impl])(h, w)
  for name, x in (("logp", logp), ("entropy", ent), ("dh", dh), ("dW", dw)):
    assert np.all(np.isfinite(np.asarray(x))), name
  assert np.all(np.asarray(logp) <= 0.0)
  assert np.all(np.asarray(ent) >= 0.0)
  assert np.min(np.asarray(logp)) < -100.0  # the argmin targets really are far out
  want = ref64(as_f64(h), as_f64(w), np.asarray(y), temp, gl, ge)
  # |z| reaches 83: float32 holds such logits to one ulp (7.6e-6), so logp and H are compared to
  # 8 ulps of max|z| in absolute terms; the gradients keep the float32 tolerance.
  ulps = 8 * float(np.spacing(np.float32(np.max(np.abs(z)) / temp)))
  for name, got, ref, rel, floor in zip(("logp", "entropy", "dh", "dW"), (logp, ent, dh, dw), want,
                                        (0, 0, 2e-5, 2e-5), (ulps, ulps, 0, 0)):
    assert_close(f"{impl} {name}", got, ref, rel=rel, floor=floor)


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_and_odd_sizes(impl):
  """V = 10 (< one Triton tile, < one TPU lane row) and D = 20 (Triton pads D to 32)."""
  h, w, y, gl, ge = make_inputs(9, 5, 20, 10, jnp.float32)
  logp, ent, dh, dw = value_and_grads(y, gl, ge, temperature=0.6, impl=impl)(h, w)
  want = ref64(as_f64(h), as_f64(w), np.asarray(y), 0.6, gl, ge)
  for name, got, ref, rel in zip(("logp", "entropy", "dh", "dW"), (logp, ent, dh, dw), want,
                                 (2e-6, 2e-6, 2e-5, 2e-5)):
    assert_close(f"{impl} {name}", got, ref, rel=rel)


def test_batched_input_equals_flattened():
  h, w, y, _, _ = make_inputs(3, 2 * 37, 16, 1000, jnp.float32)
  logp_bt, ent_bt = logprob_entropy(h.reshape(2, 37, 16), w, y.reshape(2, 37), impl="xla",
                                    block_t=16, block_v=256)
  logp_n, ent_n = logprob_entropy(h, w, y, impl="xla", block_t=16, block_v=256)
  assert logp_bt.shape == ent_bt.shape == (2, 37)
  np.testing.assert_array_equal(np.asarray(logp_bt).reshape(-1), np.asarray(logp_n))
  np.testing.assert_array_equal(np.asarray(ent_bt).reshape(-1), np.asarray(ent_n))


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _largest_intermediate(jaxpr) -> int:
  """Most elements of any value in `jaxpr` or the jaxprs nested in it (loops, custom_vjp, kernels)."""
  sizes = [0]
  for eqn in jaxpr.eqns:
    sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for value in eqn.params.values():
      sizes += [_largest_intermediate(sub) for sub in _sub_jaxprs(value)]
  return max(sizes)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_never_materialised(impl, monkeypatch):
  """No value in the forward+backward program has T*V elements, except in the naive twin. The Triton
  backward holds dz for one vocabulary chunk of every token ([T, C], C from a byte budget: 256 MiB by default);
  with the budget at one block here, its largest value is [T, block_v]."""
  t, d, v = 512, 16, 4096
  monkeypatch.setattr(pallas_gpu, "DZ_CHUNK_BYTES", 512 * (t * 4 + d * 8))
  h, w, y, gl, ge = make_inputs(1, t, d, v, jnp.float32)
  kw = {} if impl == "naive" else dict(block_t=128, block_v=512)
  run = value_and_grads(y, gl, ge, impl=impl, **kw)
  largest = _largest_intermediate(jax.make_jaxpr(run)(h, w).jaxpr)
  if impl == "naive":
    assert largest >= t * v
  elif impl == "pallas_gpu":
    assert largest <= max(t * 512, d * v), largest  # dz of one chunk, or dW itself
  else:
    assert largest <= max(128 * 512, d * v), largest  # one tile, or dW itself


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_gpu_backward_in_vocabulary_chunks(dtype):
  """The Triton backward over several vocabulary chunks (the last one ragged: 1031 = 3 x 320 + 71 columns,
  blocks of 64 and a ragged last token block) equals float64, and equals itself in one chunk."""
  t, d, v, temp = 37, 48, 1031, 0.6
  h, w, y, gl, ge = make_inputs(8, t, d, v, jnp.dtype(dtype))
  y = y.at[3].set(-100)  # a pad target: no one-hot term
  budget = 320 * ((t + d) * jnp.dtype(dtype).itemsize + d * 4)
  assert pallas_gpu.chunk_cols(t, d, v, 64, jnp.dtype(dtype), budget) == 320
  stats = pallas_gpu.stats(h, w, y, inv_temp=1 / temp, block_t=16, block_v=64, interpret=True)
  _, ent, lse = (np.asarray(x) for x in _math.finish(*stats, 1 / temp))
  args = (h, w, y, jnp.asarray(lse), jnp.asarray(lse - ent), gl, ge)
  kw = dict(inv_temp=1 / temp, block_t=16, block_v=64, interpret=True)
  dh, dw = pallas_gpu.grads(*args, **kw, chunk_bytes=budget)
  _, _, dh64, dw64 = ref64(as_f64(h), as_f64(w), np.asarray(y), temp, gl, ge)
  rel = TOL[dtype]["grad"]
  assert_close("dh", dh, dh64, rel=rel)
  assert_close("dW", dw, dw64, rel=rel)
  assert dw.dtype == w.dtype and dh.dtype == jnp.float32
  dh1, dw1 = pallas_gpu.grads(*args, **kw)  # one chunk (the default budget)
  np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(dh1, np.float32), rtol=0, atol=1e-6 * float(jnp.abs(dh1).max()))
  np.testing.assert_array_equal(np.asarray(dw), np.asarray(dw1))  # each dW column block comes from one matmul


def test_xla_temp_memory_far_below_naive():
  """The CPU memory goal in miniature: compiled fwd+bwd temporaries, xla <= naive / 20."""
  t, d, v = 1024, 32, 8192
  h, w, y, gl, ge = make_inputs(2, t, d, v, jnp.float32)
  blocks = {"naive": {}, "xla": dict(block_t=128, block_v=512)}
  temp = {impl: value_and_grads(y, gl, ge, impl=impl, **kw).lower(h, w).compile()
          .memory_analysis().temp_size_in_bytes for impl, kw in blocks.items()}
  assert temp["naive"] >= 2 * t * v * 4  # it does hold several [T, V] float32 arrays
  assert temp["xla"] * 20 <= temp["naive"], temp


def test_auto_is_xla_on_cpu():
  h, w, y, _, _ = make_inputs(4, 37, 16, 1000, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda h, w: logprob_entropy(h, w, y))(h, w))
  assert ("scan" in jaxpr or "while" in jaxpr) and "pallas_call" not in jaxpr
  got = logprob_entropy(h, w, y)
  want = logprob_entropy(h, w, y, impl="xla")
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden=np.zeros((4,), np.float32)), "hidden has shape (4,) (expected [T, D] or [B, T, D])"),
    (dict(w_unembed=np.zeros((8, 10), np.float32)), "w_unembed has shape (8, 10) but hidden has D=16"),
    (dict(targets=np.zeros((5,), np.int32)), "targets has shape (5,) (expected hidden.shape[:-1] = (6,))"),
    (dict(targets=np.zeros((6,), np.float32)), "targets has dtype float32 (expected an integer dtype)"),
    (dict(hidden=np.zeros((6, 16), np.int32)), "hidden has dtype int32 (expected a float dtype)"),
    (dict(temperature=0.0), "temperature=0.0 (expected a finite float > 0)"),
    (dict(temperature="hot"), "temperature must be a static Python float, got str"),
    (dict(impl="cuda"), "unknown impl 'cuda' (expected one of auto, naive, xla, pallas_tpu, pallas_gpu)"),
    (dict(block_t=0), "block_t=0 (expected a positive int or None)"),
    (dict(impl="pallas_tpu", block_v=100), "block_v=100 for pallas_tpu (expected a multiple of 128"),
    (dict(impl="pallas_tpu", block_t=24), "block_t=24 for pallas_tpu (expected a multiple of 16"),
    (dict(impl="pallas_gpu", block_t=48), "block_t=48 for pallas_gpu (expected a power of two >= 16"),
])
def test_bad_input_raises(kwargs, message):
  args = dict(hidden=np.zeros((6, 16), np.float32), w_unembed=np.zeros((16, 10), np.float32),
              targets=np.zeros((6,), np.int32))
  args.update(kwargs)
  with pytest.raises(CotsafeError) as err:
    logprob_entropy(args.pop("hidden"), args.pop("w_unembed"), args.pop("targets"), **args)
  assert str(err.value).startswith("cotsafe_jax: kernels.logprob_entropy: ")
  assert message in str(err.value)


def test_traced_temperature_raises():
  h, w, y, _, _ = make_inputs(4, 6, 16, 10, jnp.float32)
  with pytest.raises(CotsafeError, match="temperature must be a static Python float"):
    jax.jit(lambda t: logprob_entropy(h, w, y, temperature=t))(1.0)


@pytest.mark.parametrize("module,platform,call", [
    (pallas_tpu, "tpu", "tpu_custom_call"), (pallas_gpu, "cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("dtype,shape", [("float32", (300, 128, 1000)), ("bfloat16", (37, 20, 1031))])
def test_pallas_kernels_lower_for_their_platform(monkeypatch, module, platform, call, dtype, shape):
  """Compiled-mode lowering (Pallas -> Mosaic / Triton IR) runs on CPU: no interpret fallback.

  Block-shape rules, unsupported primitives and layouts the Pallas lowering knows are caught here;
  the Mosaic and Triton compilers themselves only run on a TPU / GPU (the marked tests below).
  """
  import importlib
  op = importlib.import_module("cotsafe_jax.kernels.logprob_entropy")
  monkeypatch.setattr(op, "target_platform", lambda mesh: "tpu" if module is pallas_tpu else "gpu")  # as for that target
  h, w, y, gl, ge = make_inputs(6, *shape, jnp.dtype(dtype))
  run = value_and_grads(y, gl, ge, impl=module.__name__.rsplit(".", 1)[1])
  text = run.trace(h, w).lower(lowering_platforms=(platform,)).as_text()
  # TPU: stats, dh, dW kernels; GPU: stats and dz (one vocabulary chunk at these sizes)
  assert text.count(call) == (3 if module is pallas_tpu else 2)


def _compiled_case(impl):
  h, w, y, gl, ge = make_inputs(11, 300, 256, 5000, jnp.bfloat16)
  logp, ent, dh, dw = value_and_grads(y, gl, ge, temperature=0.6, impl=impl)(h, w)
  want = ref64(as_f64(h), as_f64(w), np.asarray(y), 0.6, gl, ge)
  for name, got, ref, rel in zip(("logp", "entropy", "dh", "dW"), (logp, ent, dh, dw), want,
                                 (5e-6, 5e-6, 1.6e-2, 1.6e-2)):
    assert_close(f"{impl} {name}", got, ref, rel=rel)


@pytest.mark.tpu
def test_compiled_pallas_tpu_matches_float64():
  _compiled_case("pallas_tpu")


@pytest.mark.gpu
def test_compiled_pallas_gpu_matches_float64():
  _compiled_case("pallas_gpu")
