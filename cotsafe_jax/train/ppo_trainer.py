"""The PPO loop: data -> rollout -> score -> rewards -> advantages -> updates -> log -> checkpoint.

Policy, frozen reference (the initial params), critic (GAE only) and reward run sharded over one mesh.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax import models, parallel, rollout as rollout_lib
from cotsafe_jax.data import mixture as mixture_lib
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards.base import RewardBatch, RewardFn
from cotsafe_jax.rl import controllers, ppo as ppo_lib
from cotsafe_jax.train import guard as guard_lib, ppo_programs
from cotsafe_jax.train.checkpointing import Checkpointer
from cotsafe_jax.train.logging import MetricLogger
from cotsafe_jax.train.optim import make_optimizer
from cotsafe_jax.types import Rollout, ScoredRollout


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySpec:
  """Where the policy comes from: a local HF dir, or a random init of `config` (smoke runs).
  remat: what each layer keeps for the backward pass of the policy and critic updates
  (models.REMAT_POLICIES: "none", "full", "save_dots"; None: the config's)."""
  hf_dir: str | None = None
  config: models.ModelConfig | None = None
  tokenizer_dir: str | None = None
  param_dtype: str = "float32"
  compute_dtype: str | None = None  # e.g. "bfloat16": bf16 compute over float32 master params
  remat: str | None = None
  seed: int = 0

  def __post_init__(self):
    if (self.hf_dir is None) == (self.config is None):
      raise CotsafeError("PolicySpec: set exactly one of hf_dir (a local HF checkpoint) or config")
    if self.remat is not None and self.remat not in models.REMAT_POLICIES:
      raise CotsafeError(f"PolicySpec.remat={self.remat!r}, expected one of {', '.join(models.REMAT_POLICIES)} "
                         "(or None: the model config's)")

  def model_config(self) -> models.ModelConfig:
    """The policy's architecture with this spec's dtypes and remat (config.json only: no weights read)."""
    cfg = self.config if self.config is not None else models.ModelConfig.from_hf(self.hf_dir)
    compute = jnp.dtype(self.compute_dtype or self.param_dtype)
    return cfg.replace(param_dtype=jnp.dtype(self.param_dtype), dtype=compute,
                       remat=self.remat if self.remat is not None else cfg.remat)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """Sampling during training. Prompts longer than max_prompt_len are cut from the left
  (truncate="left") or rejected (truncate="error"). cache_phases: decode loops, each over the KV cache filled by
  its end (`rollout.generate`; None: one per 64 new tokens, at most 4). compactions: how many times the decode may
  halve its batch once most of each chip's rows have stopped (None: up to 2 on TPU / GPU, none on CPU).
  gathered_weights: the sampler holds the policy whole on data x fsdp in the compute dtype for the rollout (False:
  split like the params, gathered layer by layer every decode step, for chips that cannot hold the copy)."""
  max_prompt_len: int = 128
  max_new_tokens: int = 256
  samples_per_prompt: int = 1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  truncate: str = "left"
  cache_phases: int | None = None
  compactions: int | None = None
  gathered_weights: bool = True

  def __post_init__(self):
    if self.truncate not in ("left", "error"):
      raise CotsafeError(f"RolloutConfig.truncate={self.truncate!r}, expected 'left' or 'error'")
    if self.samples_per_prompt < 1 or self.max_prompt_len < 1 or self.max_new_tokens < 1:
      raise CotsafeError("RolloutConfig: samples_per_prompt, max_prompt_len and max_new_tokens must be >= 1")
    if self.cache_phases is not None and self.cache_phases < 1:
      raise CotsafeError(f"RolloutConfig.cache_phases={self.cache_phases} (expected >= 1, or None for automatic)")
    if self.compactions is not None and self.compactions < 0:
      raise CotsafeError(f"RolloutConfig.compactions={self.compactions} (expected >= 0, or None for automatic)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  learning_rate: float = 1e-6
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  min_lr_ratio: float = 0.0

  def make(self, total_steps: int):
    return make_optimizer(learning_rate=self.learning_rate, schedule=self.schedule,
                          warmup_steps=self.warmup_steps, total_steps=max(total_steps, 1),
                          weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps,
                          max_grad_norm=self.max_grad_norm, min_lr_ratio=self.min_lr_ratio)


class _StopFlag:
  """SIGTERM / SIGINT ask the loop to finish the current step, checkpoint and return."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers
        pass
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def load_policy(spec: PolicySpec, mesh) -> tuple[models.ModelConfig, Any, Any]:
  """(config, params born sharded on `mesh`, tokenizer)."""
  if spec.tokenizer_dir is None and spec.hf_dir is None:
    raise CotsafeError("PolicySpec: a random-init policy (PolicySpec.config) needs PolicySpec.tokenizer_dir")
  cfg = spec.model_config()
  if spec.hf_dir is not None:
    loaded, params = models.load_hf(spec.hf_dir, dtype=cfg.param_dtype, mesh=mesh, compute_dtype=cfg.dtype)
    cfg = loaded.replace(remat=cfg.remat)
  else:
    params = models.init_params(cfg, jax.random.PRNGKey(spec.seed), mesh=mesh)
  tok = models.load_tokenizer(spec.tokenizer_dir or spec.hf_dir, model_vocab_size=cfg.vocab_size)
  return cfg, params, tok


def stop_ids(tokenizer: Any, cfg: models.ModelConfig) -> tuple[int, ...]:
  ids = set()
  for x in (tokenizer.eos_token_id, cfg.eos_token_id):
    if isinstance(x, int):
      ids.add(x)
    elif isinstance(x, (tuple, list)):
      ids.update(int(i) for i in x)
  return tuple(sorted(ids))


def encode_prompts(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, max_prompt_len: int,
                   truncate: str, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Chat-template + tokenize, left-pad to max_prompt_len. Returns (tokens_bp, mask_bp, num_truncated)."""
  tokens = np.full((len(rows), max_prompt_len), pad_id, np.int32)
  mask = np.zeros((len(rows), max_prompt_len), bool)
  truncated = 0
  for i, row in enumerate(rows):
    text = models.apply_chat_template(tokenizer, row.get("messages") or row["prompt"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_len:
      if truncate == "error":
        where = row.get("id", f"row {i}")
        raise CotsafeError(f"prompt {where}: {len(ids)} tokens > max_prompt_len={max_prompt_len} "
                           "(raise RolloutConfig.max_prompt_len or set truncate='left')")
      ids = ids[-max_prompt_len:]
      truncated += 1
    tokens[i, max_prompt_len - len(ids):] = ids
    mask[i, max_prompt_len - len(ids):] = True
  return tokens, mask, truncated


def check_batch_sizes(*, prompts_per_step: int, samples_per_prompt: int, ppo: ppo_lib.PPOConfig, mesh) -> int:
  """Rows per step; every split must divide: devices, minibatches, microbatches. Errors name the numbers."""
  rows = prompts_per_step * samples_per_prompt
  if rows % ppo.num_minibatches:
    raise CotsafeError(f"batch: {prompts_per_step} prompts x {samples_per_prompt} samples = {rows} rows do not "
                       f"divide into num_minibatches={ppo.num_minibatches}")
  ppo_programs.check_batch_sizes(rows=rows, ppo=ppo, mesh=mesh)
  if ppo.advantage.estimator in ("grpo", "rloo") and ppo.advantage.group_size != samples_per_prompt:
    raise CotsafeError(f"PPO: advantage.group_size={ppo.advantage.group_size} must equal "
                       f"samples_per_prompt={samples_per_prompt} for {ppo.advantage.estimator}")
  return rows


def _user_text(row: Mapping[str, Any]) -> str:
  """The raw user turn (what a guard judges), not the chat-templated prompt."""
  if row.get("messages"):
    users = [m["content"] for m in row["messages"] if m.get("role") == "user"]
    return users[-1] if users else row["messages"][-1]["content"]
  return row["prompt"]


def _host(x) -> np.ndarray:
  return parallel.to_host(x)  # all-gathered when the array's shards live on several processes


def train(*, workdir: str, policy: PolicySpec, reward: RewardFn, prompts: Any, ppo: ppo_lib.PPOConfig,
          rollout: RolloutConfig, optim: OptimConfig, num_steps: int, prompts_per_step: int,
          critic_optim: OptimConfig | None = None, critic_hf_dir: str | None = None,
          mixture: Mapping[str, float] | None = None, prompt_columns: Any = None, on_bad_row: str = "raise",
          mesh: Any = None, seed: int = 0, save_interval_steps: int = 50, max_to_keep: int | None = 2,
          async_checkpoint: bool = True, samples_every: int = 10, num_logged_samples: int = 4,
          export_hf: bool = True, step_callback: Any = None, max_nonfinite_steps: int = 3) -> dict[str, Any]:
  """Run PPO for `num_steps` iterations (resuming from workdir/checkpoints when present).

  Returns {"metrics": last step's metrics, "history": per-step metrics, "hf_dir": the exported policy}.
  step_callback(step, policy_cfg, params, tokenizer) -> dict of extra metrics, called after each step.
  A step whose losses or gradients are not finite changes no params, optimizer state or controller (counted
  in guard/*, its prompt ids logged); `max_nonfinite_steps` such steps in a row stop the run with an error
  (the last checkpoint is the last good state).
  """
  if rollout.temperature != ppo.temperature:
    raise CotsafeError(f"PPO: RolloutConfig.temperature={rollout.temperature} but PPOConfig.temperature="
                       f"{ppo.temperature}: the trainer's log-probs must be of the distribution that sampled "
                       "(expected the same temperature in both)")
  mesh = mesh if mesh is not None else parallel.make_mesh()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  ppo = ppo.for_mesh(rows=prompts_per_step * rollout.samples_per_prompt, shards=shards)
  cfg, params, tok = load_policy(policy, mesh)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  eos = stop_ids(tok, cfg)
  rows_per_step = check_batch_sizes(prompts_per_step=prompts_per_step, samples_per_prompt=rollout.samples_per_prompt,
                                    ppo=ppo, mesh=mesh)
  # prompts: one file, a list of data.Source (mixed by weight), or a data.TrainingData (e.g. decontaminated)
  loaded = mixture_lib.training_data(prompts, schema="prompts", columns=prompt_columns, on_bad_row=on_bad_row,
                                     seed=seed, job="ppo_train")
  # every process holds the whole batch of prompts (and so computes the rewards of the global batch) and places
  # its own devices' rows of it (parallel.global_array)
  data_it = loaded.make_pipeline(batch_size=prompts_per_step, seed=seed, mixture=mixture, process_index=0,
                                 process_count=1)

  critic_cfg = backbone = None
  if ppo.uses_critic:
    critic_cfg = cfg
    if critic_hf_dir:
      critic_cfg, backbone = models.load_hf(critic_hf_dir, dtype=cfg.param_dtype, mesh=mesh,
                                            compute_dtype=cfg.dtype)
      critic_cfg = critic_cfg.replace(remat=cfg.remat)
  updates_per_step = ppo.epochs * ppo.num_minibatches
  policy_tx = optim.make(num_steps * updates_per_step)
  critic_tx = (critic_optim or optim).make(num_steps * updates_per_step) if critic_cfg is not None else None
  t = rollout.max_new_tokens
  programs = ppo_programs.PPOPrograms(
      policy_cfg=cfg, critic_cfg=critic_cfg, ppo=ppo, policy_tx=policy_tx, critic_tx=critic_tx, mesh=mesh,
      rows=rows_per_step, prompt_len=rollout.max_prompt_len, completion_len=t,
      sampling=ppo_programs.Sampling(temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                                     cache_phases=rollout.cache_phases, compactions=rollout.compactions,
                                     gathered_weights=rollout.gathered_weights, eos_ids=eos, pad_id=pad_id))
  # frozen initial policy, in the compute dtype; then the train state, born sharded (the params are donated to it)
  reference = programs.reference(params)
  state = programs.init_state(params, backbone, jnp.int32(seed))
  del params, backbone
  replicated = programs.replicated

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=save_interval_steps,
                      max_to_keep=max_to_keep, async_save=async_checkpoint)
  start = ckpt.latest_step()
  extra: dict[str, Any] = {}
  if start is not None:
    state, data_state, extra = ckpt.restore(start, state)
    data_it.set_state(data_state)
  start = start or 0
  bt_sharding = parallel.batch_sharding(mesh, 2)
  b_sharding = parallel.batch_sharding(mesh, 1)
  score_step, advantage_step, update_step = programs.score, programs.advantage, programs.update
  guard = guard_lib.StepGuard(workdir, job="ppo_train", max_nonfinite_steps=max_nonfinite_steps)
  guard.restore(extra.get("guard"))

  def save_extra():
    return {"num_truncated": num_truncated, "guard": guard.state()}
  take_rows = programs.take_rows

  logger = MetricLogger(workdir, total_steps=num_steps, resume_step=start if start else None,
                        postfix_keys=("reward/mean", "kl/mean"), desc="ppo")
  history: list[dict[str, float]] = []
  num_truncated = int(extra.get("num_truncated", 0))
  with _StopFlag() as stop, logger:
    step, stopped = start, False
    while step < num_steps and not stopped:
      rows = next(data_it)
      with logger.phase("rollout"):
        prompt_bp, pmask_bp, n_trunc = encode_prompts(tok, rows, max_prompt_len=rollout.max_prompt_len,
                                                      truncate=rollout.truncate, pad_id=pad_id)
        num_truncated += n_trunc
        n = rollout.samples_per_prompt
        prompt_bp, pmask_bp = np.repeat(prompt_bp, n, axis=0), np.repeat(pmask_bp, n, axis=0)
        rows_b = [r for r in rows for _ in range(n)]
        rng, gen_rng, perm_rng = jax.random.split(state.rng, 3)
        state = state.replace(rng=jax.device_put(rng, replicated))
        # the policy laid out for sampling once per rollout (compute dtype, whole on data x fsdp), freed after it
        gen = rollout_lib.generate(cfg, programs.decode_params(state.policy),
                                   parallel.global_array(prompt_bp, bt_sharding),
                                   parallel.global_array(pmask_bp, bt_sharding), rng=gen_rng, max_new_tokens=t,
                                   temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                                   eos_ids=eos, pad_id=pad_id, buckets=(rollout.max_prompt_len,),
                                   cache_phases=rollout.cache_phases, compactions=rollout.compactions, mesh=mesh)
        comp_bt, cmask_bt, decoded_rows = _host(gen.tokens_bt), _host(gen.mask_bt), _host(gen.decoded_rows)
      with logger.phase("score"):
        batch = Rollout(tokens_bs=parallel.global_array(np.concatenate([prompt_bp, comp_bt], 1), bt_sharding),
                        mask_bs=parallel.global_array(np.concatenate([pmask_bp, cmask_bt], 1), bt_sharding),
                        completion_mask_bt=parallel.global_array(cmask_bt, bt_sharding))
        scored = score_step(state.policy, reference, state.critic, batch)
        finished_b = _host(gen.finished_b)
        rb = RewardBatch.from_tokens(tokenizer=tok, prompt_tokens_bp=prompt_bp, prompt_mask_bp=pmask_bp,
                                     completion_tokens_bt=comp_bt, completion_mask_bt=cmask_bt,
                                     kinds=[r.get("kind", "reasoning") for r in rows_b],
                                     references=[r.get("answer") for r in rows_b],
                                     prompts=[_user_text(r) for r in rows_b], finished_b=finished_b)
        rewards = reward(rb)
        kl_coef = float(state.kl.beta) if state.kl is not None else ppo.kl_coef
        put = lambda x: parallel.global_array(np.asarray(x), bt_sharding if np.ndim(x) == 2 else b_sharding)  # noqa
        x = {"mask_bt": batch.completion_mask_bt, "old_logp_bt": scored["old_logp_bt"],
             "ref_logp_bt": scored["ref_logp_bt"], "sampler_logp_bt": gen.logprobs_bt,
             "values_bt": scored["values_bt"], "bootstrap_b": scored["bootstrap_b"], "finished_b": put(finished_b),
             "kl_coef": jax.device_put(np.float32(kl_coef), replicated)}
        lagrangian = ppo.lagrangian is not None
        if lagrangian:
          if rewards.cost_bt is None or rewards.sequence_b is None:
            raise CotsafeError("PPOConfig.lagrangian needs a reward with a separate token cost "
                               "(CompositeReward with a token_safety scorer and token_cost=True)")
          # the cost is not in the reward: the token terms are the reward's own, the safety cost is apart
          x.update(cost_bt=put(rewards.cost_bt), cost_values_bt=scored.get("cost_values_bt", scored["values_bt"]),
                   cost_bootstrap_b=scored.get("cost_bootstrap_b", scored["bootstrap_b"]),
                   lam=jax.device_put(np.float32(state.lagrangian.lam), replicated))
        if rewards.sequence_b is not None:
          x.update(sequence_b=put(rewards.sequence_b), token_bt=put(rewards.token_bt))
        else:
          x["rewards_bt"] = put(rewards.values_bt)
        adv = advantage_step(x)
        data = ScoredRollout(tokens_bs=batch.tokens_bs, mask_bs=batch.mask_bs,
                             completion_mask_bt=batch.completion_mask_bt, old_logp_bt=scored["old_logp_bt"],
                             ref_logp_bt=scored["ref_logp_bt"], old_values_bt=scored["values_bt"],
                             advantages_bt=adv["advantages_bt"], returns_bt=adv["returns_bt"],
                             old_cost_values_bt=x.get("cost_values_bt") if lagrangian else None,
                             cost_returns_bt=adv.get("cost_returns_bt"))
        extra_m = ppo_lib.rollout_metrics(scored, adv["returns_bt"], batch.completion_mask_bt)
      with logger.phase("update"):
        update_metrics: list[dict[str, Any]] = []
        mb_size = rows_per_step // ppo.num_minibatches
        for epoch_rng in jax.random.split(perm_rng, ppo.epochs):
          perm = _host(jax.random.permutation(epoch_rng, rows_per_step))
          for k in range(ppo.num_minibatches):
            mb = take_rows(data, jnp.asarray(perm[k * mb_size:(k + 1) * mb_size]))
            state, m = update_step(state, mb, jnp.float32(kl_coef))
            update_metrics.append(m)
        update_metrics = jax.device_get(update_metrics)
      mask_f = cmask_bt.astype(np.float32)
      n_tok = max(float(mask_f.sum()), 1.0)
      kl_bt, r_bt = _host(adv["kl_bt"]), _host(adv["rewards_bt"])
      kl_mean = float(kl_bt.sum() / n_tok)
      reward_seq = _host(rewards.values_bt).sum(1)
      metrics: dict[str, Any] = {
          "reward/mean": float(reward_seq.mean()), "reward/std": float(reward_seq.std()),
          "reward/with_penalties_mean": float(r_bt.sum(1).mean()),
          "kl/mean": kl_mean, "kl/coef": kl_coef, "entropy/rollout": float(extra_m["entropy"]),
          "critic/explained_variance": float(extra_m["explained_variance"]) if state.critic is not None else 0.0,
          "response/length_mean": float(mask_f.sum(1).mean()),
          "response/finished_rate": float(finished_b.mean()),
          "data/prompts_truncated": float(num_truncated),
          "rollout/logprob_mismatch": float(adv["logprob_abs_diff"]),
          "rollout/logprob_kl": float(adv["logprob_kl"]),
          # the share of the decode loop's row-steps that produced a token (finished rows ride along until the
          # loop ends or compacts them away)
          "rollout/decode_utilisation": float((mask_f.sum() - len(rows_b)) / max(int(decoded_rows), 1)),
      }
      if ppo.tis_cap is not None:
        metrics["rollout/tis_weight_mean"] = float(adv["tis_weight_mean"])
        metrics["rollout/tis_clipped_frac"] = float(adv["tis_clipped_frac"])
      for name, comp in rewards.components.items():
        metrics[f"reward/{name}"] = float(_host(comp).reshape(len(rows_b), -1).sum(1).mean())
      for name, v in rewards.info.items():
        metrics[f"reward_info/{name}"] = float(v)
      for key in update_metrics[0]:
        metrics[f"update/{key}"] = float(np.mean([m[key] for m in update_metrics]))
      # non-finite guard: a skipped update changed nothing; the controllers do not move either
      bad = any(m.get(k, 0.0) > 0 for m in update_metrics for k in ("nonfinite/policy", "nonfinite/critic"))
      bad = bad or not np.isfinite(r_bt).all()
      metrics.update(guard.observe(step + 1, finite=not bad, loss=metrics.get("update/loss", float("nan")),
                                   row_ids=[r.get("id", f"row {i}") for i, r in enumerate(rows_b)]))
      if guard.must_stop:
        logger.write(step + 1, metrics)
        ckpt.close()  # a save in flight finishes: the last checkpoint is a good one
        raise guard.error(step + 1)
      new_kl, new_lag = state.kl, state.lagrangian
      if ppo.adaptive_kl is not None and not bad:
        new_kl = controllers.update_kl_controller(ppo.adaptive_kl, state.kl, n_steps=rows_per_step,
                                                  current_kl=float(kl_bt.sum(1).mean()))
      if ppo.lagrangian is not None:
        cost = float(controllers.batch_cost(ppo.lagrangian, _host(rewards.cost_bt), cmask_bt))
        if not bad:
          new_lag = controllers.update_lagrangian(ppo.lagrangian, state.lagrangian, cost=cost)
        metrics["lagrangian/lambda"] = float(state.lagrangian.lam)
        metrics["lagrangian/cost"] = cost
      state = state.replace(step=state.step + 1, kl=jax.device_put(new_kl, replicated),
                            lagrangian=jax.device_put(new_lag, replicated))
      step += 1
      logger.add_tokens(int(mask_f.sum()))
      if step_callback is not None:
        metrics.update(step_callback(step, cfg, state.policy, tok) or {})
      history.append(logger.write(step, metrics))
      if samples_every and (step % samples_every == 0 or step == num_steps):
        logger.write_samples(step, [
            {"prompt": rb.prompts[i], "kind": rb.kinds[i], "response": rb.completions[i],
             "reward": float(reward_seq[i])} for i in range(min(num_logged_samples, len(rows_b)))])
      stopped = parallel.any_process(stop.requested)  # a signal to any process stops all after this step
      ckpt.save(step, state, data=data_it.get_state(), extra=save_extra(), force=stopped or step == num_steps)
    if ckpt.latest_step() != step:  # a stop request may have come after this step's save call
      ckpt.save(step, state, data=data_it.get_state(), extra=save_extra(), force=True)
    ckpt.close()
  hf_dir = None
  if export_hf and step >= num_steps:
    hf_dir = models.save_hf(cfg, state.policy, os.path.join(workdir, "hf"), tokenizer=tok)
  return {"metrics": history[-1] if history else {}, "history": history, "hf_dir": hf_dir,
          "stopped_early": step < num_steps, "step": step}
