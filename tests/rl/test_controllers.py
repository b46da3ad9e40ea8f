"""Adaptive KL and Lagrangian controllers against python loops over a sequence of observations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from cotsafe_jax import CotsafeError
from cotsafe_jax import rl

KLS = [0.01, 0.5, 0.12, 0.09, 3.0, 0.0, 0.1, 0.2]  # around, far above and far below target 0.1


def _adaptive_kl_loop(beta, target, horizon, kls, n_steps):
  out = []
  for kl in kls:
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    beta = max(beta * (1.0 + err * n_steps / horizon), 0.0)
    out.append(beta)
  return out


def test_adaptive_kl_matches_loop():
  cfg = rl.AdaptiveKLConfig(init_beta=0.2, target=0.1, horizon=500.0)
  update = jax.jit(lambda s, kl: rl.update_kl_controller(cfg, s, current_kl=kl, n_steps=64))
  state, betas = rl.init_kl_controller(cfg), []
  for kl in KLS:
    state = update(state, jnp.float32(kl))
    betas.append(float(state.beta))
  np.testing.assert_allclose(betas, _adaptive_kl_loop(0.2, 0.1, 500.0, KLS, 64), rtol=1e-5)
  assert betas[1] == pytest.approx(betas[0] * (1 + 0.2 * 64 / 500), rel=1e-6)  # error clipped at +0.2


def test_adaptive_kl_is_floored_at_zero():
  # n_steps / horizon = 6.4 > 5: with KL far below target the factor is 1 - 0.2 * 6.4 = -0.28
  cfg = rl.AdaptiveKLConfig(init_beta=0.2, target=0.1, horizon=10.0)
  update = jax.jit(lambda s, kl: rl.update_kl_controller(cfg, s, current_kl=kl, n_steps=64))
  state = update(rl.init_kl_controller(cfg), jnp.float32(0.0))
  assert float(state.beta) == 0.0  # was -0.056: a negative KL coefficient rewards leaving the reference
  betas = []
  for kl in KLS:
    state = update(state, jnp.float32(kl))
    betas.append(float(state.beta))
  assert betas == _adaptive_kl_loop(0.0, 0.1, 10.0, KLS, 64) == [0.0] * len(KLS)  # 0 is absorbing
  # factors that stay positive are not touched by the floor
  cfg = rl.AdaptiveKLConfig(init_beta=0.2, target=0.1, horizon=13.0)  # factor 1 - 0.2 * 64 / 13 = 0.015
  state = rl.update_kl_controller(cfg, rl.init_kl_controller(cfg), current_kl=0.0, n_steps=64)
  assert float(state.beta) == pytest.approx(0.2 * (1 - 0.2 * 64 / 13), rel=1e-5) and float(state.beta) > 0


def test_fixed_beta_stays():
  cfg = rl.AdaptiveKLConfig(init_beta=0.05)
  state = rl.init_kl_controller(cfg)
  for kl in KLS:
    state = rl.update_kl_controller(cfg, state, current_kl=kl, n_steps=64)
  assert float(state.beta) == np.float32(0.05)


def _lagrangian_loop(lam, lr, target, lam_max, decay, rates):
  ema, out = None, []
  for r in rates:
    ema = r if ema is None else decay * ema + (1 - decay) * r
    lam = min(max(lam + lr * (ema - target), 0.0), lam_max)
    out.append((lam, ema))
  return out


def test_lagrangian_matches_loop_and_moves_both_ways():
  rates = [0.1, 0.3, 0.4, 0.5, 0.45, 0.02] + [0.0, 0.01] * 7
  cfg = rl.LagrangianConfig(budget=0.05, lr=5.0, max_lambda=1.5, ema_decay=0.5)
  update = jax.jit(lambda s, r: rl.update_lagrangian(cfg, s, cost=r))
  state, got = rl.init_lagrangian(cfg), []
  for r in rates:
    state = update(state, jnp.float32(r))
    got.append((float(state.lam), float(state.cost_ema)))
  want = _lagrangian_loop(0.0, 5.0, 0.05, 1.5, 0.5, rates)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  lams = [g[0] for g in got]
  assert lams[0] == pytest.approx(5.0 * 0.05, rel=1e-5)  # first ema is the rate itself
  assert lams[0] < lams[1] < lams[2] == 1.5  # rises over budget, capped at max_lambda
  assert lams[9] < lams[8] < 1.5 and lams[-1] == 0.0  # falls under budget, floored at 0
  assert int(state.num_updates) == len(rates)


def test_states_are_checkpointable_pytrees():
  kl_state = rl.init_kl_controller(rl.AdaptiveKLConfig(init_beta=0.3, target=1.0))
  lag_cfg = rl.LagrangianConfig(budget=0.1, init_lambda=0.4)
  lag_state = rl.update_lagrangian(lag_cfg, rl.init_lagrangian(lag_cfg), cost=0.2)
  for state in (kl_state, lag_state):
    restored = serialization.from_state_dict(state, serialization.to_state_dict(state))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), state, restored))
  assert len(jax.tree.leaves(lag_state)) == 3


def test_batch_cost_per_token_and_per_episode_match_loops():
  rng = np.random.default_rng(1)
  cost = rng.uniform(size=(4, 6)).astype(np.float32)
  mask = np.arange(6)[None, :] < np.array([[6], [3], [0], [1]])
  per_token = sum(cost[i] for i in np.ndindex(4, 6) if mask[i]) / mask.sum()
  per_episode = np.mean([sum(cost[b, t] for t in range(6) if mask[b, t]) for b in range(4)])
  tok, epi = rl.LagrangianConfig(budget=0.1), rl.LagrangianConfig(budget=0.5, per="episode")
  np.testing.assert_allclose(rl.controllers.batch_cost(tok, cost, mask), per_token, rtol=1e-6)
  np.testing.assert_allclose(rl.controllers.batch_cost(epi, cost, mask), per_episode, rtol=1e-6)


def test_unsafe_token_rate():
  rng = np.random.default_rng(0)
  unsafe = (rng.uniform(size=(5, 7)) < 0.3).astype(np.float32)
  mask = (rng.uniform(size=(5, 7)) < 0.8).astype(np.float32)
  want = sum(unsafe[i] for i in np.ndindex(5, 7) if mask[i]) / mask.sum()
  np.testing.assert_allclose(rl.unsafe_token_rate(unsafe, mask), want, rtol=1e-6)


def test_controller_config_errors():
  with pytest.raises(CotsafeError, match=r"AdaptiveKLConfig: target=0.0 must be > 0"):
    rl.AdaptiveKLConfig(target=0.0)
  with pytest.raises(CotsafeError, match=r"LagrangianConfig: budget=2.0 must be >= 0 \(and <= 1 per token"):
    rl.LagrangianConfig(budget=2.0)
  rl.LagrangianConfig(budget=2.0, per="episode")  # an episode's summed cost may exceed 1
  with pytest.raises(CotsafeError, match=r"per='sequence', expected 'token' or 'episode'"):
    rl.LagrangianConfig(budget=0.1, per="sequence")
  with pytest.raises(CotsafeError, match=r"need 0 <= init_lambda=5.0 <= max_lambda=1.0"):
    rl.LagrangianConfig(budget=0.1, init_lambda=5.0, max_lambda=1.0)
