"""The compiled programs of a PPO run and the shardings of its state: one builder for the trainer and the
`plan` job, so what the plan compiles for a target is exactly what the trainer runs.

Every piece of state is born sharded: the train state (policy, critic, both optimizer states with their
moments split like the params) comes out of one jitted init with `out_shardings`; the frozen reference is
the initial policy cast to the compute dtype, on the params' shardings.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cotsafe_jax import models
from cotsafe_jax.parallel import mesh as mesh_lib
from cotsafe_jax.rl import controllers, ppo as ppo_lib
from cotsafe_jax.rollout import decode, sampler
from cotsafe_jax.train.optim import cast_floating, opt_state_shardings
from cotsafe_jax.types import Rollout, ScoredRollout, TrainState


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
  """How rollouts are drawn (RolloutConfig's sampling fields)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  cache_phases: int | None = None
  compactions: int | None = None
  gathered_weights: bool = True
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0


class PPOPrograms:
  """Shardings and jitted programs of one PPO run: `rows` rollout rows of `prompt_len` + `completion_len`.

  Programs (each callable, and `.lower(*abstract_args[name])` for ahead-of-time compilation):
  init_state, reference, decode_params (the policy laid out for sampling, once per rollout), generate, score,
  advantage, update.
  """

  def __init__(self, *, policy_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None,
               ppo: ppo_lib.PPOConfig, policy_tx: optax.GradientTransformation,
               critic_tx: optax.GradientTransformation | None, mesh: Mesh, rows: int, prompt_len: int,
               completion_len: int, sampling: Sampling):
    critic_cfg = ppo_lib.critic_config(critic_cfg) if critic_cfg is not None else None
    self.policy_cfg, self.critic_cfg, self.ppo, self.mesh = policy_cfg, critic_cfg, ppo, mesh
    self.rows, self.prompt_len, self.completion_len = rows, prompt_len, completion_len
    self.minibatch_rows = rows // ppo.num_minibatches
    rep = mesh_lib.replicated(mesh)
    self.replicated = rep
    policy_sh = models.param_shardings(policy_cfg, mesh)
    self.cost_head = ppo.lagrangian is not None and critic_cfg is not None
    critic_sh = (ppo_lib.critic_shardings(critic_cfg, mesh, cost_head=self.cost_head)
                 if critic_cfg is not None else None)
    self._policy_tx, self._critic_tx = policy_tx, critic_tx
    self._kl0 = controllers.init_kl_controller(ppo.adaptive_kl) if ppo.adaptive_kl else None
    self._lag0 = controllers.init_lagrangian(ppo.lagrangian) if ppo.lagrangian else None
    self.state_shardings = TrainState(
        step=rep, policy=policy_sh,
        policy_opt=opt_state_shardings(policy_tx, models.param_shapes(policy_cfg), policy_sh, rep),
        critic=critic_sh,
        critic_opt=(opt_state_shardings(critic_tx, ppo_lib.critic_shapes(critic_cfg, cost_head=self.cost_head),
                                        critic_sh, rep)
                    if critic_cfg is not None else None),
        rng=rep, kl=jax.tree.map(lambda _: rep, self._kl0), lagrangian=jax.tree.map(lambda _: rep, self._lag0))
    self.reference_shardings = policy_sh
    bt = lambda n: mesh_lib.batch_sharding(mesh, 2, (rows, n))  # noqa: E731
    s, t = prompt_len + completion_len, completion_len
    self.rollout_shardings = Rollout(tokens_bs=bt(s), mask_bs=bt(s), completion_mask_bt=bt(t))
    cost = (bt(t), bt(t)) if ppo.lagrangian is not None else (None, None)
    self.scored_shardings = ScoredRollout(bt(s), bt(s), *(bt(t),) * 6, *cost)
    self.bt_sharding = bt(t)
    self.b_sharding = mesh_lib.batch_sharding(mesh, 1, (rows,))
    on = lambda fn: mesh_lib.OnMesh(fn, mesh)  # noqa: E731

    self.init_state = on(jax.jit(self._init_state, out_shardings=self.state_shardings, donate_argnums=(0, 1)))
    compute = policy_cfg.dtype
    self.reference = on(jax.jit(lambda p: cast_floating(p, dtype=compute), out_shardings=policy_sh))
    self.decode_params = decode.decode_params_program(policy_cfg, mesh, sampling.gathered_weights)
    self._gathered = sampling.gathered_weights
    self.generate = sampler.generate_program(
        policy_cfg, mesh, batch=rows, prompt_len=prompt_len, max_new_tokens=completion_len,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        eos_ids=sampling.eos_ids, pad_id=sampling.pad_id, cache_phases=sampling.cache_phases,
        compactions=sampling.compactions, gathered_weights=sampling.gathered_weights)
    score = ppo_lib.score_fn(policy_cfg, critic_cfg, ppo, num_completion=t, num_chunks=ppo.score_chunks)
    # outputs: [B, T] and [B] arrays split over the batch (the score's last constraint)
    self.score = on(jax.jit(score, in_shardings=(policy_sh, policy_sh, critic_sh, self.rollout_shardings)))
    self.advantage = on(jax.jit(ppo_lib.advantage_fn(ppo)))
    update = ppo_lib.update_fn(policy_cfg, critic_cfg, ppo, policy_tx, critic_tx, num_completion=t,
                               grad_shardings=(policy_sh, critic_sh))
    mb = jax.tree.map(lambda sh: mesh_lib.batch_sharding(mesh, 2, (self.minibatch_rows, 1)), self.scored_shardings)
    self.minibatch_shardings = mb
    self.update = on(jax.jit(update, in_shardings=(self.state_shardings, mb, rep),
                             out_shardings=(self.state_shardings, rep), donate_argnums=(0,)))
    self.take_rows = on(jax.jit(lambda d, idx: jax.tree.map(lambda x: x[idx], d), out_shardings=mb))

  def _init_state(self, policy: Any, critic_backbone: Any, seed: jax.Array) -> TrainState:
    rng = jax.random.PRNGKey(seed)
    critic = critic_opt = None
    if self.critic_cfg is not None:
      backbone = policy if critic_backbone is None else critic_backbone
      critic = ppo_lib.init_critic(self.critic_cfg, backbone, jax.random.fold_in(rng, 1), cost_head=self.cost_head)
      critic_opt = self._critic_tx.init(critic)
    return TrainState(step=jnp.zeros((), jnp.int32), policy=policy, policy_opt=self._policy_tx.init(policy),
                      critic=critic, critic_opt=critic_opt, rng=rng, kl=self._kl0, lagrangian=self._lag0)

  # ---- abstract arguments: what the plan compiles with (nothing materialised) ----
  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._init_state, models.param_shapes(self.policy_cfg), None, jnp.int32(0))
    return _with_shardings(shapes, self.state_shardings)

  def abstract_reference(self) -> Any:
    shapes = jax.eval_shape(lambda p: cast_floating(p, dtype=self.policy_cfg.dtype),
                            models.param_shapes(self.policy_cfg))
    return _with_shardings(shapes, self.reference_shardings)

  def abstract_args(self) -> dict[str, tuple]:
    """name -> the abstract arguments each program is called with in one PPO step."""
    state, ref = self.abstract_state(), self.abstract_reference()
    rows, p, t = self.rows, self.prompt_len, self.completion_len
    sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    prompt_sh = mesh_lib.batch_sharding(self.mesh, 2, (rows, p))
    rollout = Rollout(tokens_bs=sds((rows, p + t), jnp.int32, self.rollout_shardings.tokens_bs),
                      mask_bs=sds((rows, p + t), jnp.bool_, self.rollout_shardings.mask_bs),
                      completion_mask_bt=sds((rows, t), jnp.bool_, self.bt_sharding))
    mbr = self.minibatch_rows
    mb_sh = self.minibatch_shardings
    minibatch = jax.tree.map(lambda sh, like: sds((mbr,) + like.shape[1:], like.dtype, sh), mb_sh,
                             self._scored_like(rows, p, t))
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    layout = decode.abstract_decode_params(self.policy_cfg, self.mesh, gathered=self._gathered)
    return {
        "decode_params": (state.policy,),
        "generate": (layout, sds((rows, p), jnp.int32, prompt_sh), sds((rows, p), jnp.bool_, prompt_sh),
                     sds(key.shape, key.dtype, self.replicated)),
        "score": (state.policy, ref, state.critic, rollout),
        "advantage": (self.advantage_inputs(split=True),),
        "update": (state, minibatch, sds((), jnp.float32, self.replicated)),
    }

  def _scored_like(self, rows: int, p: int, t: int) -> ScoredRollout:
    f = lambda: jax.ShapeDtypeStruct((rows, t), jnp.float32)  # noqa: E731
    cost = (f(), f()) if self.ppo.lagrangian is not None else (None, None)
    return ScoredRollout(jax.ShapeDtypeStruct((rows, p + t), jnp.int32),
                         jax.ShapeDtypeStruct((rows, p + t), jnp.bool_), jax.ShapeDtypeStruct((rows, t), jnp.bool_),
                         f(), f(), f(), f(), f(), *cost)

  def advantage_inputs(self, *, split: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The advantage step's abstract inputs (split: sequence + token rewards, else dense rewards_bt)."""
    rows, t = self.rows, self.completion_len
    bt = lambda dtype=jnp.float32: jax.ShapeDtypeStruct((rows, t), dtype, sharding=self.bt_sharding)  # noqa
    b = lambda dtype=jnp.float32: jax.ShapeDtypeStruct((rows,), dtype, sharding=self.b_sharding)  # noqa
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
    x = {"mask_bt": bt(jnp.bool_), "old_logp_bt": bt(), "ref_logp_bt": bt(), "sampler_logp_bt": bt(),
         "values_bt": bt(), "bootstrap_b": b(), "finished_b": b(jnp.bool_), "kl_coef": scalar}
    x.update({"sequence_b": b(), "token_bt": bt()} if split else {"rewards_bt": bt()})
    if self.ppo.lagrangian is not None:
      x.update(cost_bt=bt(), cost_values_bt=bt(), cost_bootstrap_b=b(), lam=scalar)
    return x


def _with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def check_batch_sizes(*, rows: int, ppo: ppo_lib.PPOConfig, mesh: Mesh, where: str = "batch") -> None:
  """Every split of the rollout rows must divide: minibatches, microbatches, score chunks, and each over the
  data x fsdp devices. Errors name the numbers."""
  from cotsafe_jax.errors import CotsafeError
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % ppo.num_minibatches:
    raise CotsafeError(f"{where}: {rows} rows per step do not divide into num_minibatches={ppo.num_minibatches}")
  mb = rows // ppo.num_minibatches
  if mb % ppo.num_microbatches:
    raise CotsafeError(f"{where}: minibatch of {mb} rows does not divide into num_microbatches="
                       f"{ppo.num_microbatches}")
  if (mb // ppo.num_microbatches) % shards or rows % shards:
    raise CotsafeError(f"{where}: microbatch of {mb // ppo.num_microbatches} rows (of {rows} per step) does not "
                       f"divide over the {shards} data x fsdp devices of the mesh {dict(mesh.shape)}")
  chunks = ppo.score_chunks
  if rows % chunks or (rows // chunks) % shards:
    raise CotsafeError(f"{where}: {rows} rows in score_microbatches={chunks} chunks do not divide over the "
                       f"{shards} data x fsdp devices of the mesh {dict(mesh.shape)}")


def tree_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays (abstract or concrete): the sum of its shards."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
