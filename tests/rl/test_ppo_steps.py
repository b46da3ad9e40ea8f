"""The PPO advantage step against plain NumPy loops: GAE with truncation bootstrap, token-level rewards, the
KL penalty, PPO-Lagrangian's (A_r - lam A_c) / (1 + lam) on a separate cost, truncated importance sampling;
and the update step's non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models, parallel
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rl import AdvantageConfig, LagrangianConfig
from cotsafe_jax.rl.ppo import PPOConfig, advantage_fn
from cotsafe_jax.train import ppo_programs
from cotsafe_jax.train.ppo_trainer import OptimConfig

B, T = 4, 6


def _gae_loop(r, v, mask, finished, boot, gamma, lam):
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    idx = [t for t in range(r.shape[1]) if mask[b, t]]
    nxt_v, nxt_a = (0.0 if finished[b] else boot[b]), 0.0
    for t in reversed(idx):
      delta = r[b, t] + gamma * nxt_v - v[b, t]
      nxt_a = delta + gamma * lam * nxt_a
      adv[b, t], nxt_v = nxt_a, v[b, t]
  return adv, (adv + v) * mask


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([6, 3, 1, 5])
  mask = np.arange(T)[None, :] < lengths[:, None]
  f = lambda: (rng.normal(size=(B, T)) * mask).astype(np.float32)  # noqa: E731
  x = {"mask_bt": mask, "old_logp_bt": -np.abs(f()), "ref_logp_bt": -np.abs(f()), "values_bt": f(),
       "bootstrap_b": rng.normal(size=B).astype(np.float32), "finished_b": np.array([False, True, True, False]),
       "kl_coef": np.float32(0.1), "sequence_b": rng.normal(size=B).astype(np.float32), "token_bt": f() * 0.3}
  x["sampler_logp_bt"] = x["old_logp_bt"] + (rng.normal(size=(B, T)) * 0.5 * mask).astype(np.float32)
  return x


def _k1(x):
  return (x["old_logp_bt"] - x["ref_logp_bt"]) * x["mask_bt"]


@pytest.mark.parametrize("tis_cap", [None, 1.5])
def test_gae_step_with_kl_token_rewards_and_tis_matches_loops(tis_cap):
  ppo = PPOConfig(advantage=AdvantageConfig(estimator="gae", gamma=0.9, lam=0.8), kl_kind="k1", kl_clamp=None,
                  tis_cap=tis_cap)
  x = _inputs()
  out = jax.jit(advantage_fn(ppo))({k: jnp.asarray(v) for k, v in x.items()})
  m = x["mask_bt"].astype(np.float32)
  r = x["token_bt"] - 0.1 * _k1(x)
  last = m.sum(1).astype(int) - 1
  for b in range(B):
    r[b, last[b]] += x["sequence_b"][b]
  adv, ret = _gae_loop(r * m, x["values_bt"], m, x["finished_b"], x["bootstrap_b"], 0.9, 0.8)
  if tis_cap is not None:
    adv = adv * np.minimum(np.exp(x["old_logp_bt"] - x["sampler_logp_bt"]), tis_cap)
    assert 0 < float(out["tis_clipped_frac"]) < 1
  np.testing.assert_allclose(out["advantages_bt"], adv * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["returns_bt"], ret, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["rewards_bt"], r * m, rtol=1e-6, atol=1e-6)
  diff = (x["sampler_logp_bt"] - x["old_logp_bt"]) * m
  np.testing.assert_allclose(out["logprob_abs_diff"], np.abs(diff).sum() / m.sum(), rtol=1e-5)
  np.testing.assert_allclose(out["logprob_kl"], diff.sum() / m.sum(), rtol=1e-5, atol=1e-7)


def test_truncated_row_bootstraps_and_finished_row_does_not():
  ppo = PPOConfig(advantage=AdvantageConfig(estimator="gae", gamma=1.0, lam=1.0), kl_mode="none", tis_cap=None)
  x = _inputs()
  base = jax.jit(advantage_fn(ppo))({k: jnp.asarray(v) for k, v in x.items()})
  x2 = dict(x, bootstrap_b=x["bootstrap_b"] + 10.0)
  moved = jax.jit(advantage_fn(ppo))({k: jnp.asarray(v) for k, v in x2.items()})
  d = np.asarray(moved["advantages_bt"] - base["advantages_bt"])
  m = x["mask_bt"]
  assert np.allclose(d[0][m[0]], 10.0) and np.allclose(d[3][m[3]], 10.0)  # cut rows: bootstrap counts
  assert np.allclose(d[1], 0.0) and np.allclose(d[2], 0.0)  # finished rows: terminal


def test_lagrangian_advantage_is_normalised_combination_of_reward_and_cost_gae():
  lag = LagrangianConfig(budget=0.1)
  ppo = PPOConfig(advantage=AdvantageConfig(estimator="gae", gamma=0.95, lam=0.9), kl_mode="none", tis_cap=None,
                  lagrangian=lag)
  x = _inputs(1)
  rng = np.random.default_rng(3)
  m = x["mask_bt"].astype(np.float32)
  x.update(cost_bt=(rng.uniform(size=(B, T)) * m).astype(np.float32),
           cost_values_bt=(rng.normal(size=(B, T)) * m).astype(np.float32),
           cost_bootstrap_b=rng.normal(size=B).astype(np.float32), lam=np.float32(0.7))
  out = jax.jit(advantage_fn(ppo))({k: jnp.asarray(v) for k, v in x.items()})
  r = x["token_bt"].copy()
  last = m.sum(1).astype(int) - 1
  for b in range(B):
    r[b, last[b]] += x["sequence_b"][b]
  a_r, _ = _gae_loop(r * m, x["values_bt"], m, x["finished_b"], x["bootstrap_b"], 0.95, 0.9)
  a_c, ret_c = _gae_loop(x["cost_bt"], x["cost_values_bt"], m, x["finished_b"], x["cost_bootstrap_b"], 0.95, 0.9)
  np.testing.assert_allclose(out["advantages_bt"], (a_r - 0.7 * a_c) / 1.7 * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["cost_returns_bt"], ret_c, rtol=1e-5, atol=1e-6)
  # lam = 0: the cost does not touch the policy's advantage
  out0 = jax.jit(advantage_fn(ppo))({**{k: jnp.asarray(v) for k, v in x.items()}, "lam": jnp.float32(0.0)})
  np.testing.assert_allclose(out0["advantages_bt"], a_r * m, rtol=1e-5, atol=1e-6)


def test_lagrangian_critic_has_a_cost_head_not_a_second_model():
  cfg = models.tiny_config("qwen2", vocab_size=64)
  mesh = parallel.single_device_mesh()
  tx = OptimConfig().make(10)
  kw = dict(policy_cfg=cfg, critic_cfg=cfg, policy_tx=tx, critic_tx=tx, mesh=mesh, rows=2, prompt_len=4,
            completion_len=4, sampling=ppo_programs.Sampling())
  plain = ppo_programs.PPOPrograms(ppo=PPOConfig(), **kw).abstract_state()
  lag = ppo_programs.PPOPrograms(ppo=PPOConfig(lagrangian=LagrangianConfig(budget=0.1)), **kw).abstract_state()
  assert set(lag.critic) == {"backbone", "head", "cost_head"} and set(plain.critic) == {"backbone", "head"}
  extra = sum(x.size for x in jax.tree.leaves(lag.critic)) - sum(x.size for x in jax.tree.leaves(plain.critic))
  assert extra == cfg.hidden_size + 1  # one more value head
  assert "lm_head" not in lag.critic["backbone"]  # the critic reads hidden states: no unembedding


def test_update_step_skips_a_nonfinite_minibatch():
  cfg = models.tiny_config("qwen2", vocab_size=64)
  mesh = parallel.make_mesh()
  ppo = PPOConfig(num_minibatches=1).for_mesh(rows=8, shards=8)
  tx = OptimConfig(learning_rate=1e-2).make(10)
  progs = ppo_programs.PPOPrograms(policy_cfg=cfg, critic_cfg=cfg, ppo=ppo, policy_tx=tx, critic_tx=tx, mesh=mesh,
                                   rows=8, prompt_len=4, completion_len=4, sampling=ppo_programs.Sampling())
  rng = np.random.default_rng(0)

  def batch(nan: bool):
    like = progs.abstract_args()["update"][1]
    vals = {f: (rng.integers(0, 64, s.shape) if s.dtype == jnp.int32 else np.ones(s.shape, bool)
                if s.dtype == jnp.bool_ else rng.normal(size=s.shape)).astype(s.dtype)
            for f, s in zip(like.__dataclass_fields__, jax.tree.leaves(like))}
    if nan:
      vals["advantages_bt"][3, 1] = np.nan
    return jax.tree.map(lambda sh, v: jax.device_put(v, sh), progs.minibatch_shardings, type(like)(**vals))

  state = progs.init_state(models.init_params(cfg, jax.random.key(0), mesh=mesh), None, jnp.int32(0))
  before = jax.device_get((state.policy, state.policy_opt))
  state, m = progs.update(state, batch(nan=True), jnp.float32(0.0))
  assert float(m["nonfinite/policy"]) == 1.0 and float(m["nonfinite/critic"]) == 0.0
  after = jax.device_get((state.policy, state.policy_opt))
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), before, after))  # untouched, not NaN
  state, m = progs.update(state, batch(nan=False), jnp.float32(0.0))
  assert float(m["nonfinite/policy"]) == 0.0
  moved = jax.device_get(state.policy)
  assert not jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), before[0], moved))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(moved))
