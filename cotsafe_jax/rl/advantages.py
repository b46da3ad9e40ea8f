"""Advantage estimators on token-level rewards: GAE (critic), GRPO, RLOO, REINFORCE++; whitening.

Rewards come dense [B, T] (safety penalties on tokens, sequence rewards on the last token), or split into
sequence rewards [B] and token rewards [B, T], which GRPO / RLOO keep apart (token-level GRPO).
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


def _next_valid_value(values_bt, mask_bt, after_last_b):
  """V of the next valid token of each row (after_last_b after the last one), by a reverse scan."""
  v_tb, m_tb = values_bt.T, mask_bt.T > 0

  def step(next_v_b, inputs):
    v_b, m_b = inputs
    return jnp.where(m_b, v_b, next_v_b), next_v_b

  _, next_v_tb = jax.lax.scan(step, after_last_b, (v_tb, m_tb), reverse=True)
  return next_v_tb.T


def _check_b(where: str, b: int, **arrays_b) -> None:
  for name, x in arrays_b.items():
    if x is not None and jnp.shape(x) != (b,):
      raise CotsafeError(f"{where}: {name} has shape {jnp.shape(x)}, expected [B] = ({b},)")


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, *, gamma: float,
        lam: float, finished_b: jax.Array | None = None,
        bootstrap_values_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over valid tokens. Returns (advantages_bt, returns_bt).

  delta_t = r_t + gamma V_{t'} - V_t,  A_t = delta_t + gamma lam A_{t'},  R_t = A_t + V_t
  where t' is the next valid token of the row. After a row's last valid token:
    finished (it emitted a stop token):    terminal, V_{t'} = 0
    cut at max_new_tokens (not finished):  V_{t'} = bootstrap_values_b, the critic's value of the
                                           state after the last token: the episode goes on, the
                                           budget ran out (Pardo et al. 2018, "Time limits in RL")
  finished_b and bootstrap_values_b come together; without them every row is terminal. Both outputs
  are 0 on invalid tokens.
  """
  _check_shapes("gae", rewards_bt=rewards_bt, values_bt=values_bt, mask_bt=mask_bt)
  _check_unit("gae", gamma=gamma, lam=lam)
  b = jnp.shape(rewards_bt)[0]
  if (finished_b is None) != (bootstrap_values_b is None):
    raise CotsafeError("gae: finished_b and bootstrap_values_b go together (a row cut at max_new_tokens "
                       "bootstraps from the critic's value after its last token)")
  _check_b("gae", b, finished_b=finished_b, bootstrap_values_b=bootstrap_values_b)
  mask_bt = _f32(mask_bt)
  rewards_bt, values_bt = _f32(rewards_bt) * mask_bt, _f32(values_bt) * mask_bt
  after_last_b = jnp.zeros((b,), jnp.float32)
  if finished_b is not None:
    after_last_b = jnp.where(jnp.asarray(finished_b, bool), 0.0, _f32(bootstrap_values_b))
  delta_bt = rewards_bt + gamma * _next_valid_value(values_bt, mask_bt, after_last_b) - values_bt
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
  """A row's score from dense rewards: the sum of its token rewards over valid tokens, [B]."""
  _check_shapes("sequence_scores", rewards_bt=rewards_bt, mask_bt=mask_bt)
  return jnp.sum(_f32(rewards_bt) * _f32(mask_bt), axis=-1)


