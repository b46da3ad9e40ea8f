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


def _softmax64(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def _fd_grad(f, theta, h=1e-6):
  """Central finite differences in float64."""
  g = np.zeros_like(theta)
  for j in range(theta.size):
    step = np.zeros_like(theta)
    step[j] = h
    g[j] = (f(theta + step) - f(theta - step)) / (2 * h)
  return g


def test_loss_gradients_match_float64_on_a_categorical():
  """E_{x ~ pi}[grad k(x)] over every outcome of a categorical pi = softmax(theta), gradient through
  log pi(x) only (the samples are fixed): k1 -> 0, k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi),
  checked against float64 finite differences of the exact divergences."""
  rng = np.random.default_rng(7)
  theta = rng.normal(scale=0.6, size=9)
  ref = _softmax64(rng.normal(scale=0.6, size=9))
  pi = _softmax64(theta)
  assert np.abs(np.log(pi / ref)).max() < 2.5  # no clamp binds: this is the estimators' own gradient
  reverse = lambda th: float(np.sum(_softmax64(th) * (np.log(_softmax64(th)) - np.log(ref))))  # noqa: E731
  forward = lambda th: float(np.sum(ref * (np.log(ref) - np.log(_softmax64(th)))))  # noqa: E731
  g_reverse, g_forward = _fd_grad(reverse, theta), _fd_grad(forward, theta)
  ref_logp = jnp.asarray(np.log(ref), jnp.float32)[None, :]
  weights = jnp.asarray(pi, jnp.float32)[None, :]  # every outcome x, weighted by pi(x): the exact expectation

  def expected_grad(kind):
    def loss(th):
      logp = jax.nn.log_softmax(th)[None, :]
      return jnp.sum(weights * rl.token_kl(logp, ref_logp, kind=kind))
    return np.asarray(jax.grad(loss)(jnp.asarray(theta, jnp.float32)), np.float64)

  np.testing.assert_allclose(expected_grad("k1"), 0.0, atol=1e-6)
  np.testing.assert_allclose(expected_grad("k2"), g_reverse, atol=2e-6)
  np.testing.assert_allclose(expected_grad("k3"), g_forward, atol=2e-6)
  assert np.abs(g_forward - g_reverse).max() > 0.02  # the two divergences' gradients really differ here
  # the value k3 estimates is still KL(pi || ref): its expectation under pi
  k3 = np.asarray(rl.token_kl(jnp.log(jnp.asarray(pi, jnp.float32))[None], ref_logp, kind="k3"))[0]
  np.testing.assert_allclose(np.sum(pi * k3), reverse(theta), rtol=1e-5)


def _k3_clamp_point():
  lo, hi = -5.0, 0.0  # k3(d) = e^-d - 1 + d decreases on d < 0: bisect k3 = 10
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.expm1(-mid) + mid > 10.0 else (lo, mid)
  return 0.5 * (lo + hi)


def test_kl_clamp_zeroes_the_k3_gradient_below_minus_2_61():
  d_star = _k3_clamp_point()
  assert d_star == pytest.approx(-2.610868, abs=1e-6)  # the number token_kl's docstring states
  d = jnp.asarray([[d_star - 0.01, d_star + 0.01, -1.0, 10.99, 11.01]], jnp.float32)
  grad = lambda clamp: np.asarray(jax.grad(  # noqa: E731
      lambda lp: jnp.sum(rl.token_kl(lp, jnp.zeros_like(lp), kind="k3", kl_clamp=clamp)))(d))[0]
  want = 1.0 - np.exp(-np.asarray(d, np.float64))[0]  # dk3/dd
  g = grad(10.0)
  assert g[0] == 0.0 and g[4] == 0.0  # clamped: log(pi/ref) < -2.61 or > 11.0 gets no KL gradient
  np.testing.assert_allclose(g[1:4], want[1:4], rtol=1e-5)
  np.testing.assert_allclose(grad(None), want, rtol=1e-5)  # no value clamp: the gradient is kept
  # the log-ratio clamp cuts every estimator's gradient beyond +-log_ratio_clamp
  g_lr = jax.grad(lambda lp: jnp.sum(rl.token_kl(lp, jnp.zeros_like(lp), kind="k2", kl_clamp=None,
                                                 log_ratio_clamp=5.0)))(jnp.asarray([[-6.0, 4.0]]))
  np.testing.assert_allclose(np.asarray(g_lr), [[0.0, 4.0]])


def test_k1_is_refused_as_a_loss():
  logp, ref = _logps(6)
  with pytest.raises(CotsafeError, match=r"kl_loss: kl_kind='k1' cannot be a loss: its expected gradient is "
                                         r"zero"):
    rl.kl_loss(logp, ref, MASK, kind="k1", num_tokens=1.0, num_seqs=1.0)
  from cotsafe_jax.rl.ppo import PPOConfig
  with pytest.raises(CotsafeError, match=r"PPOConfig \(kl_mode='loss'\): kl_kind='k1' cannot be a loss"):
    PPOConfig(kl_mode="loss", kl_kind="k1")
  for kind in ("k2", "k3"):
    PPOConfig(kl_mode="loss", kl_kind=kind)
  PPOConfig(kl_mode="reward", kl_kind="k1")  # in the reward k1 is the standard choice
  PPOConfig(kl_mode="none", kl_kind="k1")


def test_kl_errors():
  logp, ref = _logps(5)
  with pytest.raises(CotsafeError, match=r"token_kl: kind='k4' is not one of k1, k2, k3"):
    rl.token_kl(logp, ref, kind="k4")
  with pytest.raises(CotsafeError, match=r"ref_logp_bt has shape \(5, 6\) but logp_bt has \(5, 7\)"):
    rl.token_kl(logp, ref[:, :6])
