"""Advantage estimators on token-level rewards: GAE (critic), GRPO, RLOO, REINFORCE++; whitening.

Rewards are dense [B, T] (safety penalties on tokens, sequence rewards on the last token).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rl.losses import _check_shapes, _f32

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")


def _check_unit(where: str, **values) -> None:
  for name, v in values.items():
    if not 0.0 <= v <= 1.0:
      raise CotsafeError(f"{where}: {name}={v} must be in [0, 1]")


def _reverse_discount(x_bt, mask_bt, coef):
  """y_t = x_t + coef * y_{t'} by a reverse scan, t' the next valid token of the row; y = 0 on
  invalid tokens.

  Padding between, before (left) and after (an early end) valid tokens is stepped over; past a
  row's last valid token the episode is over (y_{t'} = 0).
  """
  x_tb, m_tb = x_bt.T, mask_bt.T > 0
  zeros_b = jnp.zeros(x_tb.shape[1], jnp.float32)

  def step(next_y_b, inputs):
    x_b, m_b = inputs
    y_b = x_b + coef * next_y_b
    return jnp.where(m_b, y_b, next_y_b), jnp.where(m_b, y_b, 0.0)

  _, y_tb = jax.lax.scan(step, zeros_b, (x_tb, m_tb), reverse=True)
  return y_tb.T


def _next_valid_value(values_bt, mask_bt):
  """V of the next valid token of each row (0 after the last one), by a reverse scan."""
  v_tb, m_tb = values_bt.T, mask_bt.T > 0

  def step(next_v_b, inputs):
    v_b, m_b = inputs
    return jnp.where(m_b, v_b, next_v_b), next_v_b

  _, next_v_tb = jax.lax.scan(step, jnp.zeros(v_tb.shape[1], jnp.float32), (v_tb, m_tb), reverse=True)
  return next_v_tb.T


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over valid tokens. Returns (advantages_bt, returns_bt).

  delta_t = r_t + gamma V_{t'} - V_t,  A_t = delta_t + gamma lam A_{t'},  R_t = A_t + V_t
  where t' is the next valid token of the row; a row's last valid token is terminal (V_{t'} = 0;
  rows cut at max length are treated as ended). Both outputs are 0 on invalid tokens.
  """
  _check_shapes("gae", rewards_bt=rewards_bt, values_bt=values_bt, mask_bt=mask_bt)
  _check_unit("gae", gamma=gamma, lam=lam)
  mask_bt = _f32(mask_bt)
  rewards_bt, values_bt = _f32(rewards_bt) * mask_bt, _f32(values_bt) * mask_bt
  delta_bt = rewards_bt + gamma * _next_valid_value(values_bt, mask_bt) - values_bt
  adv_bt = _reverse_discount(delta_bt, mask_bt, gamma * lam)
  return adv_bt, (adv_bt + values_bt) * mask_bt


def discounted_returns(rewards_bt: jax.Array, mask_bt: jax.Array, *, gamma: float) -> jax.Array:
  """G_t = r_t + gamma G_{t'} over valid tokens (t' the next valid token); 0 on invalid tokens."""
  _check_shapes("discounted_returns", rewards_bt=rewards_bt, mask_bt=mask_bt)
  _check_unit("discounted_returns", gamma=gamma)
  mask_bt = _f32(mask_bt)
  return _reverse_discount(_f32(rewards_bt) * mask_bt, mask_bt, gamma)


