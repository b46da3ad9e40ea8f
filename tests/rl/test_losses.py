"""PPO policy / value losses and aggregation against python loops; microbatch sums = full batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax import rl

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
B, T = 6, 7
MASK = np.array([[1, 1, 1, 1, 1, 1, 1],
                 [0, 0, 1, 1, 1, 1, 1],
                 [1, 1, 1, 0, 0, 0, 0],
                 [0, 1, 1, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0, 0, 0],
                 [0, 0, 0, 1, 0, 0, 0]], np.float32)
NUM_TOKENS, NUM_SEQS = float(MASK.sum()), 5.0


def _inputs(seed):
  rng = np.random.default_rng(seed)
  old = -rng.exponential(size=(B, T)).astype(np.float32)
  logp = old + rng.normal(scale=0.6, size=(B, T)).astype(np.float32)
  logp[0, 0], logp[0, 1] = old[0, 0] + 25.0, old[0, 1] + 2.0  # ratio far above any clip / dual c
  adv = rng.normal(size=(B, T)).astype(np.float32)
  adv[0, 0], adv[0, 1] = -1.5, -0.7
  ent = rng.uniform(0.0, 3.0, size=(B, T)).astype(np.float32)
  return logp, old, adv, ent


def _agg_loop(x, m, agg, num_tokens=NUM_TOKENS, num_seqs=NUM_SEQS):
  if agg == "token-mean":
    return sum(float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if m[b, t]) / num_tokens
  total = 0.0
  for b in range(x.shape[0]):
    s, n = sum(float(x[b, t]) for t in range(x.shape[1]) if m[b, t]), float(m[b].sum())
    total += s / max(n, 1.0) if agg == "seq-mean-token-mean" else s
  return total / num_seqs


def _policy_loop(logp, old, adv, cl, ch, c):
  loss = np.zeros(logp.shape)
  upper, lower, dual = np.zeros(logp.shape), np.zeros(logp.shape), np.zeros(logp.shape)
  kl = np.zeros(logp.shape)
  for idx in np.ndindex(*logp.shape):
    d = min(max(float(logp[idx]) - float(old[idx]), -20.0), 20.0)
    r, a = np.exp(d), float(adv[idx])
    l = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
    if c is not None and a < 0:
      dual[idx] = l > -a * c
      l = min(l, -a * c)
    loss[idx] = l
    upper[idx] = a > 0 and r > 1 + ch
    lower[idx] = a < 0 and r < 1 - cl
    kl[idx] = r - 1 - d
  return loss, upper, lower, dual, kl


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("cl,ch,c", [(0.2, 0.28, 3.0), (0.2, 0.2, None)])
def test_policy_loss_matches_loop(agg, cl, ch, c):
  logp, old, adv, ent = _inputs(0)
  cfg = rl.PolicyLoss(clip_low=cl, clip_high=ch, dual_clip_c=c, entropy_coef=0.01, agg=agg)
  loss, m = jax.jit(lambda lp: cfg(logp_bt=lp, old_logp_bt=old, advantages_bt=adv, mask_bt=MASK,
                                   entropy_bt=ent, num_tokens=NUM_TOKENS, num_seqs=NUM_SEQS))(logp)
  tok, upper, lower, dual, kl = _policy_loop(logp, old, adv, cl, ch, c)
  pg = _agg_loop(tok, MASK, agg)
  np.testing.assert_allclose(m["pg_loss"], pg, rtol=1e-5)
  np.testing.assert_allclose(loss, pg - 0.01 * _agg_loop(ent, MASK, agg), rtol=1e-5)
  for name, want in [("clipfrac_upper", upper), ("clipfrac_lower", lower), ("clipfrac_dual", dual)]:
    np.testing.assert_allclose(m[name], _agg_loop(want, MASK, "token-mean"), rtol=1e-6, err_msg=name)
  # every regime is exercised by these inputs
  assert float(m["clipfrac_upper"]) > 0 and float(m["clipfrac_lower"]) > 0
  assert (float(m["clipfrac_dual"]) > 0) == (c is not None)
  approx_kl = _agg_loop(np.where(MASK > 0, kl, 0.0), MASK, "token-mean")
  np.testing.assert_allclose(m["approx_kl"], approx_kl, rtol=1e-4)
  np.testing.assert_allclose(m["entropy"], _agg_loop(ent, MASK, "token-mean"), rtol=1e-5)


def test_policy_gradient_zero_where_clipped():
  logp, old, adv, _ = _inputs(1)
  cfg = rl.PolicyLoss(clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)
  g = jax.jit(jax.grad(lambda lp: cfg(logp_bt=lp, old_logp_bt=old, advantages_bt=adv, mask_bt=MASK,
                                      num_tokens=NUM_TOKENS, num_seqs=NUM_SEQS)[0]))(logp)
  want = np.zeros(logp.shape)
  for idx in np.ndindex(*logp.shape):
    r, a = np.exp(min(max(float(logp[idx] - old[idx]), -20.0), 20.0)), float(adv[idx])
    cut = (a > 0 and r > 1.28) or (a < 0 and r < 0.8) or (a < 0 and r > 3.0)
    want[idx] = 0.0 if cut or not MASK[idx] else -a * r / NUM_TOKENS  # d(-A r)/dlogp = -A r
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_entropy_coef_zero_only_logs_and_dtype():
  logp, old, adv, ent = _inputs(2)
  args = dict(old_logp_bt=old, advantages_bt=adv, mask_bt=MASK, num_tokens=NUM_TOKENS, num_seqs=NUM_SEQS)
  loss_e, m = rl.PolicyLoss()(logp_bt=jnp.asarray(logp, jnp.bfloat16), entropy_bt=ent, **args)
  loss_n, _ = rl.PolicyLoss()(logp_bt=jnp.asarray(logp, jnp.bfloat16), **args)
  assert loss_e.dtype == jnp.float32 and float(loss_e) == float(loss_n) == float(m["pg_loss"])
  np.testing.assert_allclose(m["entropy"], _agg_loop(ent, MASK, "token-mean"), rtol=1e-5)
  g = jax.grad(lambda e: rl.PolicyLoss()(logp_bt=logp, entropy_bt=e, **args)[0])(ent)
  assert np.all(np.asarray(g) == 0.0)


def _value_loop(v, v_old, ret, eps):
  out, clipped = np.zeros(v.shape), np.zeros(v.shape)
  for idx in np.ndindex(*v.shape):
    l1 = (float(v[idx]) - float(ret[idx])) ** 2
    if eps is None:
      out[idx] = l1
      continue
    vc = float(v_old[idx]) + min(max(float(v[idx]) - float(v_old[idx]), -eps), eps)
    l2 = (vc - float(ret[idx])) ** 2
    out[idx], clipped[idx] = max(l1, l2), abs(float(v[idx]) - float(v_old[idx])) > eps and l2 > l1
  return out, clipped


def _ev_loop(v, ret, m):
  rv = [(float(ret[i]), float(v[i])) for i in np.ndindex(*m.shape) if m[i]]
  n = len(rv)
  mr = sum(r for r, _ in rv) / n
  md = sum(r - x for r, x in rv) / n
  var_r = sum((r - mr) ** 2 for r, _ in rv) / n
  var_d = sum((r - x - md) ** 2 for r, x in rv) / n
  return 1.0 - var_d / var_r


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("eps", [0.2, None])
def test_value_loss_matches_loop(agg, eps):
  rng = np.random.default_rng(3)
  ret = rng.normal(size=(B, T)).astype(np.float32)
  v_old = ret + rng.normal(scale=0.5, size=(B, T)).astype(np.float32)
  v = v_old + rng.normal(scale=0.4, size=(B, T)).astype(np.float32)
  loss, m = jax.jit(rl.ValueLoss(clip_eps=eps, agg=agg).__call__)(
      values_bt=v, old_values_bt=v_old, returns_bt=ret, mask_bt=MASK, num_tokens=NUM_TOKENS,
      num_seqs=NUM_SEQS)
  tok, clipped = _value_loop(v, v_old, ret, eps)
  np.testing.assert_allclose(loss, 0.5 * _agg_loop(tok, MASK, agg), rtol=1e-5)
  np.testing.assert_allclose(m["vf_clipfrac"], _agg_loop(clipped, MASK, "token-mean"), rtol=1e-6)
  assert (float(m["vf_clipfrac"]) > 0) == (eps is not None)
  np.testing.assert_allclose(m["value_error"], _agg_loop((v - ret) ** 2, MASK, "token-mean"), rtol=1e-5)
  np.testing.assert_allclose(m["explained_variance"], _ev_loop(v, ret, MASK), rtol=1e-4)


def test_explained_variance():
  rng = np.random.default_rng(4)
  ret = rng.normal(size=(B, T)).astype(np.float32)
  v = (0.8 * ret + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
  ev = float(rl.explained_variance(v, ret, MASK))
  np.testing.assert_allclose(ev, _ev_loop(v, ret, MASK), rtol=1e-5)
  assert 0.5 < ev < 1.0
  assert float(rl.explained_variance(ret, ret, MASK)) == 1.0
  assert np.isnan(float(rl.explained_variance(v, np.ones((B, T), np.float32), MASK)))


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_matches_loop_and_empty_batch(agg):
  x = np.random.default_rng(5).normal(size=(B, T)).astype(np.float32)
  n_tok, n_seq = rl.loss_normalizers(MASK)
  assert float(n_tok) == NUM_TOKENS and float(n_seq) == NUM_SEQS
  np.testing.assert_allclose(rl.aggregate(x, MASK, agg=agg, num_tokens=n_tok, num_seqs=n_seq),
                             _agg_loop(x, MASK, agg), rtol=1e-5)
  zeros = np.zeros((B, T), np.float32)
  assert float(rl.aggregate(x, zeros, agg=agg, num_tokens=0.0, num_seqs=0.0)) == 0.0


def test_microbatch_sums_equal_full_batch():
  logp, old, adv, ent = _inputs(6)
  rng = np.random.default_rng(7)
  ret, v_old = rng.normal(size=(2, B, T)).astype(np.float32)
  v = v_old + rng.normal(scale=0.4, size=(B, T)).astype(np.float32)
  ref = logp + rng.normal(scale=0.3, size=(B, T)).astype(np.float32)
  n_tok, n_seq = rl.loss_normalizers(MASK)

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def losses(logp_, old_, adv_, ent_, v_, v_old_, ret_, ref_, mask_):
    # every aggregation mode in one compile: [agg, (policy, value, kl, 3 token metrics)]
    c = dict(mask_bt=mask_, num_tokens=n_tok, num_seqs=n_seq)
    rows = []
    for agg in AGGS:
      pol = rl.PolicyLoss(clip_high=0.28, entropy_coef=0.02, agg=agg)
      pl, pm = pol(logp_bt=logp_, old_logp_bt=old_, advantages_bt=adv_, entropy_bt=ent_, **c)
      vl, _ = rl.ValueLoss(agg=agg)(values_bt=v_, old_values_bt=v_old_, returns_bt=ret_, **c)
      kl, _ = rl.kl_loss(logp_, ref_, kind="k3", agg=agg, **c)
      rows.append(jnp.stack([pl, vl, kl, pm["clipfrac_upper"], pm["approx_kl"], pm["entropy"]]))
    parts = jnp.stack(rows)
    # distinct weights per mode so one mode's gradient error cannot hide behind another's
    return jnp.sum(parts[:, :3] * jnp.array([[1.0], [10.0], [100.0]])), parts

  arrays = (logp, old, adv, ent, v, v_old, ret, ref, MASK)
  (_, full), g_full = _with_aux(losses, arrays, slice(0, B))
  assert np.all(np.abs(full[:, :3]) > 1e-3)
  parts = [slice(0, 2), slice(2, 3), slice(3, B)]  # uneven microbatches, one of them with an empty row
  outs = [_with_aux(losses, arrays, sl) for sl in parts]
  np.testing.assert_allclose(sum(o[0][1] for o in outs), full, rtol=1e-6, atol=1e-7)
  g_sum = np.concatenate([o[1] for o in outs], axis=0)  # each microbatch's grad covers its own rows
  np.testing.assert_allclose(g_sum, g_full, rtol=1e-5, atol=1e-8)


def _with_aux(fn, arrays, sl):
  (loss, parts), g = fn(*[a[sl] for a in arrays])
  return (loss, np.asarray(parts)), np.asarray(g)


def test_loss_errors():
  logp, old, adv, _ = _inputs(8)
  with pytest.raises(CotsafeError, match=r"PolicyLoss: agg='mean' is not one of token-mean"):
    rl.PolicyLoss(agg="mean")
  with pytest.raises(CotsafeError, match=r"clip_low=1.2 must be in \(0, 1\)"):
    rl.PolicyLoss(clip_low=1.2)
  with pytest.raises(CotsafeError, match=r"dual_clip_c=0.5 must be > 1"):
    rl.PolicyLoss(dual_clip_c=0.5)
  with pytest.raises(CotsafeError, match=r"ValueLoss: clip_eps=0.0 must be > 0"):
    rl.ValueLoss(clip_eps=0.0)
  with pytest.raises(CotsafeError, match=r"entropy_coef=0.1 needs entropy_bt"):
    rl.PolicyLoss(entropy_coef=0.1)(logp_bt=logp, old_logp_bt=old, advantages_bt=adv, mask_bt=MASK,
                                    num_tokens=1.0, num_seqs=1.0)
  with pytest.raises(CotsafeError, match=r"PolicyLoss: mask_bt has shape \(6, 6\) but logp_bt has \(6, 7\)"):
    rl.PolicyLoss()(logp_bt=logp, old_logp_bt=old, advantages_bt=adv, mask_bt=MASK[:, :6],
                    num_tokens=1.0, num_seqs=1.0)
  with pytest.raises(CotsafeError, match=r"aggregate: x_bt must be \[B, T\], got shape \(42,\)"):
    rl.aggregate(logp.ravel(), MASK.ravel(), agg="token-mean", num_tokens=1.0, num_seqs=1.0)
