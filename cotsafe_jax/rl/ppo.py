"""Pure PPO step functions: score (old / reference log-probs, entropy, values), advantages, update.

Each is jitted once per shape with explicit shardings; the update donates the train state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cotsafe_jax import kernels, models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models import heads
from cotsafe_jax.rl.advantages import AdvantageConfig, compute_advantages
from cotsafe_jax.rl.controllers import AdaptiveKLConfig, LagrangianConfig
from cotsafe_jax.rl.kl import KL_KINDS, check_loss_kind, kl_loss, token_kl
from cotsafe_jax.rl.losses import PolicyLoss, ValueLoss, explained_variance
from cotsafe_jax.types import Rollout, ScoredRollout, TrainState

KL_MODES = ("reward", "loss", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
  """The PPO update. kl_mode: "reward" subtracts kl_coef * KL_t from r_t; "loss" adds kl_coef * KL to the
  policy loss; "none" only logs it. adaptive_kl replaces the fixed kl_coef by a controller."""
  advantage: AdvantageConfig = AdvantageConfig()
  policy_loss: PolicyLoss = PolicyLoss()
  value_loss: ValueLoss = ValueLoss()
  kl_mode: str = "reward"
  kl_kind: str = "k1"
  kl_coef: float = 0.05
  kl_clamp: float | None = 10.0
  adaptive_kl: AdaptiveKLConfig | None = None
  lagrangian: LagrangianConfig | None = None
  epochs: int = 1
  num_minibatches: int = 1
  num_microbatches: int = 1
  temperature: float = 1.0
  logprob_impl: str = "auto"

  def __post_init__(self):
    if self.kl_mode not in KL_MODES:
      raise CotsafeError(f"PPOConfig.kl_mode={self.kl_mode!r}, expected one of {', '.join(KL_MODES)}")
    if self.kl_kind not in KL_KINDS:
      raise CotsafeError(f"PPOConfig.kl_kind={self.kl_kind!r}, expected one of {', '.join(KL_KINDS)}")
    if self.kl_mode == "loss":
      check_loss_kind("PPOConfig (kl_mode='loss')", self.kl_kind)
    for name in ("epochs", "num_minibatches", "num_microbatches"):
      if getattr(self, name) < 1:
        raise CotsafeError(f"PPOConfig.{name}={getattr(self, name)} must be >= 1")
    if not self.temperature > 0:
      raise CotsafeError(f"PPOConfig.temperature={self.temperature} must be > 0 (the sampling temperature)")

  @property
  def uses_critic(self) -> bool:
    return self.advantage.estimator == "gae"


@dataclasses.dataclass(frozen=True)
class CriticSpec:
  """A value head on a backbone: params {"backbone": decoder params, "head": value-head params}."""
  cfg: models.ModelConfig


def completion_logprobs(cfg: models.ModelConfig, params: Any, tokens_bs: jax.Array, mask_bs: jax.Array, *,
                        num_completion: int, temperature: float = 1.0,
                        impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """log pi(y_t | ...) and the entropy of each next-token distribution, for the last `num_completion`
  tokens, through the fused op: the [T, V] logits are never built."""
  h_bsd = models.hidden_states(cfg, params, tokens_bs, attention_mask_bt=mask_bs)
  s = tokens_bs.shape[1]
  h_btd = h_bsd[:, s - num_completion - 1:s - 1]  # the state before each completion token
  targets_bt = tokens_bs[:, s - num_completion:]
  return kernels.logprob_entropy(h_btd, models.unembedding(cfg, params), targets_bt, temperature=temperature,
                                 impl=impl)


def critic_values(cfg: models.ModelConfig, params: Any, tokens_bs: jax.Array, mask_bs: jax.Array, *,
                  num_completion: int) -> jax.Array:
  """V(state before completion token t), float32 [B, T]."""
  h_bsd = models.hidden_states(cfg, params["backbone"], tokens_bs, attention_mask_bt=mask_bs)
  s = tokens_bs.shape[1]
  return heads.apply_head(heads.ValueHead(), params["head"], h_bsd[:, s - num_completion - 1:s - 1])


def init_critic(cfg: models.ModelConfig, backbone: Any, rng: jax.Array, *, mesh=None) -> dict[str, Any]:
  head = heads.init_head(heads.ValueHead(), rng, embed_dim=cfg.hidden_size, mesh=mesh)
  return {"backbone": backbone, "head": head}


def make_score_step(policy_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None, ppo: PPOConfig,
                    *, num_completion: int) -> Callable:
  """(policy, reference, critic, rollout) -> dict of old_logp_bt, ref_logp_bt, entropy_bt, values_bt."""
  def score(policy, reference, critic, rollout: Rollout):
    kw = dict(num_completion=num_completion, temperature=ppo.temperature, impl=ppo.logprob_impl)
    logp_bt, ent_bt = completion_logprobs(policy_cfg, policy, rollout.tokens_bs, rollout.mask_bs, **kw)
    ref_bt, _ = completion_logprobs(policy_cfg, jax.lax.stop_gradient(reference), rollout.tokens_bs,
                                    rollout.mask_bs, **kw)  # frozen: no optimizer state
    m_bt = rollout.completion_mask_bt.astype(jnp.float32)
    out = {"old_logp_bt": logp_bt * m_bt, "ref_logp_bt": ref_bt * m_bt, "entropy_bt": ent_bt * m_bt}
    if critic is not None:
      out["values_bt"] = critic_values(critic_cfg, critic, rollout.tokens_bs, rollout.mask_bs,
                                       num_completion=num_completion) * m_bt
    else:
      out["values_bt"] = jnp.zeros_like(logp_bt)
    return out
  return jax.jit(score)


def make_advantage_step(ppo: PPOConfig) -> Callable:
  """(rewards_bt, mask_bt, values_bt, old_logp_bt, ref_logp_bt, kl_coef, lagrange_cost_bt, lam)
  -> (advantages_bt, returns_bt, final rewards_bt, kl_bt)."""
  def step(rewards_bt, mask_bt, values_bt, old_logp_bt, ref_logp_bt, kl_coef, cost_bt, lam):
    m_bt = mask_bt.astype(jnp.float32)
    kl_bt = token_kl(old_logp_bt, ref_logp_bt, kind=ppo.kl_kind, kl_clamp=ppo.kl_clamp) * m_bt
    r_bt = rewards_bt.astype(jnp.float32) - lam * cost_bt
    if ppo.kl_mode == "reward":
      r_bt = r_bt - kl_coef * kl_bt
    r_bt = r_bt * m_bt
    adv_bt, ret_bt = compute_advantages(ppo.advantage, rewards_bt=r_bt, mask_bt=m_bt,
                                        values_bt=values_bt if ppo.uses_critic else None)
    return adv_bt * m_bt, ret_bt * m_bt, r_bt, kl_bt
  return jax.jit(step)


def _microbatches(x: jax.Array, m: int) -> jax.Array:
  # row j of microbatch i is row j*m + i: every microbatch spreads over all batch shards
  return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def make_update_step(policy_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None, ppo: PPOConfig,
                     policy_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation | None,
                     *, num_completion: int, state_shardings: Any = None, batch_shardings: Any = None) -> Callable:
  """(state, minibatch, kl_coef) -> (state, metrics). Gradients accumulate over microbatches; losses are
  normalised by the minibatch's global token / sequence counts, so the sum over microbatches is the
  minibatch loss whatever the split or the data-parallel size."""
  kw = dict(num_completion=num_completion)

  def policy_loss(params, mb: ScoredRollout, counts, kl_coef):
    logp_bt, ent_bt = completion_logprobs(policy_cfg, params, mb.tokens_bs, mb.mask_bs,
                                          temperature=ppo.temperature, impl=ppo.logprob_impl, **kw)
    loss, metrics = ppo.policy_loss(logp_bt=logp_bt, old_logp_bt=mb.old_logp_bt,
                                    advantages_bt=mb.advantages_bt, mask_bt=mb.completion_mask_bt,
                                    entropy_bt=ent_bt, **counts)
    if ppo.kl_mode == "loss":
      kl, _ = kl_loss(logp_bt, mb.ref_logp_bt, mb.completion_mask_bt, kind=ppo.kl_kind, kl_clamp=ppo.kl_clamp,
                      agg=ppo.policy_loss.agg, **counts)
      metrics["kl_loss"] = kl
      loss = loss + kl_coef * kl
      metrics["loss"] = loss
    return loss, metrics

  def value_loss(params, mb: ScoredRollout, counts):
    values_bt = critic_values(critic_cfg, params, mb.tokens_bs, mb.mask_bs, **kw)
    return ppo.value_loss(values_bt=values_bt, old_values_bt=mb.old_values_bt, returns_bt=mb.returns_bt,
                          mask_bt=mb.completion_mask_bt, **counts)

  def update(state: TrainState, mb: ScoredRollout, kl_coef):
    mask = mb.completion_mask_bt.astype(jnp.float32)
    counts = {"num_tokens": jnp.maximum(mask.sum(), 1.0), "num_seqs": jnp.maximum((mask.sum(1) > 0).sum(), 1)}
    micro = jax.tree.map(lambda x: _microbatches(x, ppo.num_microbatches), mb)
    use_critic = state.critic is not None

    def body(carry, one: ScoredRollout):
      g_pol, g_cri = carry
      if batch_shardings is not None:
        one = jax.lax.with_sharding_constraint(one, batch_shardings)
      (_, met), g = jax.value_and_grad(policy_loss, has_aux=True)(state.policy, one, counts, kl_coef)
      g_pol = jax.tree.map(jnp.add, g_pol, g)
      met = dict(met)
      if use_critic:
        (_, m_val), gc = jax.value_and_grad(value_loss, has_aux=True)(state.critic, one, counts)
        g_cri = jax.tree.map(jnp.add, g_cri, gc)
        met.update({k: v for k, v in m_val.items() if k != "explained_variance"})  # not additive
      return (g_pol, g_cri), met

    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)  # noqa: E731
    init = (zeros(state.policy), zeros(state.critic) if use_critic else None)
    (g_pol, g_cri), per_micro = jax.lax.scan(body, init, micro)
    # every metric is normalised by the minibatch's global counts: the sum over microbatches is its value
    metrics = jax.tree.map(lambda x: x.sum(0), per_micro)
    metrics["grad_norm/policy"] = optax.global_norm(g_pol)
    upd, policy_opt = policy_tx.update(g_pol, state.policy_opt, state.policy)
    policy = optax.apply_updates(state.policy, upd)
    critic, critic_opt = state.critic, state.critic_opt
    if use_critic:
      metrics["grad_norm/critic"] = optax.global_norm(g_cri)
      upd_c, critic_opt = critic_tx.update(g_cri, state.critic_opt, state.critic)
      critic = optax.apply_updates(state.critic, upd_c)
    new = state.replace(policy=policy, policy_opt=policy_opt, critic=critic, critic_opt=critic_opt)
    return new, metrics

  if state_shardings is None:
    return jax.jit(update, donate_argnums=(0,))
  return jax.jit(update, in_shardings=(state_shardings, batch_shardings, None),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def rollout_metrics(scored: dict[str, jax.Array], returns_bt: jax.Array, mask_bt: jax.Array) -> dict[str, Any]:
  m = mask_bt.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return {"entropy": (scored["entropy_bt"] * m).sum() / n,
          "explained_variance": explained_variance(scored["values_bt"], returns_bt, m)}
