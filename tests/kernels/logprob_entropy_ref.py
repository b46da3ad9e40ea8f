"""Float64 NumPy twin of kernels.logprob_entropy and the helpers its tests share.

Written from the definitions (log-softmax, -sum p log p) and the analytic gradient; that gradient is
itself checked against central finite differences in test_logprob_entropy.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax.kernels import logprob_entropy


def ref64(h_nd, w_dv, y_n, temperature, g_logp_n, g_ent_n):
  """(logp, entropy, dh, dW) in float64; a target outside [0, V) has z_y = 0 (logp = -lse)."""
  h, w = np.asarray(h_nd, np.float64), np.asarray(w_dv, np.float64)
  y = np.asarray(y_n)
  gl, ge = np.asarray(g_logp_n, np.float64), np.asarray(g_ent_n, np.float64)
  n, v = h.shape[0], w.shape[1]
  z = h @ w / temperature
  m = z.max(axis=1, keepdims=True)
  e = np.exp(z - m)
  lse = m[:, 0] + np.log(e.sum(axis=1))
  p = e / e.sum(axis=1, keepdims=True)
  onehot = np.zeros_like(z)
  inside = (y >= 0) & (y < v)
  onehot[np.arange(n)[inside], y[inside]] = 1.0
  logp = (onehot * z).sum(axis=1) - lse
  ent = -(p * (z - lse[:, None])).sum(axis=1)
  mu = (p * z).sum(axis=1)
  dz = (gl[:, None] * (onehot - p) - ge[:, None] * p * (z - mu[:, None])) / temperature
  return logp, ent, dz @ w.T, h.T @ dz


def as_f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def make_inputs(seed: int, t: int, d: int, v: int, dtype, *, logit_scale: float = 3.0,
                out_of_range: bool = True):
  """Fresh random h [T, D], W [D, V] (in `dtype`), targets and output cotangents.

  Logits have standard deviation ~logit_scale; with `out_of_range` about 1 target in 8 is a pad
  id (-100 or V) to pin the documented out-of-range behaviour.
  """
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(t, d))
  w = rng.normal(size=(d, v)) * logit_scale / np.sqrt(d)
  y = rng.integers(0, v, size=t)
  if out_of_range:
    pad = rng.random(t) < 0.125
    y = np.where(pad, rng.choice([-100, v], size=t), y)
  g_logp, g_ent = rng.normal(size=t), rng.normal(size=t)
  return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(y, jnp.int32),
          jnp.asarray(g_logp, jnp.float32), jnp.asarray(g_ent, jnp.float32))


def value_and_grads(y, g_logp, g_ent, **kw):
  """One jitted function (h, w) -> (logp, entropy, dh, dW) for the cotangents (g_logp, g_ent)."""
  def run(h, w):
    (logp, ent), vjp = jax.vjp(lambda h, w: logprob_entropy(h, w, y, **kw), h, w)
    return (logp, ent, *vjp((g_logp, g_ent)))
  return jax.jit(run)


def assert_close(name, got, want, *, rel: float, floor: float = 0.0) -> None:
  """|got - want| <= rel * max|want| + floor, elementwise (max-norm relative error)."""
  got, want = as_f64(got), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  err = float(np.max(np.abs(got - want))) if want.size else 0.0
  assert err <= rel * scale + floor, f"{name}: max error {err:.3g} > {rel} * {scale:.3g} + {floor}"
