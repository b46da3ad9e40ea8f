"""PPO losses: clipped surrogate (clip-higher, dual-clip), clipped value loss, entropy bonus.

Losses are frozen keyword-only dataclasses called on [B, T] arrays; all maths in float32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cotsafe_jax.errors import CotsafeError

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
Metrics = dict[str, jax.Array]


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _check_shapes(where: str, **arrays_bt) -> None:
  shapes = {name: jnp.shape(x) for name, x in arrays_bt.items() if x is not None}
  first_name, first = next(iter(shapes.items()))
  if len(first) != 2:
    raise CotsafeError(f"{where}: {first_name} must be [B, T], got shape {first}")
  for name, shape in shapes.items():
    if shape != first:
      raise CotsafeError(f"{where}: {name} has shape {shape} but {first_name} has {first} "
                         "(expected equal [B, T] shapes)")


def _check_agg(where: str, agg: str) -> None:
  if agg not in AGG_MODES:
    raise CotsafeError(f"{where}: agg={agg!r} is not one of {', '.join(AGG_MODES)}")


def loss_normalizers(mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(num_tokens, num_seqs) of a whole batch: valid tokens, and rows with at least one valid token.

  Compute these once on the full (global) batch and pass them to every microbatch's loss: a
  loss over a microbatch or a data-parallel shard is then that part's share, and the parts sum
  to exactly the full-batch loss. Every token metric is normalised the same way and sums the
  same way; only `explained_variance` is a statistic of the rows it was given.
  """
  mask_bt = _f32(mask_bt)
  num_tokens = jnp.sum(mask_bt)
  num_seqs = jnp.sum((jnp.sum(mask_bt, axis=-1) > 0).astype(jnp.float32))
  return num_tokens, num_seqs


def aggregate(x_bt: jax.Array, mask_bt: jax.Array, *, agg: str, num_tokens, num_seqs) -> jax.Array:
  """Reduce per-token values to a scalar, normalised by global counts.

  token-mean:           sum_bt m x / num_tokens
  seq-mean-token-sum:   sum_b (sum_t m x) / num_seqs                   (Dr.GRPO-style, no length bias)
  seq-mean-token-mean:  sum_b (sum_t m x / sum_t m) / num_seqs         (original GRPO)
  A row's own token count is local to the row, so every mode splits over rows exactly. Counts
  below 1 are raised to 1 (an all-padding batch gives 0, not NaN).
  """
  _check_agg("aggregate", agg)
  _check_shapes("aggregate", x_bt=x_bt, mask_bt=mask_bt)
  x_bt, mask_bt = _f32(x_bt), _f32(mask_bt)
  masked_bt = x_bt * mask_bt
  if agg == "token-mean":
    return jnp.sum(masked_bt) / jnp.maximum(_f32(num_tokens), 1.0)
  row_sum_b = jnp.sum(masked_bt, axis=-1)
  if agg == "seq-mean-token-mean":
    row_sum_b = row_sum_b / jnp.maximum(jnp.sum(mask_bt, axis=-1), 1.0)
  return jnp.sum(row_sum_b) / jnp.maximum(_f32(num_seqs), 1.0)


def _token_mean(x_bt, mask_bt, num_tokens) -> jax.Array:
  return aggregate(x_bt, mask_bt, agg="token-mean", num_tokens=num_tokens, num_seqs=1.0)


