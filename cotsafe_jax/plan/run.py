"""The `plan` job: a PPO run (and its SFT warm start, safety RM and guard scoring) compiled for a target.

Builds the run's whole state abstractly (ShapeDtypeStructs on the target's shardings: nothing materialised),
lowers and compiles each program the trainer would call, prints a table and writes `plan.json`.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from cotsafe_jax import models, parallel, paths
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.plan import planner, targets
from cotsafe_jax.rewards import guard_judge, safety_rm
from cotsafe_jax.rl import ppo as ppo_lib
from cotsafe_jax.train import ppo_programs, sft_trainer
from cotsafe_jax.train.ppo_trainer import OptimConfig, PolicySpec, RolloutConfig

GIB = targets.GIB


def _config(x: models.ModelConfig | str, where: str) -> models.ModelConfig:
  if isinstance(x, models.ModelConfig):
    return x
  if isinstance(x, str):
    return models.ModelConfig.from_hf(x)
  raise CotsafeError(f"plan: {where}={x!r}, expected a ModelConfig (gin) or a path to a config.json / HF dir")


def plan(*, workdir: str, target: str, policy: PolicySpec, ppo: ppo_lib.PPOConfig, rollout: RolloutConfig,
         prompts_per_step: int, optim: OptimConfig, critic_optim: OptimConfig | None = None,
         critic_config: models.ModelConfig | str | None = None, make_mesh: Callable[..., Any] = parallel.make_mesh,
         safety_rm_config: models.ModelConfig | str | None = None, rm_batch_size: int = 16,
         rm_length_bucket: int = 64, rm_dtype: str = "bfloat16",
         guard_config: models.ModelConfig | str | None = None, guard_batch_size: int = 8,
         guard_max_len: int = 4096, guard_dtype: str = "bfloat16", sft: sft_trainer.SFTConfig | None = None,
         programs: Sequence[str] | None = None, reserve_fraction: float = 0.1,
         write: bool = True, verbose: bool = True) -> dict[str, Any]:
  """Compile the run's programs for `target` ('v5e-8', 'v5p-64', '8xH100', ...) and write workdir/plan.json.

  Raises a one-line CotsafeError after writing the plan when a program's peak exceeds the usable HBM
  (HBM less `reserve_fraction`).
  """
  names = tuple(programs) if programs is not None else planner.ALL_PROGRAMS
  unknown = sorted(set(names) - set(planner.ALL_PROGRAMS))
  if unknown:
    raise CotsafeError(f"plan: unknown programs {unknown}, expected some of {', '.join(planner.ALL_PROGRAMS)}")
  if not 0.0 <= reserve_fraction < 1.0:
    raise CotsafeError(f"plan: reserve_fraction={reserve_fraction}, expected a fraction in [0, 1)")
  tgt = targets.parse_target(target)
  mesh = make_mesh(devices=targets.devices(tgt))
  usable = int(tgt.hbm_bytes * (1.0 - reserve_fraction))
  cfg = policy.model_config()
  critic_cfg = None
  if ppo.uses_critic:
    critic_cfg = (_config(critic_config, "critic_config") if critic_config is not None else cfg)
    critic_cfg = critic_cfg.replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat)
  rows = prompts_per_step * rollout.samples_per_prompt
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  ppo = ppo.for_mesh(rows=rows, shards=shards)
  ppo_programs.check_batch_sizes(rows=rows, ppo=ppo, mesh=mesh, where=f"plan ({target})")
  steps = 1000  # the schedule's length changes no shape
  policy_tx = optim.make(steps)
  critic_tx = (critic_optim or optim).make(steps) if critic_cfg is not None else None
  eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id or 0,)
  progs = ppo_programs.PPOPrograms(
      policy_cfg=cfg, critic_cfg=critic_cfg, ppo=ppo, policy_tx=policy_tx, critic_tx=critic_tx, mesh=mesh,
      rows=rows, prompt_len=rollout.max_prompt_len, completion_len=rollout.max_new_tokens,
      sampling=ppo_programs.Sampling(temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                                     cache_phases=rollout.cache_phases, compactions=rollout.compactions,
                                     gathered_weights=rollout.gathered_weights, eos_ids=tuple(eos),
                                     pad_id=cfg.pad_token_id or 0))
  args = progs.abstract_args()
  state, reference = args["update"][0], args["score"][1]

  extra_programs: dict[str, tuple[Any, tuple, Any]] = {}  # name -> (program, args, resident tree in args)
  resident = {"policy": planner.count_bytes(state.policy), "policy_opt": planner.count_bytes(state.policy_opt),
              "critic": planner.count_bytes(state.critic), "critic_opt": planner.count_bytes(state.critic_opt),
              "reference": planner.count_bytes(reference),
              "other_state": planner.count_bytes((state.step, state.rng, state.kl, state.lagrangian))}
  if safety_rm_config is not None:
    rm_cfg = _config(safety_rm_config, "safety_rm_config")
    rm_cfg = rm_cfg.replace(param_dtype=jnp.dtype(rm_dtype), dtype=jnp.dtype(rm_dtype))
    bs = planner.ceil_to(rm_batch_size, shards)
    length = planner.ceil_to(rollout.max_prompt_len + rollout.max_new_tokens, rm_length_bucket)
    rm_params = planner.abstract(safety_rm.param_shapes(rm_cfg), safety_rm.param_shardings(rm_cfg, mesh))
    rm_params = {"backbone": planner.abstract(planner.cast_shapes(safety_rm.param_shapes(rm_cfg)["backbone"],
                                                                  rm_cfg.param_dtype),
                                              models.param_shardings(rm_cfg, mesh)),
                 "head": rm_params["head"]}
    resident["safety_rm"] = planner.count_bytes(rm_params)
    extra_programs["safety_rm"] = (safety_rm.token_probs_program(rm_cfg, mesh, batch_size=bs, length=length),
                                   (rm_params, *planner.rows_args(mesh, bs, length)), rm_params)
  if guard_config is not None:
    g_cfg = _config(guard_config, "guard_config")
    g_cfg = g_cfg.replace(param_dtype=jnp.dtype(guard_dtype), dtype=jnp.dtype(guard_dtype))
    bs = planner.ceil_to(guard_batch_size, shards)
    length = planner.ceil_to(guard_max_len, 128)
    g_params = planner.abstract(planner.cast_shapes(models.param_shapes(g_cfg), g_cfg.param_dtype),
                                models.param_shardings(g_cfg, mesh))
    resident["guard"] = planner.count_bytes(g_params)
    ids = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=parallel.replicated(mesh))
    extra_programs["guard"] = (guard_judge.verdict_program(g_cfg, mesh, batch_size=bs, length=length),
                               (g_params, *planner.rows_args(mesh, bs, length), ids, ids), g_params)
  resident_total = sum(resident.values())

  flops = planner.ppo_model_flops(cfg, critic_cfg, rows=rows, prompt=rollout.max_prompt_len,
                                  completion=rollout.max_new_tokens, minibatch_rows=progs.minibatch_rows)
  # generate reads the policy's decode layout (an argument made by decode_params for the rollout, freed after it):
  # the training state stays resident beside it
  in_args = {"decode_params": planner.count_bytes(state.policy), "generate": 0,
             "score": planner.count_bytes((state.policy, reference, state.critic)),
             "advantage": 0, "update": planner.count_bytes(state)}
  results: list[planner.ProgramPlan] = []

  def run(name, program, program_args, resident_in, total, model_flops):
    if verbose:
      print(f"plan: compiling {name} for {tgt.name} ...", flush=True)
    results.append(planner.measure(name, program, program_args, resident_total=total,
                                   resident_in_args=resident_in, usable_bytes=usable, model_flops=model_flops))

  for name in planner.PPO_PROGRAMS:
    if name in names:
      program = {"decode_params": progs.decode_params, "generate": progs.generate, "score": progs.score,
                 "advantage": progs.advantage, "update": progs.update}[name]
      run(name, program, args[name], in_args[name], resident_total, flops[name])
  for name, (program, program_args, tree) in extra_programs.items():
    if name in names:
      g_cfg_flops = None
      if name == "safety_rm":
        b, t = program_args[1].shape
        g_cfg_flops = planner.forward_flops(rm_cfg, tokens=b * t, context=(t + 1) / 2, unembed_tokens=0)
      else:
        b, t = program_args[1].shape
        g_cfg_flops = planner.forward_flops(g_cfg, tokens=b * t, context=(t + 1) / 2, unembed_tokens=0)
      run(name, program, program_args, planner.count_bytes(tree), resident_total, g_cfg_flops)
  sft_info = None
  if sft is not None and "sft_step" in names:
    s_cfg = cfg.replace(param_dtype=jnp.float32, dtype=jnp.dtype(sft.compute_dtype) if sft.compute_dtype else cfg.dtype,
                        remat=sft.remat if sft.remat != "none" else cfg.remat)
    sft = sft.for_mesh(shards)
    sft_trainer.check_batch_size(sft, mesh)
    step = sft_trainer.make_train_step(s_cfg, sft, total_steps=steps, mesh=mesh)
    optimizer = sft_trainer.make_sft_optimizer(sft, steps)
    shardings = sft_trainer.state_shardings(s_cfg, optimizer, mesh)
    shapes = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                       "opt_state": optimizer.init(p)}, models.param_shapes(s_cfg))
    sft_state = planner.abstract(shapes, shardings)
    batch = dict(zip(("tokens_bt", "attention_bt"), planner.rows_args(mesh, sft.batch_size, sft.max_len)))
    batch["target_bt"] = batch["attention_bt"]
    sft_bytes = planner.count_bytes(sft_state)
    model_flops = 3 * planner.forward_flops(s_cfg, tokens=sft.batch_size * sft.max_len,
                                            context=(sft.max_len + 1) / 2,
                                            unembed_tokens=2 * sft.batch_size * sft.max_len)  # loss + accuracy
    run("sft_step", step, (sft_state, batch), sft_bytes, sft_bytes, model_flops)
    sft_info = {"batch_size": sft.batch_size, "max_len": sft.max_len, "num_microbatches": sft.num_microbatches,
                "remat": s_cfg.remat, "state_bytes_per_device": sft_bytes}

  out = {
      "target": tgt.name, "chip": tgt.chip, "platform": tgt.platform, "topology": tgt.topology,
      "num_devices": mesh.size, "hbm_bytes_per_device": tgt.hbm_bytes, "reserve_fraction": reserve_fraction,
      "usable_bytes_per_device": usable, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "model": {"model_type": cfg.model_type, "num_params": cfg.num_params, "num_layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                "param_dtype": jnp.dtype(cfg.param_dtype).name, "compute_dtype": jnp.dtype(cfg.dtype).name,
                "remat": cfg.remat},
      "run": {"rows_per_step": rows, "prompt_len": rollout.max_prompt_len, "completion_len": rollout.max_new_tokens,
              "num_minibatches": ppo.num_minibatches, "num_microbatches": ppo.num_microbatches,
              "score_microbatches": ppo.score_chunks, "estimator": ppo.advantage.estimator,
              "critic": critic_cfg is not None, "logprob_impl": ppo.logprob_impl, "sft": sft_info},
      "resident_bytes_per_device": resident,
      "programs": {p.name: p.to_json() for p in results},
      "fits": all(p.fits for p in results),
      "jax_version": jax.__version__,
  }
  text = planner.table(results, tgt.hbm_bytes)
  if verbose and parallel.is_main_process():
    print(f"plan: {cfg.model_type} {cfg.num_params / 1e9:.2f}B on {tgt.name} ({mesh.size} x {tgt.chip}, "
          f"{tgt.hbm_bytes / GIB:.1f} GiB HBM each), mesh {dict(mesh.shape)}, {rows} rows x "
          f"({rollout.max_prompt_len} + {rollout.max_new_tokens}) tokens, remat {cfg.remat}")
    print("resident per device: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in resident.items() if v))
    print(text)
  if write and parallel.is_main_process():
    paths.write_text(paths.join(workdir, "plan.json"), json.dumps(out, indent=2))
  error = planner.summary_line(tgt, results, reserve_fraction)
  if error:
    raise CotsafeError(error)
  return out
