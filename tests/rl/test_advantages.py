"""Advantage estimators against plain python loops, on masks with left/right padding and holes."""
import functools

import jax
import numpy as np
import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax import rl

B, T = 5, 7
# row 0 full; row 1 left padding; row 2 ended early (right padding); row 3 both; row 4 a masked
# token in the middle (e.g. a tool observation)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1],
                 [0, 0, 0, 1, 1, 1, 1],
                 [1, 1, 1, 1, 0, 0, 0],
                 [0, 1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 1, 1, 1, 0]], np.float32)


def _rand(seed, shape=(B, T)):
  # dense token rewards, with junk on padding that the estimators must ignore
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _gae_loop(r, v, m, gamma, lam, finished=None, bootstrap=None):
  adv, ret = np.zeros(r.shape), np.zeros(r.shape)
  for b in range(r.shape[0]):
    valid = [t for t in range(r.shape[1]) if m[b, t] > 0]
    next_v, last = 0.0, 0.0
    if finished is not None and not finished[b]:
      next_v = float(bootstrap[b])  # cut at max_new_tokens: the critic's value after the last token
    for t in reversed(valid):
      delta = float(r[b, t]) + gamma * next_v - float(v[b, t])
      last = delta + gamma * lam * last
      adv[b, t], ret[b, t] = last, last + float(v[b, t])
      next_v = float(v[b, t])
  return adv, ret


def _returns_loop(r, m, gamma):
  out = np.zeros(r.shape)
  for b in range(r.shape[0]):
    g = 0.0
    for t in reversed(range(r.shape[1])):
      if m[b, t] > 0:
        g = float(r[b, t]) + gamma * g
        out[b, t] = g
  return out


def _whiten_loop(x, m, shift_mean=True, eps=1e-8):
  vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if m[b, t] > 0]
  mean = sum(vals) / len(vals)
  var = sum((a - mean) ** 2 for a in vals) / (len(vals) - 1)
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if m[b, t] > 0:
        out[b, t] = (float(x[b, t]) - mean) / np.sqrt(var + eps) + (0.0 if shift_mean else mean)
  return out


def _scores_loop(r, m):
  return [sum(float(r[b, t]) for t in range(r.shape[1]) if m[b, t] > 0) for b in range(r.shape[0])]


def _token_term_loop(tok, m, gamma):
  """G_t = sum over valid t' >= t of gamma^(valid steps from t to t') tok_t'; gamma = 0: tok_t alone."""
  out = np.zeros(m.shape)
  for b in range(m.shape[0]):
    valid = [t for t in range(m.shape[1]) if m[b, t] > 0]
    for k, t in enumerate(valid):
      out[b, t] = sum(gamma ** j * float(tok[b, valid[k + j]]) for j in range(len(valid) - k))
  return out


def _grpo_loop(r, m, n, scale_by_std, floor=0.01, seq=None, tok=None, token_gamma=0.0):
  s = _scores_loop(r, m) if seq is None else [float(x) for x in seq]
  out = np.zeros(m.shape)
  for g in range(0, len(s), n):
    grp = s[g:g + n]
    mean = sum(grp) / n
    std = np.sqrt(sum((a - mean) ** 2 for a in grp) / (n - 1))
    for i in range(n):
      a = (grp[i] - mean) / max(std, floor) if scale_by_std else grp[i] - mean
      out[g + i] = a * m[g + i]
  if tok is not None:
    out = out + _token_term_loop(tok, m, token_gamma)
  return out


def _rloo_loop(r, m, n, seq=None, tok=None, token_gamma=0.0):
  s = _scores_loop(r, m) if seq is None else [float(x) for x in seq]
  out = np.zeros(m.shape)
  for g in range(0, len(s), n):
    for i in range(n):
      others = [s[g + j] for j in range(n) if j != i]
      out[g + i] = (s[g + i] - sum(others) / len(others)) * m[g + i]
  if tok is not None:
    out = out + _token_term_loop(tok, m, token_gamma)
  return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_plain_loop(gamma, lam):
  r, v = _rand(0), _rand(1)
  fn = jax.jit(functools.partial(rl.gae, gamma=gamma, lam=lam))
  adv, ret = fn(r, v, MASK)
  ref_adv, ref_ret = _gae_loop(r, v, MASK, gamma, lam)
  assert adv.dtype == np.float32 and adv.shape == (B, T)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[MASK == 0] == 0) and np.all(np.asarray(ret)[MASK == 0] == 0)


