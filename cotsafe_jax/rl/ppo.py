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
from cotsafe_jax.rl.advantages import AdvantageConfig, compute_advantages, place_at_last_valid
from cotsafe_jax.rl.controllers import AdaptiveKLConfig, LagrangianConfig
from cotsafe_jax.rl.kl import KL_KINDS, check_loss_kind, kl_loss, token_kl
from cotsafe_jax.rl.losses import PolicyLoss, ValueLoss, explained_variance
from cotsafe_jax.types import Rollout, ScoredRollout, TrainState

KL_MODES = ("reward", "loss", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
  """The PPO update. kl_mode: "reward" subtracts kl_coef * KL_t from r_t; "loss" adds kl_coef * KL to the
  policy loss; "none" only logs it. adaptive_kl replaces the fixed kl_coef by a controller. lagrangian:
  PPO-Lagrangian on the reward's separate cost (a cost value head on the critic; see LagrangianConfig).

  temperature: the sampling temperature (the trainer requires RolloutConfig.temperature to equal it).
  tis_cap: truncated importance sampling of the sampler's distribution (top-p / top-k filtered, computed
  by the sampler's numerics) against the trainer's old policy: each token's advantage is weighted by
  min(pi_old(y) / q_sampler(y), tis_cap) (Yao et al. 2025, as in verl's TIS); None: no correction."""
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
  tis_cap: float | None = 2.0

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
    if self.tis_cap is not None and not self.tis_cap > 0:
      raise CotsafeError(f"PPOConfig.tis_cap={self.tis_cap} must be > 0 (or None: no importance correction)")
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
                  num_completion: int) -> dict[str, jax.Array]:
  """The critic's heads on the states before each completion token and after the last one (float32):
  values_bt [B, T], bootstrap_b [B] (V after the last slot: what GAE bootstraps a row cut at max_new_tokens
  from), and with a cost head cost_values_bt / cost_bootstrap_b."""
  h_bsd = models.hidden_states(cfg, params["backbone"], tokens_bs, attention_mask_bt=mask_bs)
  s = tokens_bs.shape[1]
  h_btd = h_bsd[:, s - num_completion - 1:]
  out = {}
  for name, prefix in (("head", ""), ("cost_head", "cost_")):
    if name in params:
      v_bt = heads.apply_head(heads.ValueHead(), params[name], h_btd)
      out[prefix + "values_bt"], out[prefix + "bootstrap_b"] = v_bt[:, :-1], v_bt[:, -1]
  return out


def critic_config(cfg: models.ModelConfig) -> models.ModelConfig:
  """The critic's backbone: the model without its unembedding (a value head reads the hidden states), so the
  critic and its optimizer state carry no [D, V] matrix. Its params are `critic_backbone(decoder params)`."""
  return cfg.replace(tie_word_embeddings=True)


def critic_backbone(params: Any) -> Any:
  return {k: v for k, v in params.items() if k != "lm_head"}


def init_critic(cfg: models.ModelConfig, backbone: Any, rng: jax.Array, *, mesh=None,
                cost_head: bool = False) -> dict[str, Any]:
  """Zero-initialised value head(s) on `backbone` (decoder params of `critic_config(cfg)`): "head" for the
  reward, and "cost_head" for a PPO-Lagrangian's cost (a second head, not a second model)."""
  out = {"backbone": critic_backbone(backbone),
         "head": heads.init_head(heads.ValueHead(), rng, embed_dim=cfg.hidden_size, mesh=mesh)}
  if cost_head:
    out["cost_head"] = heads.init_head(heads.ValueHead(), rng, embed_dim=cfg.hidden_size, mesh=mesh)
  return out


def critic_shapes(cfg: models.ModelConfig, *, cost_head: bool = False) -> dict[str, Any]:
  """ShapeDtypeStructs of the critic's params (backbone + value head(s))."""
  head = jax.eval_shape(lambda r: heads.init_head(heads.ValueHead(), r, embed_dim=cfg.hidden_size),
                        jax.random.key(0))
  out = {"backbone": models.param_shapes(cfg), "head": head}
  return {**out, "cost_head": head} if cost_head else out


