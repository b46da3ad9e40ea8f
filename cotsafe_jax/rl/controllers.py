"""Coefficient controllers as pure (state, update) pairs: adaptive KL beta, Lagrangian safety lambda.

States are flax.struct dataclasses of jax scalars, so they jit and checkpoint with the train state.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from cotsafe_jax.errors import CotsafeError


@struct.dataclass
class KLControllerState:
  beta: jax.Array  # float32 scalar


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveKLConfig:
  """beta for KL(pi || ref). target=None keeps beta fixed at init_beta.

  Adaptive (Ziegler et al. 2019, TRL's AdaptiveKLController), floored at 0:
    e = clip(kl / target - 1, -0.2, 0.2);   beta <- max(beta * (1 + e * n_steps / horizon), 0)
  kl is the batch mean of per-sequence KL; n_steps the samples in the batch. Without the floor a
  step with n_steps / horizon > 5 and KL far below target (e = -0.2) makes the factor negative and
  beta < 0, which rewards moving away from the reference. beta = 0 is absorbing (the update is
  multiplicative); horizon > n_steps / 5 keeps every factor positive, so beta never reaches 0.
  """
  init_beta: float = 0.05
  target: float | None = None
  horizon: float = 10_000.0

  def __post_init__(self):
    if self.init_beta < 0.0:
      raise CotsafeError(f"AdaptiveKLConfig: init_beta={self.init_beta} must be >= 0")
    if self.target is not None and not self.target > 0.0:
      raise CotsafeError(f"AdaptiveKLConfig: target={self.target} must be > 0 (or None for a fixed beta)")
    if not self.horizon > 0.0:
      raise CotsafeError(f"AdaptiveKLConfig: horizon={self.horizon} must be > 0")


def init_kl_controller(cfg: AdaptiveKLConfig) -> KLControllerState:
  return KLControllerState(beta=jnp.asarray(cfg.init_beta, jnp.float32))


def update_kl_controller(cfg: AdaptiveKLConfig, state: KLControllerState, *, current_kl,
                         n_steps) -> KLControllerState:
  """One controller step after a batch with mean sequence KL `current_kl` over `n_steps` samples."""
  if cfg.target is None:
    return state
  error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / cfg.target - 1.0, -0.2, 0.2)
  mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / cfg.horizon
  return KLControllerState(beta=jnp.maximum(state.beta * mult, 0.0))


@struct.dataclass
class LagrangianState:
  lam: jax.Array        # float32 scalar, in [0, max_lambda]
  cost_ema: jax.Array   # float32 scalar: the running cost J
  num_updates: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True, kw_only=True)
class LagrangianConfig:
  """Safety budget by a Lagrange multiplier on a cost apart from the reward: PPO-Lagrangian as in Safe RLHF
  (Dai et al. 2023). The cost c_t is P(unsafe) of each completion token (CompositeReward(token_cost=True)); a
  second value head on the critic learns its values; the policy's advantage is (A_r - lam A_c) / (1 + lam).

  Dual ascent on the same cost, measured `per` token (the batch's mean c_t over valid tokens) or per
  episode (the batch's mean of each completion's summed c_t):
    J    <- J_batch                                   on the first update
    J    <- ema_decay * J + (1 - ema_decay) * J_batch  after (ema_decay 0: the batch's own cost)
    lam  <- clip(lam + lr * (J - budget), 0, max_lambda)
  so lam rises while the cost is over budget and decays back to 0 below it.
  """
  budget: float
  per: str = "token"
  lr: float = 0.05
  init_lambda: float = 0.0
  max_lambda: float = 10.0
  ema_decay: float = 0.0

  def __post_init__(self):
    if self.per not in ("token", "episode"):
      raise CotsafeError(f"LagrangianConfig: per={self.per!r}, expected 'token' or 'episode'")
    if not self.budget >= 0.0 or (self.per == "token" and self.budget > 1.0):
      raise CotsafeError(f"LagrangianConfig: budget={self.budget} must be >= 0 (and <= 1 per token: a mean "
                         "P(unsafe))")
    if not self.lr > 0.0:
      raise CotsafeError(f"LagrangianConfig: lr={self.lr} must be > 0")
    if not self.max_lambda > 0.0 or not 0.0 <= self.init_lambda <= self.max_lambda:
      raise CotsafeError(f"LagrangianConfig: need 0 <= init_lambda={self.init_lambda} <= "
                         f"max_lambda={self.max_lambda} and max_lambda > 0")
    if not 0.0 <= self.ema_decay < 1.0:
      raise CotsafeError(f"LagrangianConfig: ema_decay={self.ema_decay} must be in [0, 1)")


def init_lagrangian(cfg: LagrangianConfig) -> LagrangianState:
  return LagrangianState(lam=jnp.asarray(cfg.init_lambda, jnp.float32),
                         cost_ema=jnp.zeros((), jnp.float32), num_updates=jnp.zeros((), jnp.int32))


def batch_cost(cfg: LagrangianConfig, cost_bt, mask_bt) -> jax.Array:
  """J_batch: mean cost per valid token (per='token') or mean summed cost per completion (per='episode')."""
  m = jnp.asarray(mask_bt, jnp.float32)
  c = jnp.asarray(cost_bt, jnp.float32) * m
  if cfg.per == "token":
    return c.sum() / jnp.maximum(m.sum(), 1.0)
  return c.sum(axis=1).mean()


def update_lagrangian(cfg: LagrangianConfig, state: LagrangianState, *, cost) -> LagrangianState:
  """One dual step after a batch whose cost (`batch_cost`) is `cost`."""
  cost = jnp.asarray(cost, jnp.float32)
  ema = jnp.where(state.num_updates == 0, cost, cfg.ema_decay * state.cost_ema + (1.0 - cfg.ema_decay) * cost)
  lam = jnp.clip(state.lam + cfg.lr * (ema - cfg.budget), 0.0, cfg.max_lambda)
  return LagrangianState(lam=lam, cost_ema=ema, num_updates=state.num_updates + 1)


def unsafe_token_rate(unsafe_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Fraction of valid tokens flagged unsafe (unsafe_bt in [0, 1]): the Lagrangian's observation."""
  mask_bt = jnp.asarray(mask_bt, jnp.float32)
  return jnp.sum(jnp.asarray(unsafe_bt, jnp.float32) * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)