def explained_variance(values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """1 - Var[R - V] / Var[R] over valid tokens (population variances); NaN when Var[R] = 0."""
  _check_shapes("explained_variance", values_bt=values_bt, returns_bt=returns_bt, mask_bt=mask_bt)
  values_bt, returns_bt, mask_bt = _f32(values_bt), _f32(returns_bt), _f32(mask_bt)
  n = jnp.maximum(jnp.sum(mask_bt), 1.0)

  def var(x_bt):
    mean = jnp.sum(x_bt * mask_bt) / n
    return jnp.sum(jnp.square(x_bt - mean) * mask_bt) / n

  var_r = var(returns_bt)
  return jnp.where(var_r > 0, 1.0 - var(returns_bt - values_bt) / jnp.where(var_r > 0, var_r, 1.0),
                   jnp.nan)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyLoss:
  """Clipped surrogate  -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),  r = exp(logp - old_logp).

  clip_high > clip_low is DAPO's clip-higher. Dual clip (Ye et al. 2020): for A < 0 the loss is
  also capped at -c A, so a huge ratio on a bad token cannot blow up the update; c > 1, None = off.
  The log-ratio is clamped to +-log_ratio_clamp before exp. entropy_coef > 0 subtracts
  entropy_coef * entropy (aggregated the same way); 0 only logs the entropy.
  """
  clip_low: float = 0.2
  clip_high: float = 0.2
  dual_clip_c: float | None = 3.0
  log_ratio_clamp: float = 20.0
  entropy_coef: float = 0.0
  agg: str = "token-mean"

  def __post_init__(self):
    _check_agg("PolicyLoss", self.agg)
    if not 0.0 < self.clip_low < 1.0:
      raise CotsafeError(f"PolicyLoss: clip_low={self.clip_low} must be in (0, 1)")
    if not self.clip_high > 0.0:
      raise CotsafeError(f"PolicyLoss: clip_high={self.clip_high} must be > 0")
    if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
      raise CotsafeError(f"PolicyLoss: dual_clip_c={self.dual_clip_c} must be > 1 (or None to disable)")
    if not self.log_ratio_clamp > 0.0:
      raise CotsafeError(f"PolicyLoss: log_ratio_clamp={self.log_ratio_clamp} must be > 0")
    if self.entropy_coef < 0.0:
      raise CotsafeError(f"PolicyLoss: entropy_coef={self.entropy_coef} must be >= 0")

  def __call__(self, *, logp_bt: jax.Array, old_logp_bt: jax.Array, advantages_bt: jax.Array,
               mask_bt: jax.Array, num_tokens, num_seqs,
               entropy_bt: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    _check_shapes("PolicyLoss", logp_bt=logp_bt, old_logp_bt=old_logp_bt,
                  advantages_bt=advantages_bt, mask_bt=mask_bt, entropy_bt=entropy_bt)
    if self.entropy_coef > 0.0 and entropy_bt is None:
      raise CotsafeError(f"PolicyLoss: entropy_coef={self.entropy_coef} needs entropy_bt")
    logp_bt, old_logp_bt = _f32(logp_bt), _f32(old_logp_bt)
    adv_bt, mask_bt = jax.lax.stop_gradient(_f32(advantages_bt)), _f32(mask_bt)

    log_ratio_bt = jnp.clip(logp_bt - old_logp_bt, -self.log_ratio_clamp, self.log_ratio_clamp)
    ratio_bt = jnp.exp(log_ratio_bt)
    unclipped_bt = -adv_bt * ratio_bt
    clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - self.clip_low, 1.0 + self.clip_high)
    pg_bt = jnp.maximum(unclipped_bt, clipped_bt)
    dual_bt = jnp.zeros_like(pg_bt)
    if self.dual_clip_c is not None:
      cap_bt = -adv_bt * self.dual_clip_c
      dual_bt = ((adv_bt < 0) & (pg_bt > cap_bt)).astype(jnp.float32)
      pg_bt = jnp.where(adv_bt < 0, jnp.minimum(pg_bt, cap_bt), pg_bt)

    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs)
    pg_loss = aggregate(pg_bt, mask_bt, agg=self.agg, **counts)
    loss = pg_loss
    # a token's gradient is cut where the clipped branch wins: ratio above 1+clip_high with A > 0
    # (upper) or below 1-clip_low with A < 0 (lower)
    upper_bt = ((adv_bt > 0) & (ratio_bt > 1.0 + self.clip_high)).astype(jnp.float32)
    lower_bt = ((adv_bt < 0) & (ratio_bt < 1.0 - self.clip_low)).astype(jnp.float32)
    # k3 estimate of KL(old || new) from samples of old: low variance, >= 0
    approx_kl_bt = jnp.expm1(log_ratio_bt) - log_ratio_bt
    metrics = {
        "pg_loss": pg_loss,
        "clipfrac_upper": _token_mean(upper_bt, mask_bt, num_tokens),
        "clipfrac_lower": _token_mean(lower_bt, mask_bt, num_tokens),
        "clipfrac_dual": _token_mean(dual_bt, mask_bt, num_tokens),
        "approx_kl": _token_mean(jax.lax.stop_gradient(approx_kl_bt), mask_bt, num_tokens),
        "ratio_mean": _token_mean(jax.lax.stop_gradient(ratio_bt), mask_bt, num_tokens),
    }
    if entropy_bt is not None:
      entropy_bt = _f32(entropy_bt)
      metrics["entropy"] = _token_mean(jax.lax.stop_gradient(entropy_bt), mask_bt, num_tokens)
      if self.entropy_coef > 0.0:
        loss = loss - self.entropy_coef * aggregate(entropy_bt, mask_bt, agg=self.agg, **counts)
    metrics["loss"] = loss
    return loss, metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueLoss:
  """PPO2 clipped value loss  0.5 max((V - R)^2, (V_old + clip(V - V_old, +-clip_eps) - R)^2).

  clip_eps None = plain squared error. The max is the pessimistic choice: the critic may not
  profit from moving more than clip_eps away from the values it had when the rollout was scored.
  """
  clip_eps: float | None = 0.2
  agg: str = "token-mean"

  def __post_init__(self):
    _check_agg("ValueLoss", self.agg)
    if self.clip_eps is not None and not self.clip_eps > 0.0:
      raise CotsafeError(f"ValueLoss: clip_eps={self.clip_eps} must be > 0 (or None to disable)")

  def __call__(self, *, values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array,
               mask_bt: jax.Array, num_tokens, num_seqs) -> tuple[jax.Array, Metrics]:
    _check_shapes("ValueLoss", values_bt=values_bt, old_values_bt=old_values_bt,
                  returns_bt=returns_bt, mask_bt=mask_bt)
    values_bt, old_values_bt = _f32(values_bt), _f32(old_values_bt)
    returns_bt, mask_bt = jax.lax.stop_gradient(_f32(returns_bt)), _f32(mask_bt)
    unclipped_bt = jnp.square(values_bt - returns_bt)
    if self.clip_eps is None:
      vf_bt, clipfrac_bt = unclipped_bt, jnp.zeros_like(unclipped_bt)
    else:
      clipped_values_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -self.clip_eps, self.clip_eps)
      clipped_bt = jnp.square(clipped_values_bt - returns_bt)
      vf_bt = jnp.maximum(unclipped_bt, clipped_bt)
      # the clipped term decides where the value moved more than clip_eps and the clipped error is the larger;
      # comparing the two squares alone counts float rounding ties (old + (v - old) != v) as clipped
      clipfrac_bt = ((jnp.abs(values_bt - old_values_bt) > self.clip_eps) & (clipped_bt > unclipped_bt)
                     ).astype(jnp.float32)
    loss = 0.5 * aggregate(vf_bt, mask_bt, agg=self.agg, num_tokens=num_tokens, num_seqs=num_seqs)
    sg = jax.lax.stop_gradient
    metrics = {
        "vf_loss": loss,
        "vf_clipfrac": _token_mean(clipfrac_bt, mask_bt, num_tokens),
        "value_error": _token_mean(sg(unclipped_bt), mask_bt, num_tokens),
        "value_mean": _token_mean(sg(values_bt), mask_bt, num_tokens),
        "explained_variance": explained_variance(sg(values_bt), returns_bt, mask_bt),
    }
    return loss, metrics