def test_gae_hand_values_and_padding_invariance():
  # gamma = lam = 1: A_t = reward-to-go - V_t
  r = np.array([[1.0, 2.0, 3.0]], np.float32)
  v = np.array([[0.5, 0.25, 1.0]], np.float32)
  adv, ret = rl.gae(r, v, np.ones((1, 3)), gamma=1.0, lam=1.0)
  np.testing.assert_allclose(adv, [[5.5, 4.75, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[6.0, 5.0, 3.0]], rtol=1e-6)
  # gamma = 0.5, lam = 0: one-step TD errors; the last valid token is terminal
  adv, _ = rl.gae(r, v, np.ones((1, 3)), gamma=0.5, lam=0.0)
  np.testing.assert_allclose(adv, [[1.0 + 0.125 - 0.5, 2.0 + 0.5 - 0.25, 3.0 - 1.0]], rtol=1e-6)
  # the same row left-padded by 2 or right-padded by 2 gives the same values on its tokens
  pad = np.zeros((1, 2), np.float32)
  left, _ = rl.gae(np.concatenate([pad + 9, r], 1), np.concatenate([pad + 9, v], 1),
                   np.concatenate([pad, np.ones((1, 3))], 1), gamma=0.9, lam=0.8)
  right, _ = rl.gae(np.concatenate([r, pad + 9], 1), np.concatenate([v, pad + 9], 1),
                    np.concatenate([np.ones((1, 3)), pad], 1), gamma=0.9, lam=0.8)
  np.testing.assert_allclose(np.asarray(left)[0, 2:], np.asarray(right)[0, :3], rtol=1e-6)


def test_discounted_returns_and_reinforce_pp():
  r = _rand(2)
  ret = rl.discounted_returns(r, MASK, gamma=0.9)
  np.testing.assert_allclose(ret, _returns_loop(r, MASK, 0.9), rtol=1e-5, atol=1e-6)
  adv, ret = jax.jit(functools.partial(rl.reinforce_pp_advantages, gamma=0.95))(r, MASK)
  ref_ret = _returns_loop(r, MASK, 0.95)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adv, _whiten_loop(ref_ret, MASK), rtol=1e-5, atol=1e-5)
  valid = np.asarray(adv)[MASK > 0]
  assert abs(valid.mean()) < 1e-5 and abs(valid.std(ddof=1) - 1.0) < 1e-4


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
  x = _rand(3) * 3.0 + 2.0
  out = rl.masked_whiten(x, MASK, shift_mean=shift_mean)
  np.testing.assert_allclose(out, _whiten_loop(x, MASK, shift_mean), rtol=1e-5, atol=1e-5)


