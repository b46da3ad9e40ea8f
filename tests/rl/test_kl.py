"""KL estimators k1/k2/k3 with clamps, the reward penalty and the loss term, against NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax import rl

B, T = 5, 7
MASK = np.array([[1, 1, 1, 1, 1, 1, 1],
                 [0, 0, 1, 1, 1, 1, 1],
                 [1, 1, 1, 0, 0, 0, 0],
                 [0, 1, 1, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0, 0, 0]], np.float32)  # last row: nothing valid


def _logps(seed):
  rng = np.random.default_rng(seed)
  logp = -rng.exponential(size=(B, T)).astype(np.float32)
  ref = logp + rng.normal(scale=0.7, size=(B, T)).astype(np.float32)
  ref[0, 0], ref[0, 1], ref[1, 3] = logp[0, 0] + 30.0, logp[0, 1] - 30.0, logp[1, 3] + 12.0
  return logp, ref


def _kl_loop(logp, ref, kind, lr_clamp, kl_clamp):
  out = np.zeros(logp.shape)
  for idx in np.ndindex(*logp.shape):
    d = float(logp[idx]) - float(ref[idx])
    if lr_clamp is not None:
      d = min(max(d, -lr_clamp), lr_clamp)
    k = {"k1": d, "k2": 0.5 * d * d, "k3": np.exp(-d) - 1.0 + d}[kind]
    if kl_clamp is not None:
      k = min(max(k, -kl_clamp), kl_clamp)
    out[idx] = k
  return out


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("lr_clamp,kl_clamp", [(20.0, 10.0), (5.0, None), (None, None)])
def test_token_kl_matches_numpy(kind, lr_clamp, kl_clamp):
  logp, ref = _logps(0)
  kl = rl.token_kl(logp, ref, kind=kind, log_ratio_clamp=lr_clamp, kl_clamp=kl_clamp)
  want = _kl_loop(logp, ref, kind, lr_clamp, kl_clamp)
  assert kl.dtype == jnp.float32
  np.testing.assert_allclose(kl, want, rtol=2e-5, atol=1e-5)


def test_clamps_bind():
  logp, ref = _logps(0)  # d = logp - ref is -30 at [0, 0] and +30 at [0, 1]
  k3 = np.asarray(rl.token_kl(logp, ref, kind="k3"))
  assert k3[0, 0] == 10.0 and k3[0, 1] == 10.0  # result clamp
  k3 = np.asarray(rl.token_kl(logp, ref, kind="k3", kl_clamp=None))
  np.testing.assert_allclose(k3[0, :2], [np.exp(20.0) - 21.0, 19.0], rtol=1e-5)  # d clamped to +-20
  k1 = np.asarray(rl.token_kl(logp, ref, kind="k1", kl_clamp=None))
  assert k1[0, 0] == -20.0 and k1[0, 1] == 20.0
  assert np.all(np.asarray(rl.token_kl(logp, ref, kind="k3", kl_clamp=None, log_ratio_clamp=5.0)) >= 0)


def test_k1_k3_unbiased_on_a_categorical():
  rng = np.random.default_rng(1)
  p = rng.dirichlet(np.ones(6) * 2.0)
  q = rng.dirichlet(np.ones(6) * 2.0)
  exact = float(np.sum(p * np.log(p / q)))
  x = rng.choice(6, size=(4, 50_000), p=p)
  logp, ref = np.log(p)[x].astype(np.float32), np.log(q)[x].astype(np.float32)
  k1 = float(jnp.mean(rl.token_kl(logp, ref, kind="k1")))
  k3_all = np.asarray(rl.token_kl(logp, ref, kind="k3"))
  assert abs(k1 - exact) < 0.02 and abs(k3_all.mean() - exact) < 0.02
  assert k3_all.min() >= 0.0


def test_kl_penalty_in_reward():
  logp, ref = _logps(2)
  rewards = np.random.default_rng(3).normal(size=(B, T)).astype(np.float32)
  fn = jax.jit(functools.partial(rl.kl_penalty_in_reward, beta=0.3, kind="k3"))
  new_r, kl = fn(rewards, logp, ref, MASK)
  kl_ref = _kl_loop(logp, ref, "k3", 20.0, 10.0) * MASK
  np.testing.assert_allclose(kl, kl_ref, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(new_r, rewards - 0.3 * kl_ref, rtol=2e-5, atol=1e-5)
  # a jax scalar beta (from the adaptive controller) works, and no gradient flows into the policy
  penalised = lambda lp: rl.kl_penalty_in_reward(rewards, lp, ref, MASK, beta=jnp.float32(0.3))[0]
  g = jax.grad(lambda lp: jnp.sum(penalised(lp)))(logp)
  assert np.all(np.asarray(g) == 0.0)


def _agg_loop(x, m, agg, num_tokens, num_seqs):
  if agg == "token-mean":
    return sum(float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if m[b, t]) / num_tokens
  rows = []
  for b in range(x.shape[0]):
    s, n = sum(float(x[b, t]) for t in range(x.shape[1]) if m[b, t]), m[b].sum()
    rows.append(s / max(n, 1) if agg == "seq-mean-token-mean" else s)
  return sum(rows) / num_seqs


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_kl_loss_aggregates(agg):
  logp, ref = _logps(4)
  num_tokens, num_seqs = rl.loss_normalizers(MASK)
  assert float(num_tokens) == MASK.sum() and float(num_seqs) == 4.0  # empty row not counted
  loss, metrics = rl.kl_loss(logp, ref, MASK, kind="k2", agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
  want = _agg_loop(_kl_loop(logp, ref, "k2", 20.0, 10.0), MASK, agg, MASK.sum(), 4.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(metrics["kl_loss"]) == float(loss)
  # gradient reaches the policy, never the frozen reference
  g_ref = jax.grad(lambda r: rl.kl_loss(logp, r, MASK, kind="k3", agg=agg, num_tokens=num_tokens,
                                        num_seqs=num_seqs)[0])(ref)
  assert np.all(np.asarray(g_ref) == 0.0)


def test_kl_errors():
  logp, ref = _logps(5)
  with pytest.raises(CotsafeError, match=r"token_kl: kind='k4' is not one of k1, k2, k3"):
    rl.token_kl(logp, ref, kind="k4")
  with pytest.raises(CotsafeError, match=r"ref_logp_bt has shape \(5, 6\) but logp_bt has \(5, 7\)"):
    rl.token_kl(logp, ref[:, :6])
