"""Pure PPO step functions: score (old / reference log-probs, entropy, values), advantages, update.

train/ppo_programs.py jits each once per shape with explicit shardings (the update donates the state).
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
from cotsafe_jax.parallel.mesh import constrain
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
  microbatch_rows_per_device: int | None = None  # set: num_microbatches follows the mesh (`for_mesh`)
  score_microbatches: int | None = None  # None: the update's micro-batch size (minibatches x microbatches)
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
    if self.microbatch_rows_per_device is not None and self.microbatch_rows_per_device < 1:
      raise CotsafeError(f"PPOConfig.microbatch_rows_per_device={self.microbatch_rows_per_device} must be >= 1 "
                         "(or None: num_microbatches as set)")
    if self.score_microbatches is not None and self.score_microbatches < 1:
      raise CotsafeError(f"PPOConfig.score_microbatches={self.score_microbatches} must be >= 1 (or None)")
    if not self.temperature > 0:
      raise CotsafeError(f"PPOConfig.temperature={self.temperature} must be > 0 (the sampling temperature)")

  @property
  def uses_critic(self) -> bool:
    return self.advantage.estimator == "gae"

  def for_mesh(self, *, rows: int, shards: int) -> "PPOConfig":
    """This config for `rows` rollout rows per step over `shards` data x fsdp devices: with
    microbatch_rows_per_device set, num_microbatches = minibatch rows / (shards x rows per device), so one
    gin file is valid for any device count that divides the minibatch."""
    if self.microbatch_rows_per_device is None:
      return self
    per = self.microbatch_rows_per_device
    mb = rows // self.num_minibatches
    if rows % self.num_minibatches or mb % (per * shards):
      raise CotsafeError(f"PPOConfig.microbatch_rows_per_device={per}: a minibatch of {rows} / "
                         f"{self.num_minibatches} rows does not split into micro-batches of {per} row(s) on each "
                         f"of {shards} data x fsdp devices (expected minibatch rows a multiple of {per * shards})")
    return dataclasses.replace(self, num_microbatches=mb // (per * shards))

  @property
  def score_chunks(self) -> int:
    """Micro-batches the score step runs the rollout batch in."""
    return self.score_microbatches or self.num_minibatches * self.num_microbatches


@dataclasses.dataclass(frozen=True)
class CriticSpec:
  """A value head on a backbone: params {"backbone": decoder params, "head": value-head params}."""
  cfg: models.ModelConfig


def completion_logprobs(cfg: models.ModelConfig, params: Any, tokens_bs: jax.Array, mask_bs: jax.Array, *,
                        num_completion: int, temperature: float = 1.0,
                        impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """log pi(y_t | ...) and the entropy of each next-token distribution, for the last `num_completion`
  tokens, through the fused op: the [T, V] logits are never built. The unembedding enters in the compute
  dtype, like every other weight (a float32 master copy and a compute-dtype frozen copy agree exactly)."""
  h_bsd = models.hidden_states(cfg, params, tokens_bs, attention_mask_bt=mask_bs)
  s = tokens_bs.shape[1]
  h_btd = h_bsd[:, s - num_completion - 1:s - 1]  # the state before each completion token
  targets_bt = tokens_bs[:, s - num_completion:]
  w_dv = models.unembedding(cfg, params).astype(cfg.dtype)
  return kernels.logprob_entropy(h_btd, w_dv, targets_bt, temperature=temperature, impl=impl)


def critic_values(cfg: models.ModelConfig, params: Any, tokens_bs: jax.Array, mask_bs: jax.Array, *,
                  num_completion: int) -> jax.Array:
  """V(state before completion token t), float32 [B, T]."""
  h_bsd = models.hidden_states(cfg, params["backbone"], tokens_bs, attention_mask_bt=mask_bs)
  s = tokens_bs.shape[1]
  return heads.apply_head(heads.ValueHead(), params["head"], h_bsd[:, s - num_completion - 1:s - 1])


def critic_config(cfg: models.ModelConfig) -> models.ModelConfig:
  """The critic's backbone: the model without its unembedding (a value head reads the hidden states), so the
  critic and its optimizer state carry no [D, V] matrix. Its params are `critic_backbone(decoder params)`."""
  return cfg.replace(tie_word_embeddings=True)


def critic_backbone(params: Any) -> Any:
  return {k: v for k, v in params.items() if k != "lm_head"}


def init_critic(cfg: models.ModelConfig, backbone: Any, rng: jax.Array, *, mesh=None) -> dict[str, Any]:
  """A zero-initialised value head on `backbone` (decoder params of `critic_config(cfg)`)."""
  head = heads.init_head(heads.ValueHead(), rng, embed_dim=cfg.hidden_size, mesh=mesh)
  return {"backbone": critic_backbone(backbone), "head": head}


def critic_shapes(cfg: models.ModelConfig) -> dict[str, Any]:
  """ShapeDtypeStructs of the critic's params (backbone + value head)."""
  head = jax.eval_shape(lambda r: heads.init_head(heads.ValueHead(), r, embed_dim=cfg.hidden_size),
                        jax.random.key(0))
  return {"backbone": models.param_shapes(cfg), "head": head}


def critic_shardings(cfg: models.ModelConfig, mesh) -> dict[str, Any]:
  return {"backbone": models.param_shardings(cfg, mesh),
          "head": heads.head_shardings(heads.ValueHead(), embed_dim=cfg.hidden_size, mesh=mesh)}


