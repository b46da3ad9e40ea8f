"""Optimizer: schedule values against the formula, AdamW decay mask, clipping, mixed precision."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax import train


def _lr_formula(step, *, lr, warmup, total, min_ratio, schedule):
  if step < warmup:
    return lr * step / warmup
  if schedule == "constant":
    return lr
  lo = lr * min_ratio
  frac = min(step - warmup, total - warmup) / (total - warmup)
  return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))


@pytest.mark.parametrize("schedule,warmup,min_ratio", [("cosine", 10, 0.1), ("cosine", 0, 0.0),
                                                       ("constant", 7, 0.0), ("constant", 0, 0.0)])
def test_schedule_values(schedule, warmup, min_ratio):
  kw = dict(lr=3e-4, warmup=warmup, total=100, min_ratio=min_ratio, schedule=schedule)
  sched = train.make_schedule(learning_rate=3e-4, schedule=schedule, warmup_steps=warmup,
                              total_steps=100, min_lr_ratio=min_ratio)
  for step in [0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 150]:
    # atol: float32 cos near pi
    np.testing.assert_allclose(float(sched(step)), _lr_formula(step, **kw), rtol=1e-5, atol=3e-10,
                               err_msg=f"step {step}")
  if schedule == "cosine":
    assert float(sched(100)) == pytest.approx(3e-4 * min_ratio, rel=1e-6, abs=1e-12)


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"w_dv": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
          "norm": {"scale": jnp.ones((3,), jnp.float32)},
          "embed_vd": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}


def test_weight_decay_skips_1d_params():
  params = _params()
  assert train.decay_mask(params) == {"dense": {"w_dv": True, "bias": False},
                                      "norm": {"scale": False}, "embed_vd": True}
  opt = train.make_optimizer(learning_rate=0.1, schedule="constant", warmup_steps=0, total_steps=10,
                             weight_decay=0.5, max_grad_norm=1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)  # zero grads: Adam's step is 0, only decay moves
  updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  np.testing.assert_allclose(new["dense"]["w_dv"], params["dense"]["w_dv"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(new["embed_vd"], params["embed_vd"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
  np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])


@pytest.mark.parametrize("max_grad_norm", [0.5, None])
def test_first_step_matches_adam_on_clipped_grads(max_grad_norm):
  # eps = 1 makes Adam's first step g / (|g| + 1), so the clip scale shows in the update
  params = _params()
  grads = jax.tree.map(lambda p: 3.0 * jnp.sin(p * 7.0 + 1.0), params)
  opt = train.make_optimizer(learning_rate=0.01, schedule="cosine", warmup_steps=0, total_steps=50,
                             weight_decay=0.0, b1=0.9, b2=0.99, eps=1.0, max_grad_norm=max_grad_norm)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  norm = math.sqrt(sum(float((g ** 2).sum()) for g in leaves))
  scale = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / norm)
  assert scale < 1.0 or max_grad_norm is None
  for g, u in zip(leaves, jax.tree.leaves(updates)):
    gc = g * scale  # bias-corrected m = g, v = g^2 on the first step
    np.testing.assert_allclose(u, -0.01 * gc / (np.abs(gc) + 1.0), rtol=1e-5, atol=1e-9)


def test_bf16_compute_float32_master():
  params = _params()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)), jnp.float32)

  def loss_fn(p, x_bd):
    h = x_bd.astype(p["dense"]["w_dv"].dtype) @ p["dense"]["w_dv"] + p["dense"]["bias"]
    return jnp.mean(jnp.square(h.astype(jnp.float32)))

  mixed = train.with_compute_dtype(loss_fn, dtype=jnp.bfloat16)
  loss, grads = jax.value_and_grad(mixed)(params, x)
  loss32, grads32 = jax.value_and_grad(loss_fn)(params, x)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(loss, loss32, rtol=3e-2)
  np.testing.assert_allclose(grads["dense"]["w_dv"], grads32["dense"]["w_dv"], rtol=5e-2, atol=5e-2)
  cast = train.cast_floating({"a": jnp.ones(2), "i": jnp.arange(2)}, dtype=jnp.bfloat16)
  assert cast["a"].dtype == jnp.bfloat16 and cast["i"].dtype == jnp.int32


def test_optimizer_errors():
  with pytest.raises(CotsafeError, match=r"schedule='linear' is not one of cosine, constant"):
    train.make_schedule(learning_rate=1e-3, schedule="linear", warmup_steps=0, total_steps=10)
  with pytest.raises(CotsafeError, match=r"warmup_steps=10 must be < total_steps=10"):
    train.make_schedule(learning_rate=1e-3, warmup_steps=10, total_steps=10)
  with pytest.raises(CotsafeError, match=r"learning_rate=0.0 must be > 0"):
    train.make_optimizer(learning_rate=0.0, warmup_steps=0, total_steps=10)
  with pytest.raises(CotsafeError, match=r"weight_decay=-0.1 must be >= 0"):
    train.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=-0.1)
