"""Per-token KL(pi || ref) estimators k1, k2, k3 with clamps, used as a reward penalty or a loss.

The coefficient beta is fixed, or adapted to a target KL by `controllers.AdaptiveKLConfig`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rl.losses import Metrics, _check_shapes, _f32, aggregate

KL_KINDS = ("k1", "k2", "k3")


def token_kl(logp_bt: jax.Array, ref_logp_bt: jax.Array, *, kind: str = "k3",
             log_ratio_clamp: float | None = 20.0, kl_clamp: float | None = 10.0) -> jax.Array:
  """Per-token estimate of KL(pi || ref) from tokens sampled from pi, in float32.

  With d = logp - ref_logp = log(pi / ref), clamped to +-log_ratio_clamp before use:
    k1 = d                      unbiased, high variance, can be negative
    k2 = d^2 / 2                biased, low variance, >= 0; its gradient is the KL's gradient
    k3 = exp(-d) - 1 + d        unbiased, low variance, >= 0 (Schulman, "Approximating KL
                                divergence": (r - 1) - log r with r = ref / pi)
  The result is clamped to +-kl_clamp (k3's exp(-d) explodes where ref >> pi). None = no clamp.
  """
  if kind not in KL_KINDS:
    raise CotsafeError(f"token_kl: kind={kind!r} is not one of {', '.join(KL_KINDS)}")
  _check_shapes("token_kl", logp_bt=logp_bt, ref_logp_bt=ref_logp_bt)
  d_bt = _f32(logp_bt) - _f32(ref_logp_bt)
  if log_ratio_clamp is not None:
    d_bt = jnp.clip(d_bt, -log_ratio_clamp, log_ratio_clamp)
  if kind == "k1":
    kl_bt = d_bt
  elif kind == "k2":
    kl_bt = 0.5 * jnp.square(d_bt)
  else:
    kl_bt = jnp.expm1(-d_bt) + d_bt
  if kl_clamp is not None:
    kl_bt = jnp.clip(kl_bt, -kl_clamp, kl_clamp)
  return kl_bt


def kl_penalty_in_reward(rewards_bt: jax.Array, logp_bt: jax.Array, ref_logp_bt: jax.Array,
                         mask_bt: jax.Array, *, beta, kind: str = "k1",
                         log_ratio_clamp: float | None = 20.0,
                         kl_clamp: float | None = 10.0) -> tuple[jax.Array, jax.Array]:
  """KL in the reward: r_t <- r_t - beta * KL_t on valid tokens. Returns (rewards_bt, kl_bt).

  No gradient flows through the penalty (it is part of the environment's reward). kl_bt is
  masked to 0 on padding; its row sums are the per-sequence KL the adaptive controller reads.
  """
  _check_shapes("kl_penalty_in_reward", rewards_bt=rewards_bt, logp_bt=logp_bt,
                ref_logp_bt=ref_logp_bt, mask_bt=mask_bt)
  kl_bt = token_kl(jax.lax.stop_gradient(logp_bt), jax.lax.stop_gradient(ref_logp_bt), kind=kind,
                   log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp) * _f32(mask_bt)
  return _f32(rewards_bt) - _f32(beta) * kl_bt, kl_bt


def kl_loss(logp_bt: jax.Array, ref_logp_bt: jax.Array, mask_bt: jax.Array, *, kind: str = "k3",
            agg: str = "token-mean", num_tokens, num_seqs, log_ratio_clamp: float | None = 20.0,
            kl_clamp: float | None = 10.0) -> tuple[jax.Array, Metrics]:
  """KL as a loss term (GRPO style): aggregate(KL_t) with the loss aggregation modes.

  Multiply by beta and add to the policy loss. Gradients flow through logp_bt only; the
  reference is frozen. Counts are the global batch's (see `losses.loss_normalizers`).
  """
  kl_bt = token_kl(logp_bt, jax.lax.stop_gradient(ref_logp_bt), kind=kind,
                   log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
  loss = aggregate(kl_bt, mask_bt, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
  return loss, {"kl_loss": loss}