def masked_whiten(x_bt: jax.Array, mask_bt: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the valid tokens of the whole batch; 0 on invalid tokens.

  var is the unbiased (N - 1) variance. shift_mean=False adds the mean back (scale only).
  """
  _check_shapes("masked_whiten", x_bt=x_bt, mask_bt=mask_bt)
  x_bt, mask_bt = _f32(x_bt), _f32(mask_bt)
  n = jnp.sum(mask_bt)
  mean = jnp.sum(x_bt * mask_bt) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.square(x_bt - mean) * mask_bt) / jnp.maximum(n - 1.0, 1.0)
  out_bt = (x_bt - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out_bt = out_bt + mean
  return out_bt * mask_bt


def sequence_scores(rewards_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """A row's score for GRPO / RLOO: the sum of its token rewards over valid tokens, [B].

  With sequence rewards on the last token and safety penalties on unsafe tokens, this is the
  outcome reward minus the row's total penalty.
  """
  _check_shapes("sequence_scores", rewards_bt=rewards_bt, mask_bt=mask_bt)
  return jnp.sum(_f32(rewards_bt) * _f32(mask_bt), axis=-1)


def _grouped(where: str, scores_b: jax.Array, group_size: int) -> jax.Array:
  b = scores_b.shape[0]
  if group_size < 2 or b % group_size:
    raise CotsafeError(f"{where}: group_size={group_size} must be >= 2 and divide the batch size {b} "
                       "(rows are consecutive blocks of group_size samples per prompt)")
  return scores_b.reshape(b // group_size, group_size)  # [prompts, samples]


def grpo_advantages(rewards_bt: jax.Array, mask_bt: jax.Array, *, group_size: int,
                    scale_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
  """Group-normalised advantages: A = (s - mean_g) / (std_g + eps), broadcast to valid tokens.

  s is `sequence_scores`; each group is group_size consecutive rows (samples of one prompt);
  std is the unbiased (n - 1) standard deviation. scale_by_std=False is Dr.GRPO (no std).
  """
  scores_gn = _grouped("grpo_advantages", sequence_scores(rewards_bt, mask_bt), group_size)
  adv_gn = scores_gn - jnp.mean(scores_gn, axis=-1, keepdims=True)
  if scale_by_std:
    adv_gn = adv_gn / (jnp.std(scores_gn, axis=-1, ddof=1, keepdims=True) + eps)
  return adv_gn.reshape(-1, 1) * _f32(mask_bt)


def rloo_advantages(rewards_bt: jax.Array, mask_bt: jax.Array, *, group_size: int) -> jax.Array:
  """RLOO: A_i = s_i - mean_{j != i} s_j within each group, broadcast to valid tokens."""
  scores_gn = _grouped("rloo_advantages", sequence_scores(rewards_bt, mask_bt), group_size)
  others_gn = (jnp.sum(scores_gn, axis=-1, keepdims=True) - scores_gn) / (group_size - 1)
  return (scores_gn - others_gn).reshape(-1, 1) * _f32(mask_bt)


def reinforce_pp_advantages(rewards_bt: jax.Array, mask_bt: jax.Array, *,
                            gamma: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """REINFORCE++: discounted token returns, whitened over all valid tokens of the batch.

  Returns (advantages_bt, returns_bt).
  """
  returns_bt = discounted_returns(rewards_bt, mask_bt, gamma=gamma)
  return masked_whiten(returns_bt, mask_bt), returns_bt


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
  """Which estimator and its settings. whiten: masked whitening of gae / grpo / rloo advantages
  (reinforce_pp always whitens)."""
  estimator: str = "gae"
  gamma: float = 1.0
  lam: float = 0.95
  group_size: int = 1
  grpo_scale_by_std: bool = True
  whiten: bool = False

  def __post_init__(self):
    if self.estimator not in ESTIMATORS:
      raise CotsafeError(f"AdvantageConfig: estimator={self.estimator!r} is not one of "
                         f"{', '.join(ESTIMATORS)}")
    _check_unit("AdvantageConfig", gamma=self.gamma, lam=self.lam)
    if self.estimator in ("grpo", "rloo") and self.group_size < 2:
      raise CotsafeError(f"AdvantageConfig: estimator={self.estimator!r} needs group_size >= 2 "
                         f"samples per prompt, got {self.group_size}")


def compute_advantages(cfg: AdvantageConfig, *, rewards_bt: jax.Array, mask_bt: jax.Array,
                       values_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(advantages_bt, returns_bt) by cfg.estimator. values_bt is needed by gae only.

  returns_bt: GAE's critic targets; reinforce_pp's discounted returns; for grpo / rloo the
  row's score on each valid token (no critic uses them).
  """
  if cfg.estimator == "gae":
    if values_bt is None:
      raise CotsafeError("compute_advantages: estimator='gae' needs values_bt (a critic)")
    adv_bt, returns_bt = gae(rewards_bt, values_bt, mask_bt, gamma=cfg.gamma, lam=cfg.lam)
  elif cfg.estimator == "reinforce_pp":
    return reinforce_pp_advantages(rewards_bt, mask_bt, gamma=cfg.gamma)
  else:
    if cfg.estimator == "grpo":
      adv_bt = grpo_advantages(rewards_bt, mask_bt, group_size=cfg.group_size,
                               scale_by_std=cfg.grpo_scale_by_std)
    else:
      adv_bt = rloo_advantages(rewards_bt, mask_bt, group_size=cfg.group_size)
    returns_bt = sequence_scores(rewards_bt, mask_bt)[:, None] * _f32(mask_bt)
  if cfg.whiten:
    adv_bt = masked_whiten(adv_bt, mask_bt)
  return adv_bt, returns_bt
