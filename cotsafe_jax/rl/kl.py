"""Per-token KL(pi || ref) estimators k1, k2, k3 with clamps, used as a reward penalty or a loss.

The coefficient beta is fixed, or adapted to a target KL by `controllers.AdaptiveKLConfig`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rl.losses import Metrics, _check_shapes, _f32, aggregate

KL_KINDS = ("k1", "k2", "k3")
LOSS_KL_KINDS = ("k2", "k3")  # k1 as a loss has zero expected gradient


def token_kl(logp_bt: jax.Array, ref_logp_bt: jax.Array, *, kind: str = "k3",
             log_ratio_clamp: float | None = 20.0, kl_clamp: float | None = 10.0) -> jax.Array:
  """Per-token estimate of KL(pi || ref) from tokens x sampled from pi, in float32.

  With d = logp - ref_logp = log(pi(x) / ref(x)), clamped to +-log_ratio_clamp before use:
    k1 = d                    unbiased for KL(pi || ref), high variance, can be negative
    k2 = d^2 / 2              biased (second order in d), low variance, >= 0
    k3 = exp(-d) - 1 + d      unbiased for KL(pi || ref), low variance, >= 0 (Schulman,
                              "Approximating KL divergence": (r - 1) - log r with r = ref / pi)
  The value is then clamped to +-kl_clamp (k3's exp(-d) explodes where ref >> pi). None = no clamp.

  As a loss (`kl_loss`), the samples x are fixed and only log pi(x) carries a gradient, so a token
  contributes k'(d) grad log pi(x). Expected over x ~ pi (on-policy: pi is the sampling policy):
    k1: k' = 1            E[grad log pi] = grad sum_x pi(x) = 0. Zero expected gradient: k1 is
                          refused as a loss.
    k2: k' = d            E[d grad log pi] = grad KL(pi || ref), exactly, on-policy. After the
                          first update of a rollout the samples come from the old policy and the
                          match holds to first order in (theta - theta_old).
    k3: k' = 1 - ref/pi   E[(1 - ref/pi) grad log pi] = -sum_x ref(x) grad log pi(x)
                          = grad KL(ref || pi): the gradient of the *forward* KL, not of
                          KL(pi || ref), although k3's value estimates KL(pi || ref).
  (tests/rl/test_kl.py checks all three against float64 sums over a categorical.)

  The clamps cut gradients. jnp.clip has zero gradient outside its range, so a token whose value
  is clamped contributes nothing to a KL loss. With kl_clamp = 10, k3 = 10 at d = -2.6109 and at
  d = 10.99998: a token with log(pi / ref) < -2.61 (pi more than 13.6x below ref on a sampled
  token) or > 11.0 gets exactly zero KL gradient, although these are the tokens furthest from
  the reference. k2 = 10 at |d| = sqrt(20) = 4.47. Every estimator also loses its gradient where
  |d| > log_ratio_clamp. The same cap in verl's `low_var_kl` (+-10) behaves the same way. Use
  kl_clamp=None to keep the gradient everywhere |d| <= log_ratio_clamp (k3 then reaches
  e^20 ~ 5e8 at the log-ratio clamp). In the reward (`kl_penalty_in_reward`) no gradient flows
  and the clamp only bounds the penalty.
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

  No gradient flows through the penalty (it is part of the environment's reward), so every kind is
  valid here: k1's per-token log-ratio summed by the returns is the sequence's KL(pi || ref)
  estimate (InstructGPT / TRL). kl_bt is masked to 0 on padding; its row sums are the
  per-sequence KL the adaptive controller reads.
  """
  _check_shapes("kl_penalty_in_reward", rewards_bt=rewards_bt, logp_bt=logp_bt,
                ref_logp_bt=ref_logp_bt, mask_bt=mask_bt)
  kl_bt = token_kl(jax.lax.stop_gradient(logp_bt), jax.lax.stop_gradient(ref_logp_bt), kind=kind,
                   log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp) * _f32(mask_bt)
  return _f32(rewards_bt) - _f32(beta) * kl_bt, kl_bt


def check_loss_kind(where: str, kind: str) -> None:
  """A KL loss needs k2 or k3: k1's expected gradient is zero (see `token_kl`)."""
  if kind == "k1":
    raise CotsafeError(f"{where}: kl_kind='k1' cannot be a loss: its expected gradient is zero "
                       "(E_pi[grad log pi] = 0), so it would not hold the policy near the reference; use "
                       "'k2' (gradient of KL(pi || ref)) or 'k3' (gradient of KL(ref || pi)), or put k1 in "
                       "the reward (kl_mode='reward')")
  if kind not in KL_KINDS:
    raise CotsafeError(f"{where}: kl_kind={kind!r} is not one of {', '.join(KL_KINDS)}")


def kl_loss(logp_bt: jax.Array, ref_logp_bt: jax.Array, mask_bt: jax.Array, *, kind: str = "k3",
            agg: str = "token-mean", num_tokens, num_seqs, log_ratio_clamp: float | None = 20.0,
            kl_clamp: float | None = 10.0) -> tuple[jax.Array, Metrics]:
  """KL as a loss term (GRPO style): aggregate(KL_t) with the loss aggregation modes.

  Multiply by beta and add to the policy loss. Gradients flow through logp_bt only; the
  reference is frozen. kind: k2 (expected gradient = grad KL(pi || ref)) or k3 (= grad
  KL(ref || pi)); k1 is refused. Clamped tokens give no gradient (see `token_kl`). Counts are the
  global batch's (see `losses.loss_normalizers`).
  """
  check_loss_kind("kl_loss", kind)
  kl_bt = token_kl(logp_bt, jax.lax.stop_gradient(ref_logp_bt), kind=kind,
                   log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
  loss = aggregate(kl_bt, mask_bt, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
  return loss, {"kl_loss": loss}