def test_sequence_scores_sum_token_rewards():
  r = _rand(4)
  np.testing.assert_allclose(rl.sequence_scores(r, MASK), _scores_loop(r, MASK), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_plain_loop(scale_by_std):
  r, m = _rand(5, (6, T)), np.concatenate([MASK, MASK[2:3]], 0)
  fn = jax.jit(functools.partial(rl.grpo_advantages, group_size=3, scale_by_std=scale_by_std))
  adv = fn(r, m)
  np.testing.assert_allclose(adv, _grpo_loop(r, m, 3, scale_by_std), rtol=1e-5, atol=1e-5)
  per_row = np.asarray(adv).sum(1) / m.sum(1)
  np.testing.assert_allclose(per_row.reshape(2, 3).sum(1), 0.0, atol=1e-5)  # zero-mean per group


def test_rloo_matches_plain_loop():
  r, m = _rand(6, (8, T)), np.concatenate([MASK, MASK[:3]], 0)
  adv = jax.jit(functools.partial(rl.rloo_advantages, group_size=4))(r, m)
  np.testing.assert_allclose(adv, _rloo_loop(r, m, 4), rtol=1e-5, atol=1e-5)


def test_compute_advantages_dispatch():
  r, v, m = _rand(7, (6, T)), _rand(8, (6, T)), np.concatenate([MASK, MASK[1:2]], 0)
  cfg = rl.AdvantageConfig(estimator="gae", gamma=0.99, lam=0.9, whiten=True)
  adv, ret = rl.compute_advantages(cfg, rewards_bt=r, mask_bt=m, values_bt=v)
  ref_adv, ref_ret = _gae_loop(r, v, m, 0.99, 0.9)
  np.testing.assert_allclose(adv, _whiten_loop(ref_adv, m), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  cfg = rl.AdvantageConfig(estimator="grpo", group_size=2, grpo_scale_by_std=False)
  adv, ret = rl.compute_advantages(cfg, rewards_bt=r, mask_bt=m)
  np.testing.assert_allclose(adv, _grpo_loop(r, m, 2, False), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, np.array(_scores_loop(r, m))[:, None] * m, rtol=1e-5, atol=1e-5)
  cfg = rl.AdvantageConfig(estimator="rloo", group_size=3)
  adv, _ = rl.compute_advantages(cfg, rewards_bt=r, mask_bt=m)
  np.testing.assert_allclose(adv, _rloo_loop(r, m, 3), rtol=1e-5, atol=1e-5)
  cfg = rl.AdvantageConfig(estimator="reinforce_pp", gamma=1.0)
  adv, _ = rl.compute_advantages(cfg, rewards_bt=r, mask_bt=m)
  np.testing.assert_allclose(adv, _whiten_loop(_returns_loop(r, m, 1.0), m), rtol=1e-5, atol=1e-5)


def test_gae_bootstraps_rows_cut_at_max_new_tokens():
  r, v = _rand(10), _rand(11)
  finished = np.array([True, False, True, False, True])
  bootstrap = np.random.default_rng(12).normal(size=B).astype(np.float32) * 3
  fn = jax.jit(functools.partial(rl.gae, gamma=0.9, lam=0.8))
  adv, ret = fn(r, v, MASK, finished_b=finished, bootstrap_values_b=bootstrap)
  ref_adv, ref_ret = _gae_loop(r, v, MASK, 0.9, 0.8, finished, bootstrap)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  # finished rows are terminal as before; an unfinished row's last token gets gamma * V_boot
  plain, _ = rl.gae(r, v, MASK, gamma=0.9, lam=0.8)
  np.testing.assert_allclose(np.asarray(adv)[finished], np.asarray(plain)[finished], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adv)[1, -1], float(r[1, -1]) + 0.9 * float(bootstrap[1]) - float(v[1, -1]),
                             rtol=1e-5)
  # the same through compute_advantages, with the split rewards
  seq, tok = _rand(13)[:, 0], _rand(14)
  cfg = rl.AdvantageConfig(estimator="gae", gamma=0.9, lam=0.8)
  adv, ret = rl.compute_advantages(cfg, mask_bt=MASK, values_bt=v, sequence_rewards_b=seq, token_rewards_bt=tok,
                                   finished_b=finished, bootstrap_values_b=bootstrap)
  dense = tok * MASK + np.asarray(rl.place_at_last_valid(seq, MASK))
  ref_adv, ref_ret = _gae_loop(dense, v, MASK, 0.9, 0.8, finished, bootstrap)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  with pytest.raises(CotsafeError, match="finished_b and bootstrap_values_b go together"):
    rl.gae(r, v, MASK, gamma=0.9, lam=0.8, finished_b=finished)
  with pytest.raises(CotsafeError, match=r"bootstrap_values_b has shape \(4,\), expected \[B\] = \(5,\)"):
    rl.gae(r, v, MASK, gamma=0.9, lam=0.8, finished_b=finished, bootstrap_values_b=bootstrap[:4])


def test_place_at_last_valid():
  vals = np.arange(1, B + 1, dtype=np.float32)
  out = np.asarray(rl.place_at_last_valid(vals, MASK))
  for b in range(B):
    last = max(t for t in range(T) if MASK[b, t])
    want = np.zeros(T)
    want[last] = vals[b]
    np.testing.assert_array_equal(out[b], want)
  assert not np.asarray(rl.place_at_last_valid(vals[:1], np.zeros((1, T)))).any()  # empty row: dropped


@pytest.mark.parametrize("token_gamma", [0.0, 0.7, 1.0])
def test_token_level_grpo_and_rloo_match_plain_loops(token_gamma):
  m = np.concatenate([MASK, MASK[2:3]], 0)
  seq, tok = _rand(15, (6, T))[:, 0], _rand(16, (6, T))
  kw = dict(group_size=3, sequence_rewards_b=seq, token_rewards_bt=tok, token_gamma=token_gamma)
  grpo = jax.jit(lambda s_, t_: rl.grpo_advantages(None, m, group_size=3, sequence_rewards_b=s_,
                                                   token_rewards_bt=t_, token_gamma=token_gamma))(seq, tok)
  np.testing.assert_allclose(grpo, _grpo_loop(None, m, 3, True, seq=seq, tok=tok, token_gamma=token_gamma),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rl.rloo_advantages(None, m, **kw),
                             _rloo_loop(None, m, 3, seq=seq, tok=tok, token_gamma=token_gamma), rtol=1e-5, atol=1e-5)
  cfg = rl.AdvantageConfig(estimator="grpo", group_size=3, token_gamma=token_gamma)
  adv, ret = rl.compute_advantages(cfg, mask_bt=m, sequence_rewards_b=seq, token_rewards_bt=tok)
  np.testing.assert_allclose(adv, grpo, rtol=1e-6, atol=1e-6)
  total = seq + np.array(_scores_loop(tok, m))
  np.testing.assert_allclose(ret, total[:, None] * m, rtol=1e-5, atol=1e-5)
  # no token rewards: the sequence rewards alone, as the dense form with them on the last token
  dense = np.asarray(rl.place_at_last_valid(seq, m))
  np.testing.assert_allclose(rl.grpo_advantages(None, m, group_size=3, sequence_rewards_b=seq),
                             rl.grpo_advantages(dense, m, group_size=3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("token_gamma", [0.0, 0.5, 1.0])
def test_a_token_penalty_moves_only_its_token(estimator, token_gamma):
  """A penalty p on token j of row i changes A at (i, j) by -p and nothing else (token_gamma = 0); with
  token_gamma > 0 it changes (i, t) for valid t <= j by -p * gamma^(valid steps from t to j), nothing else.
  The dense form (the earlier API, verl's) moved every token of every row of the group."""
  m = np.concatenate([MASK, MASK[1:2]], 0)  # 6 rows, 2 groups of 3
  seq, tok = _rand(17, (6, T))[:, 0], _rand(18, (6, T)) * 0.1
  cfg = rl.AdvantageConfig(estimator=estimator, group_size=3, token_gamma=token_gamma)
  adv = lambda t_: np.asarray(rl.compute_advantages(cfg, mask_bt=m, sequence_rewards_b=seq,  # noqa: E731
                                                    token_rewards_bt=t_)[0], np.float64)
  i, j, p = 4, 5, 0.8  # row 4 = MASK[4]: a masked hole at t = 2
  bumped = tok.copy()
  bumped[i, j] -= p
  delta = adv(bumped) - adv(tok)
  want = np.zeros(m.shape)
  valid_upto_j = [t for t in range(j + 1) if m[i, t]]
  for k, t in enumerate(valid_upto_j):
    want[i, t] = -p * token_gamma ** (len(valid_upto_j) - 1 - k)
  np.testing.assert_allclose(delta, want, atol=1e-6)
  if token_gamma == 0.0:
    assert np.count_nonzero(np.abs(delta) > 1e-7) == 1
  # the dense form smears the same penalty over the whole group
  dense = tok * m + np.asarray(rl.place_at_last_valid(seq, m))
  dense_cfg = rl.AdvantageConfig(estimator=estimator, group_size=3)
  smear = (np.asarray(rl.compute_advantages(dense_cfg, rewards_bt=dense - p * (np.arange(T) == j) * (
      np.arange(6) == i)[:, None], mask_bt=m)[0]) - np.asarray(rl.compute_advantages(dense_cfg, rewards_bt=dense,
                                                                                      mask_bt=m)[0]))
  assert np.count_nonzero(np.abs(smear) > 1e-6) == int(m[3:].sum())


def test_grpo_std_floor_keeps_rm_noise_small():
  """An all-safe, all-correct group whose sequence rewards differ only by RM noise (~1e-3): with the old
  eps = 1e-6 the advantages are the noise scaled to unit std (about +-1); the 0.01 floor keeps them ~0.1."""
  noise = np.array([1.0012, 0.9991, 1.0004, 0.9989], np.float32)
  m = np.ones((4, 3), np.float32)
  tiny = np.asarray(rl.grpo_advantages(None, m, group_size=4, sequence_rewards_b=noise))[:, 0]
  std = float(np.std(noise.astype(np.float64), ddof=1))
  assert std < 0.002
  np.testing.assert_allclose(tiny, (noise - noise.mean()) / 0.01, rtol=1e-3)
  assert np.abs(tiny).max() < 0.2
  unfloored = np.asarray(rl.grpo_advantages(None, m, group_size=4, sequence_rewards_b=noise, std_floor=1e-6))
  assert np.abs(unfloored).max() > 1.0  # what the 1.5B GRPO recipe saw
  # real differences (std >= floor) are scaled by their std as before
  real = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  np.testing.assert_allclose(np.asarray(rl.grpo_advantages(None, m, group_size=4, sequence_rewards_b=real))[:, 0],
                             (real - 0.5) / np.std(real, ddof=1), rtol=1e-5)


def test_errors_name_the_problem():
  r = _rand(9)
  with pytest.raises(CotsafeError, match=r"group_size=3 must be >= 2 and divide the batch size 5"):
    rl.grpo_advantages(r, MASK, group_size=3)
  with pytest.raises(CotsafeError, match=r"group_size=1 must be >= 2"):
    rl.rloo_advantages(r, MASK, group_size=1)
  with pytest.raises(CotsafeError, match=r"gae: values_bt has shape \(5, 6\) but rewards_bt has \(5, 7\)"):
    rl.gae(r, r[:, :6], MASK, gamma=1.0, lam=0.9)
  with pytest.raises(CotsafeError, match=r"lam=1.5 must be in \[0, 1\]"):
    rl.gae(r, r, MASK, gamma=1.0, lam=1.5)
  with pytest.raises(CotsafeError, match=r"estimator='ppo' is not one of gae, grpo, rloo, reinforce_pp"):
    rl.AdvantageConfig(estimator="ppo")
  with pytest.raises(CotsafeError, match=r"estimator='grpo' needs group_size >= 2"):
    rl.AdvantageConfig(estimator="grpo")
  with pytest.raises(CotsafeError, match=r"estimator='gae' needs values_bt"):
    rl.compute_advantages(rl.AdvantageConfig(), rewards_bt=r, mask_bt=MASK)
  with pytest.raises(CotsafeError, match=r"pass rewards_bt \(dense\) or sequence_rewards_b .* not both"):
    rl.grpo_advantages(r, MASK, group_size=5, sequence_rewards_b=r[:, 0])
  with pytest.raises(CotsafeError, match=r"token_rewards_bt needs sequence_rewards_b"):
    rl.compute_advantages(rl.AdvantageConfig(), rewards_bt=r, token_rewards_bt=r, mask_bt=MASK, values_bt=r)
  with pytest.raises(CotsafeError, match=r"sequence_rewards_b has shape \(5, 7\), expected \[B\]"):
    rl.rloo_advantages(None, MASK, group_size=5, sequence_rewards_b=r)
  with pytest.raises(CotsafeError, match=r"grpo_std_floor=0.0 must be > 0"):
    rl.AdvantageConfig(estimator="grpo", group_size=2, grpo_std_floor=0.0)
  with pytest.raises(CotsafeError, match=r"token_gamma=2.0 must be in \[0, 1\]"):
    rl.AdvantageConfig(token_gamma=2.0)