def place_at_last_valid(values_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """[B] -> [B, T] float32 with each row's value on its last valid token (dropped for an empty row)."""
  m_bt = jnp.asarray(mask_bt) > 0
  t = m_bt.shape[1]
  last_b = t - 1 - jnp.argmax(m_bt[:, ::-1], axis=1)
  at_last_bt = (jnp.arange(t)[None, :] == last_b[:, None]) & jnp.any(m_bt, axis=1, keepdims=True)
  return jnp.where(at_last_bt, _f32(values_b)[:, None], 0.0)


def token_returns(token_rewards_bt: jax.Array, mask_bt: jax.Array, *, gamma: float) -> jax.Array:
  """G_t = sum_{t' >= t valid} gamma^k r_t' (k: valid tokens between): the token-level term of token-level
  GRPO / RLOO. gamma = 0 keeps each reward on its own token (G_t = r_t); 0 on invalid tokens."""
  _check_shapes("token_returns", token_rewards_bt=token_rewards_bt, mask_bt=mask_bt)
  _check_unit("token_returns", gamma=gamma)
  mask_bt = _f32(mask_bt)
  return _reverse_discount(_f32(token_rewards_bt) * mask_bt, mask_bt, gamma)


def _grouped(where: str, scores_b: jax.Array, group_size: int) -> jax.Array:
  b = scores_b.shape[0]
  if group_size < 2 or b % group_size:
    raise CotsafeError(f"{where}: group_size={group_size} must be >= 2 and divide the batch size {b} "
                       "(rows are consecutive blocks of group_size samples per prompt)")
  return scores_b.reshape(b // group_size, group_size)  # [prompts, samples]


def _split(where: str, rewards_bt, mask_bt, sequence_rewards_b, token_rewards_bt):
  """(sequence scores [B], token rewards [B, T] or None) from the dense or the split form."""
  if sequence_rewards_b is None:
    if token_rewards_bt is not None:
      raise CotsafeError(f"{where}: token_rewards_bt needs sequence_rewards_b (the split form); the dense "
                         "form passes rewards_bt alone")
    if rewards_bt is None:
      raise CotsafeError(f"{where}: pass rewards_bt (dense) or sequence_rewards_b [+ token_rewards_bt]")
    return sequence_scores(rewards_bt, mask_bt), None
  if rewards_bt is not None:
    raise CotsafeError(f"{where}: pass rewards_bt (dense) or sequence_rewards_b [+ token_rewards_bt], not both")
  _check_shapes(where, mask_bt=mask_bt, token_rewards_bt=token_rewards_bt)
  _check_b(where, jnp.shape(mask_bt)[0], sequence_rewards_b=sequence_rewards_b)
  return _f32(sequence_rewards_b), token_rewards_bt


def _with_token_term(seq_adv_b, mask_bt, token_rewards_bt, token_gamma):
  mask_bt = _f32(mask_bt)
  adv_bt = seq_adv_b[:, None] * mask_bt
  if token_rewards_bt is not None:
    adv_bt = adv_bt + token_returns(token_rewards_bt, mask_bt, gamma=token_gamma)
  return adv_bt


def grpo_advantages(rewards_bt: jax.Array | None, mask_bt: jax.Array, *, group_size: int,
                    scale_by_std: bool = True, std_floor: float = 0.01,
                    sequence_rewards_b: jax.Array | None = None, token_rewards_bt: jax.Array | None = None,
                    token_gamma: float = 0.0) -> jax.Array:
  """Group-normalised advantages with token-level terms kept on their tokens (token-level GRPO):

    A_{i,t} = (s_i - mean_g s) / max(std_g s, std_floor)  +  G_{i,t},
    G_{i,t} = sum_{t' >= t} token_gamma^(t' - t) r^tok_{i,t'}          (over valid tokens)

  s_i is row i's sequence reward (outcome: sequence safety, correctness, format, refusal), r^tok the
  token rewards (safety penalties on unsafe tokens, KL in the reward, a Lagrangian cost); each group
  is group_size consecutive rows (samples of one prompt); std is the unbiased (n - 1) one.
  token_gamma = 0 (default): a penalty on token j changes A at token j only. token_gamma = 1: it
  changes every token <= j by the same amount, the reward-to-go of process supervision.
  scale_by_std=False is Dr.GRPO (no std). The floor keeps a group whose rewards differ by RM noise
  (all safe, all correct: std ~ 1e-3) from being blown up to +-1 advantages; with std_floor = 0.01
  such differences stay ~0.1.

  The token term stays in reward units (not divided by the group std, which the floor allows to be
  0.01: a 0.5 penalty would become 50). What others do: verl's `compute_grpo_outcome_advantage`
  sums all token-level rewards into one score per row and broadcasts its normalised value to every
  token (the dense form below), so a penalty moves every token of its row, a later self-correction
  included; TRL's GRPOTrainer has sequence rewards only (std + a small eps, or no std with
  scale_rewards off); process supervision in DeepSeekMath (Shao et al. 2024, sec. 4.1.3) gives token t
  the sum of the normalised step rewards at or after t, and PRIME (Cui et al. 2025) adds the
  discounted reward-to-go of leave-one-out-baselined process rewards to the outcome's RLOO advantage:
  token_gamma = 1 is their reward-to-go, without the baseline on the process term. token_gamma = 0
  (default) puts a safety penalty on the tokens the RM flagged and nowhere else: the reasoning that
  led there is judged by the sequence term, and the first tokens of a long CoT do not collect every
  later penalty.

  Dense form (rewards_bt alone, the earlier API): s_i = sum_t r_{i,t}, no token term.
  """
  s_b, tok_bt = _split("grpo_advantages", rewards_bt, mask_bt, sequence_rewards_b, token_rewards_bt)
  if scale_by_std and not std_floor > 0.0:
    raise CotsafeError(f"grpo_advantages: std_floor={std_floor} must be > 0 when scaling by the std")
  scores_gn = _grouped("grpo_advantages", s_b, group_size)
  adv_gn = scores_gn - jnp.mean(scores_gn, axis=-1, keepdims=True)
  if scale_by_std:
    adv_gn = adv_gn / jnp.maximum(jnp.std(scores_gn, axis=-1, ddof=1, keepdims=True), std_floor)
  return _with_token_term(adv_gn.reshape(-1), mask_bt, tok_bt, token_gamma)


def rloo_advantages(rewards_bt: jax.Array | None, mask_bt: jax.Array, *, group_size: int,
                    sequence_rewards_b: jax.Array | None = None, token_rewards_bt: jax.Array | None = None,
                    token_gamma: float = 0.0) -> jax.Array:
  """RLOO with token-level terms: A_{i,t} = s_i - mean_{j != i} s_j + G_{i,t} within each group.

  s and G as in `grpo_advantages` (sequence rewards; token rewards kept on their tokens, or their
  reward-to-go with token_gamma > 0). Dense form (rewards_bt alone): s_i = sum_t r_{i,t}, no G.
  """
  s_b, tok_bt = _split("rloo_advantages", rewards_bt, mask_bt, sequence_rewards_b, token_rewards_bt)
  scores_gn = _grouped("rloo_advantages", s_b, group_size)
  others_gn = (jnp.sum(scores_gn, axis=-1, keepdims=True) - scores_gn) / (group_size - 1)
  return _with_token_term((scores_gn - others_gn).reshape(-1), mask_bt, tok_bt, token_gamma)


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
  (reinforce_pp always whitens). grpo_std_floor: the floor of GRPO's group std. token_gamma: how grpo /
  rloo credit token rewards: 0 on their own token, 1 their undiscounted reward-to-go (see
  `grpo_advantages`)."""
  estimator: str = "gae"
  gamma: float = 1.0
  lam: float = 0.95
  group_size: int = 1
  grpo_scale_by_std: bool = True
  grpo_std_floor: float = 0.01
  token_gamma: float = 0.0
  whiten: bool = False

  def __post_init__(self):
    if self.estimator not in ESTIMATORS:
      raise CotsafeError(f"AdvantageConfig: estimator={self.estimator!r} is not one of "
                         f"{', '.join(ESTIMATORS)}")
    _check_unit("AdvantageConfig", gamma=self.gamma, lam=self.lam, token_gamma=self.token_gamma)
    if self.estimator in ("grpo", "rloo") and self.group_size < 2:
      raise CotsafeError(f"AdvantageConfig: estimator={self.estimator!r} needs group_size >= 2 "
                         f"samples per prompt, got {self.group_size}")
    if not self.grpo_std_floor > 0.0:
      raise CotsafeError(f"AdvantageConfig: grpo_std_floor={self.grpo_std_floor} must be > 0 (e.g. 0.01, "
                         "below which reward differences are noise)")


def compute_advantages(cfg: AdvantageConfig, *, rewards_bt: jax.Array | None = None, mask_bt: jax.Array,
                       values_bt: jax.Array | None = None, sequence_rewards_b: jax.Array | None = None,
                       token_rewards_bt: jax.Array | None = None, finished_b: jax.Array | None = None,
                       bootstrap_values_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(advantages_bt, returns_bt) by cfg.estimator.

  Rewards, one of two forms:
    split: sequence_rewards_b [B] (outcome terms) + token_rewards_bt [B, T] (safety penalties, KL in
           the reward, costs). gae / reinforce_pp use r = token + the sequence reward on each row's
           last valid token; grpo / rloo keep them apart (`grpo_advantages`).
    dense: rewards_bt [B, T] alone; grpo / rloo then score a row by the sum of its rewards.
  values_bt: the critic's values, gae only. finished_b [B] (the row emitted a stop token) with
  bootstrap_values_b [B] (the critic's value after the last token): gae bootstraps rows cut at
  max_new_tokens instead of ending them; the critic-free estimators have nothing to bootstrap from and
  ignore them (an unfinished row's rewards say it is unfinished, see rewards.CompositeReward).
  returns_bt: GAE's critic targets; reinforce_pp's discounted returns; for grpo / rloo the row's
  total reward on each valid token (no critic uses them).
  """
  s_b, tok_bt = _split("compute_advantages", rewards_bt, mask_bt, sequence_rewards_b, token_rewards_bt)
  if sequence_rewards_b is not None and cfg.estimator in ("gae", "reinforce_pp"):
    rewards_bt = place_at_last_valid(s_b, mask_bt)
    if tok_bt is not None:
      rewards_bt = rewards_bt + _f32(tok_bt)
  if cfg.estimator == "gae":
    if values_bt is None:
      raise CotsafeError("compute_advantages: estimator='gae' needs values_bt (a critic)")
    adv_bt, returns_bt = gae(rewards_bt, values_bt, mask_bt, gamma=cfg.gamma, lam=cfg.lam,
                             finished_b=finished_b, bootstrap_values_b=bootstrap_values_b)
  elif cfg.estimator == "reinforce_pp":
    return reinforce_pp_advantages(rewards_bt, mask_bt, gamma=cfg.gamma)
  else:
    kw = dict(group_size=cfg.group_size, sequence_rewards_b=sequence_rewards_b,
              token_rewards_bt=token_rewards_bt, token_gamma=cfg.token_gamma)
    if cfg.estimator == "grpo":
      adv_bt = grpo_advantages(rewards_bt, mask_bt, scale_by_std=cfg.grpo_scale_by_std,
                               std_floor=cfg.grpo_std_floor, **kw)
    else:
      adv_bt = rloo_advantages(rewards_bt, mask_bt, **kw)
    total_b = s_b if tok_bt is None else s_b + sequence_scores(tok_bt, mask_bt)
    returns_bt = total_b[:, None] * _f32(mask_bt)
  if cfg.whiten:
    adv_bt = masked_whiten(adv_bt, mask_bt)
  return adv_bt, returns_bt