def critic_shardings(cfg: models.ModelConfig, mesh, *, cost_head: bool = False) -> dict[str, Any]:
  head = heads.head_shardings(heads.ValueHead(), embed_dim=cfg.hidden_size, mesh=mesh)
  out = {"backbone": models.param_shardings(cfg, mesh), "head": head}
  return {**out, "cost_head": head} if cost_head else out


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
  """(policy, reference, critic, rollout) -> dict of old_logp_bt, ref_logp_bt, entropy_bt, values_bt,
  bootstrap_b (and cost_values_bt, cost_bootstrap_b with a cost head); zeros for the values without a critic.

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
      values = critic_values(critic_cfg, critic, rollout.tokens_bs, rollout.mask_bs,
                             num_completion=num_completion)
      out.update({k: v * m_bt if k.endswith("_bt") else v for k, v in values.items()})
    else:
      out.update(values_bt=jnp.zeros_like(logp_bt), bootstrap_b=jnp.zeros_like(logp_bt[:, 0]))
    return out

  def score(policy, reference, critic, rollout: Rollout):
    if num_chunks == 1:
      return one(policy, reference, critic, rollout)
    chunks = jax.tree.map(lambda x: microbatches(x, num_chunks), rollout)
    out = jax.lax.map(lambda r: one(policy, reference, critic, r), chunks)
    return _constrain_rows(jax.tree.map(unmicrobatch, out))
  return score


def advantage_fn(ppo: PPOConfig) -> Callable:
  """(inputs) -> outputs, both dicts of [B, T] / [B] arrays and scalars.

  inputs: mask_bt, old_logp_bt, ref_logp_bt, sampler_logp_bt, values_bt, bootstrap_b, finished_b, kl_coef,
    and the rewards: rewards_bt (dense), or sequence_b [B] + token_bt [B, T] (split: token-level GRPO /
    RLOO keep token terms on their tokens); with a Lagrangian also cost_bt, cost_values_bt, cost_bootstrap_b,
    lam.
  The KL penalty (kl_mode "reward") is a token term: r_t -= kl_coef * KL_t. Rows that did not finish
  bootstrap from the critic's value after their last token (GAE).
  PPO-Lagrangian (Safe RLHF): A = (A_r - lam * A_c) / (1 + lam), A_c the same estimator on the cost.
  Truncated IS (tis_cap): A_t *= min(exp(old_logp_t - sampler_logp_t), tis_cap), a stop-gradient weight per
  token, so the clipped surrogate's gradient is that of the sampler's distribution reweighted to pi_old.
  outputs: advantages_bt, returns_bt, rewards_bt (the final per-token rewards, logged), kl_bt, and with a
  Lagrangian cost_returns_bt; plus scalar diagnostics of the sampler / trainer log-prob mismatch."""
  def step(x: dict[str, jax.Array]) -> dict[str, jax.Array]:
    m_bt = x["mask_bt"].astype(jnp.float32)
    kl_bt = token_kl(x["old_logp_bt"], x["ref_logp_bt"], kind=ppo.kl_kind, kl_clamp=ppo.kl_clamp) * m_bt
    kl_r_bt = x["kl_coef"] * kl_bt if ppo.kl_mode == "reward" else jnp.zeros_like(kl_bt)
    critic = dict(values_bt=x["values_bt"] if ppo.uses_critic else None, finished_b=x["finished_b"],
                  bootstrap_values_b=x["bootstrap_b"])
    if "sequence_b" in x:
      token_bt = (x["token_bt"] - kl_r_bt) * m_bt
      adv_bt, ret_bt = compute_advantages(ppo.advantage, mask_bt=m_bt, sequence_rewards_b=x["sequence_b"],
                                          token_rewards_bt=token_bt, **critic)
      rewards_bt = token_bt + place_at_last_valid(x["sequence_b"], m_bt)
    else:
      rewards_bt = (x["rewards_bt"].astype(jnp.float32) - kl_r_bt) * m_bt
      adv_bt, ret_bt = compute_advantages(ppo.advantage, rewards_bt=rewards_bt, mask_bt=m_bt, **critic)
    out = {"rewards_bt": rewards_bt, "kl_bt": kl_bt}
    if ppo.lagrangian is not None:
      lam = x["lam"]
      cost_adv_bt, cost_ret_bt = compute_advantages(
          ppo.advantage, rewards_bt=x["cost_bt"] * m_bt, mask_bt=m_bt,
          values_bt=x["cost_values_bt"] if ppo.uses_critic else None, finished_b=x["finished_b"],
          bootstrap_values_b=x["cost_bootstrap_b"])
      adv_bt = (adv_bt - lam * cost_adv_bt) / (1.0 + lam)
      out["cost_returns_bt"] = cost_ret_bt * m_bt
    n = jnp.maximum(m_bt.sum(), 1.0)
    diff_bt = (x["sampler_logp_bt"] - x["old_logp_bt"]) * m_bt  # log q_sampler - log pi_old, on q's samples
    out["logprob_abs_diff"] = jnp.abs(diff_bt).sum() / n
    out["logprob_kl"] = diff_bt.sum() / n  # KL(q || pi_old) estimated from the sampler's own draws
    if ppo.tis_cap is not None:
      raw_bt = jnp.exp(jnp.clip(-diff_bt, -30.0, 30.0))
      w_bt = jnp.minimum(raw_bt, ppo.tis_cap)
      adv_bt = adv_bt * jax.lax.stop_gradient(w_bt)
      out["tis_weight_mean"] = (w_bt * m_bt).sum() / n
      out["tis_clipped_frac"] = ((raw_bt > ppo.tis_cap) * m_bt).sum() / n
    out["advantages_bt"], out["returns_bt"] = adv_bt * m_bt, ret_bt * m_bt
    return out
  return step


def update_fn(policy_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None, ppo: PPOConfig,
              policy_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation | None,
              *, num_completion: int, grad_shardings: Any = None) -> Callable:
  """(state, minibatch, kl_coef) -> (state, metrics). Gradients accumulate over microbatches; losses are
  normalised by the minibatch's global token / sequence counts, so the sum over microbatches is the
  minibatch loss whatever the split or the data-parallel size. `grad_shardings` (a (policy, critic) pair of
  sharding trees) keeps the float32 gradient accumulators split like the params.

  Non-finite guard: a model whose summed loss or gradient norm is not finite keeps its params and optimizer
  state (metrics nonfinite/policy, nonfinite/critic are 1 then; the trainer skips the step's controllers
  and stops after several such steps in a row). The policy is updated before the critic's gradients exist
  (memory), so a non-finite critic does not undo a finite policy update of the same minibatch."""
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
    values = critic_values(critic_cfg, params, mb.tokens_bs, mb.mask_bs, **kw)
    loss, metrics = ppo.value_loss(values_bt=values["values_bt"], old_values_bt=mb.old_values_bt,
                                   returns_bt=mb.returns_bt, mask_bt=mb.completion_mask_bt, **counts)
    if "cost_values_bt" in values:  # the PPO-Lagrangian's cost head, same loss on the cost's GAE targets
      cost_loss, cost_metrics = ppo.value_loss(values_bt=values["cost_values_bt"],
                                               old_values_bt=mb.old_cost_values_bt, returns_bt=mb.cost_returns_bt,
                                               mask_bt=mb.completion_mask_bt, **counts)
      metrics = {**metrics, **{f"cost_{k}": v for k, v in cost_metrics.items()}}
      loss = loss + cost_loss
    return loss, metrics

  def split_like_params(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

  def zeros(tree, shardings):
    return split_like_params(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree), shardings)

  def accumulate(loss_fn, params, shardings, micro, *args):
    """Sum over micro-batches of loss_fn's gradients (and its additive metrics), split like the params, and
    whether the summed loss is finite."""
    def body(carry, one: ScoredRollout):
      g_acc, loss_acc = carry
      (loss, met), g = jax.value_and_grad(loss_fn, has_aux=True)(params, _constrain_rows(one), *args)
      # The barrier keeps XLA from moving the gradients' reduce-scatters out of the loop (one collective at
      # the end, but whole-size accumulators); the constraint keeps the accumulators split like the params.
      g = jax.lax.optimization_barrier(g)
      return (split_like_params(jax.tree.map(jnp.add, g_acc, g), shardings), loss_acc + loss), met
    (g, loss), per_micro = jax.lax.scan(body, (zeros(params, shardings), jnp.float32(0.0)), micro)
    return g, jnp.isfinite(loss), per_micro

  def apply(tx, grads, loss_finite, opt_state, params, name, metrics):
    """The optimizer step, or no change when the loss or the gradients are not finite."""
    norm = optax.global_norm(grads)
    ok = loss_finite & jnp.isfinite(norm)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    metrics[f"grad_norm/{name}"] = norm
    metrics[f"nonfinite/{name}"] = 1.0 - ok.astype(jnp.float32)
    return keep(new_params, params), keep(new_opt, opt_state)

  def update(state: TrainState, mb: ScoredRollout, kl_coef):
    mask = mb.completion_mask_bt.astype(jnp.float32)
    counts = {"num_tokens": jnp.maximum(mask.sum(), 1.0), "num_seqs": jnp.maximum((mask.sum(1) > 0).sum(), 1)}
    micro = jax.tree.map(lambda x: microbatches(x, ppo.num_microbatches), mb)
    pol_sh, cri_sh = grad_shardings if grad_shardings is not None else (None, None)
    # policy, then critic: each model's gradients are summed and applied before the other's are computed, so
    # only one model's float32 gradient trees are alive at a time
    g_pol, pol_finite, per_micro = accumulate(policy_loss, state.policy, pol_sh, micro, counts, kl_coef)
    # every metric is normalised by the minibatch's global counts: the sum over microbatches is its value
    metrics = jax.tree.map(lambda x: x.sum(0), per_micro)
    policy, policy_opt = apply(policy_tx, g_pol, pol_finite, state.policy_opt, state.policy, "policy", metrics)
    critic, critic_opt = state.critic, state.critic_opt
    if critic is not None:
      # the critic's pass starts once the policy's update is done (a data dependence through the barrier)
      policy, policy_opt, critic, micro = jax.lax.optimization_barrier((policy, policy_opt, critic, micro))
      g_cri, cri_finite, per_micro_v = accumulate(value_loss, critic, cri_sh, micro, counts)
      metrics.update({k: v.sum(0) for k, v in per_micro_v.items() if "explained_variance" not in k})  # not additive
      critic, critic_opt = apply(critic_tx, g_cri, cri_finite, critic_opt, critic, "critic", metrics)
    new = state.replace(policy=policy, policy_opt=policy_opt, critic=critic, critic_opt=critic_opt)
    return new, metrics

  return update


def rollout_metrics(scored: dict[str, jax.Array], returns_bt: jax.Array, mask_bt: jax.Array) -> dict[str, Any]:
  m = mask_bt.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return {"entropy": (scored["entropy_bt"] * m).sum() / n,
          "explained_variance": explained_variance(scored["values_bt"], returns_bt, m)}