def microbatches(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [m, B / m, ...]; row j of microbatch i is row j*m + i, so every microbatch spreads over all
  batch shards."""
  return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def unmicrobatch(x: jax.Array) -> jax.Array:
  """The inverse of `microbatches`: [m, B / m, ...] -> [B, ...]."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _constrain_rows(tree: Any) -> Any:
  """Every [rows, ...] leaf split over the batch axes of the context mesh (a micro-batch inside a loop)."""
  return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def score_fn(policy_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None, ppo: PPOConfig, *,
             num_completion: int, num_chunks: int = 1) -> Callable:
  """(policy, reference, critic, rollout) -> dict of old_logp_bt, ref_logp_bt, entropy_bt, values_bt.

  The rollout is scored in `num_chunks` micro-batches one after another (lax.map), so the forward passes'
  activations are those of one micro-batch, not of the whole rollout batch."""
  kw = dict(num_completion=num_completion, temperature=ppo.temperature, impl=ppo.logprob_impl)

  def one(policy, reference, critic, rollout: Rollout):
    rollout = _constrain_rows(rollout)
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

  def score(policy, reference, critic, rollout: Rollout):
    if num_chunks == 1:
      return one(policy, reference, critic, rollout)
    chunks = jax.tree.map(lambda x: microbatches(x, num_chunks), rollout)
    out = jax.lax.map(lambda r: one(policy, reference, critic, r), chunks)
    return _constrain_rows(jax.tree.map(unmicrobatch, out))
  return score


def advantage_fn(ppo: PPOConfig) -> Callable:
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
  return step


def update_fn(policy_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None, ppo: PPOConfig,
              policy_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation | None,
              *, num_completion: int, grad_shardings: Any = None) -> Callable:
  """(state, minibatch, kl_coef) -> (state, metrics). Gradients accumulate over microbatches; losses are
  normalised by the minibatch's global token / sequence counts, so the sum over microbatches is the
  minibatch loss whatever the split or the data-parallel size. `grad_shardings` (a (policy, critic) pair of
  sharding trees) keeps the float32 gradient accumulators split like the params."""
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

  def split_like_params(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

  def zeros(tree, shardings):
    return split_like_params(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree), shardings)

  def accumulate(loss_fn, params, shardings, micro, *args):
    """Sum over micro-batches of loss_fn's gradients (and its additive metrics), split like the params."""
    def body(g_acc, one: ScoredRollout):
      (_, met), g = jax.value_and_grad(loss_fn, has_aux=True)(params, _constrain_rows(one), *args)
      # The barrier keeps XLA from moving the gradients' reduce-scatters out of the loop (one collective at
      # the end, but whole-size accumulators); the constraint keeps the accumulators split like the params.
      g = jax.lax.optimization_barrier(g)
      return split_like_params(jax.tree.map(jnp.add, g_acc, g), shardings), met
    return jax.lax.scan(body, zeros(params, shardings), micro)

  def update(state: TrainState, mb: ScoredRollout, kl_coef):
    mask = mb.completion_mask_bt.astype(jnp.float32)
    counts = {"num_tokens": jnp.maximum(mask.sum(), 1.0), "num_seqs": jnp.maximum((mask.sum(1) > 0).sum(), 1)}
    micro = jax.tree.map(lambda x: microbatches(x, ppo.num_microbatches), mb)
    pol_sh, cri_sh = grad_shardings if grad_shardings is not None else (None, None)
    # policy, then critic: each model's gradients are summed and applied before the other's are computed, so
    # only one model's float32 gradient trees are alive at a time
    g_pol, per_micro = accumulate(policy_loss, state.policy, pol_sh, micro, counts, kl_coef)
    # every metric is normalised by the minibatch's global counts: the sum over microbatches is its value
    metrics = jax.tree.map(lambda x: x.sum(0), per_micro)
    metrics["grad_norm/policy"] = optax.global_norm(g_pol)
    upd, policy_opt = policy_tx.update(g_pol, state.policy_opt, state.policy)
    policy = optax.apply_updates(state.policy, upd)
    critic, critic_opt = state.critic, state.critic_opt
    if critic is not None:
      # the critic's pass starts once the policy's update is done (a data dependence through the barrier)
      policy, policy_opt, critic, micro = jax.lax.optimization_barrier((policy, policy_opt, critic, micro))
      g_cri, per_micro_v = accumulate(value_loss, critic, cri_sh, micro, counts)
      metrics.update({k: v.sum(0) for k, v in per_micro_v.items() if k != "explained_variance"})  # not additive
      metrics["grad_norm/critic"] = optax.global_norm(g_cri)
      upd_c, critic_opt = critic_tx.update(g_cri, critic_opt, critic)
      critic = optax.apply_updates(critic, upd_c)
    new = state.replace(policy=policy, policy_opt=policy_opt, critic=critic, critic_opt=critic_opt)
    return new, metrics

  return update


def rollout_metrics(scored: dict[str, jax.Array], returns_bt: jax.Array, mask_bt: jax.Array) -> dict[str, Any]:
  m = mask_bt.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return {"entropy": (scored["entropy_bt"] * m).sum() / n,
          "explained_variance": explained_variance(scored["values_bt"], returns_bt, m)}
