"""The jobs gin can select (`run.job = @model_info`) and the gin registration of library callables.

This is the only module of the package that imports gin: library functions take typed arguments.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax import demo as demo_lib, eval as eval_lib, models, parallel, rewards, rl
from cotsafe_jax.data import sources
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.plan import run as plan_lib
from cotsafe_jax.rewards.rules import TokenSetReward
from cotsafe_jax.rl import ppo as ppo_lib
from cotsafe_jax.train import ppo_trainer, sft_trainer

# make_mesh as gin configures it (make_mesh.data / fsdp / tensor), for jobs that build a mesh over other devices
_make_mesh = gin.external_configurable(parallel.make_mesh, "make_mesh")
for _fn, _name in [
    (models.ModelConfig, "ModelConfig"), (models.tiny_config, "tiny_config"),
    (rl.AdvantageConfig, "AdvantageConfig"), (rl.PolicyLoss, "PolicyLoss"), (rl.ValueLoss, "ValueLoss"),
    (rl.AdaptiveKLConfig, "AdaptiveKLConfig"), (rl.LagrangianConfig, "LagrangianConfig"),
    (ppo_lib.PPOConfig, "PPOConfig"), (ppo_trainer.PolicySpec, "PolicySpec"),
    (ppo_trainer.RolloutConfig, "RolloutConfig"), (ppo_trainer.OptimConfig, "OptimConfig"),
    (rewards.CompositeReward, "CompositeReward"), (rewards.RefusalDetector, "RefusalDetector"),
    (TokenSetReward, "TokenSetReward"), (sft_trainer.SFTConfig, "SFTConfig"),
    (rewards.load_safety_rm, "load_safety_rm"), (rewards.load_guard_judge, "load_guard_judge"),
    (rewards.GuardTemplate, "GuardTemplate"), (rewards.train_safety_rm, "train_safety_rm"),
    (eval_lib.SyntheticJudge, "SyntheticJudge"), (eval_lib.RuleJudge, "RuleJudge"),
    (demo_lib.TaskConfig, "TaskConfig"), (demo_lib.RMConfig, "RMConfig"),
]:
  gin.external_configurable(_fn, _name)


def _write_json(path: str, obj: Any) -> None:
  if parallel.is_main_process():
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


@gin.configurable
def model_info(*, workdir: str, model: models.ModelConfig | None = None, hf_dir: str | None = None,
               mesh: Any = None, dtype: str = "bfloat16") -> dict[str, Any]:
  """Parameter count and bytes per device under the mesh, for an HF dir or a gin model config."""
  if (model is None) == (hf_dir is None):
    raise CotsafeError("model_info: set exactly one of model_info.model (a gin ModelConfig) or "
                       "model_info.hf_dir (a local HF checkpoint dir)")
  cfg = models.ModelConfig.from_hf(hf_dir) if hf_dir else model
  cfg = cfg.replace(param_dtype=jnp.dtype(dtype))
  mesh = mesh if mesh is not None else parallel.make_mesh()
  shapes = models.param_shapes(cfg)
  shardings = models.param_shardings(cfg, mesh)
  itemsize = jnp.dtype(dtype).itemsize
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) for x, s in
                   zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  info = {
      "model_type": cfg.model_type, "source": hf_dir or "gin", "num_params": count,
      "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
      "mesh": dict(mesh.shape), "dtype": jnp.dtype(dtype).name,
      "param_bytes_total": count * itemsize, "param_bytes_per_device": per_device * itemsize,
      # float32 master params + AdamW's two float32 moments, sharded like the params
      "train_state_bytes_per_device": per_device * (itemsize + 4 + 8),
  }
  if parallel.is_main_process():
    print(f"model_info: {cfg.model_type} from {info['source']}")
    print(f"  parameters          {count:,}")
    print(f"  mesh                {info['mesh']} ({mesh.size} devices)")
    print(f"  params ({info['dtype']})    {_human(info['param_bytes_total'])} total, "
          f"{_human(info['param_bytes_per_device'])} per device")
    print(f"  train state         {_human(info['train_state_bytes_per_device'])} per device "
          "(params + float32 master + AdamW moments)")
  _write_json(os.path.join(workdir, "model_info.json"), info)
  return info


@gin.configurable
def export_hf(*, workdir: str, hf_dir: str = gin.REQUIRED, out_dir: str | None = None,
              dtype: str = "bfloat16", mesh: Any = None, tokenizer_dir: str | None = None) -> str:
  """Load an HF dir (sharded over the mesh), cast to `dtype`, save an HF dir (with its tokenizer)."""
  out_dir = out_dir or os.path.join(workdir, "hf_export")
  cfg, params = models.load_hf(hf_dir, dtype=jnp.dtype(dtype), mesh=mesh)
  tok_dir = tokenizer_dir or hf_dir
  tokenizer = None
  if any(os.path.exists(os.path.join(tok_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
    tokenizer = models.load_tokenizer(tok_dir, model_vocab_size=cfg.vocab_size)
  elif tokenizer_dir:
    raise CotsafeError(f"{tokenizer_dir}: no tokenizer.json or tokenizer_config.json")
  models.save_hf(cfg, params, out_dir, tokenizer=tokenizer)
  if parallel.is_main_process():
    print(f"export_hf: {hf_dir} -> {out_dir} ({jnp.dtype(dtype).name}, {cfg.num_params:,} params)")
  return out_dir


@gin.configurable
def ppo_train(*, workdir: str, num_steps: int = gin.REQUIRED, policy: ppo_trainer.PolicySpec = gin.REQUIRED,
              reward: Any = gin.REQUIRED, prompts: str = gin.REQUIRED, prompts_per_step: int = gin.REQUIRED,
              ppo: ppo_lib.PPOConfig = gin.REQUIRED, rollout: ppo_trainer.RolloutConfig = gin.REQUIRED,
              optim: ppo_trainer.OptimConfig = gin.REQUIRED, **kwargs) -> dict[str, Any]:
  """PPO with token-level rewards (see train/ppo_trainer.train for every option)."""
  out = ppo_trainer.train(workdir=workdir, num_steps=num_steps, policy=policy, reward=reward, prompts=prompts,
                          prompts_per_step=prompts_per_step, ppo=ppo, rollout=rollout, optim=optim, **kwargs)
  if parallel.is_main_process():
    m = out["metrics"]
    state = "stopped early (checkpoint saved; rerun the same command to resume)" if out["stopped_early"] else "done"
    print(f"ppo_train: {state} at step {out['step']}/{num_steps}; reward/mean {m.get('reward/mean', float('nan')):.4f}"
          + (f"; policy exported to {out['hf_dir']}" if out["hf_dir"] else ""))
  return out


@gin.configurable
def sft_train(*, workdir: str, data: str = gin.REQUIRED, config: sft_trainer.SFTConfig = gin.REQUIRED,
              **kwargs) -> dict[str, Any]:
  """Supervised fine-tuning with the loss on assistant tokens (see train/sft_trainer.sft_train)."""
  out = sft_trainer.sft_train(workdir=workdir, data=data, config=config, **kwargs)
  if parallel.is_main_process():
    state = "stopped early (checkpoint saved; rerun to resume)" if out.get("stopped_early") else "done"
    print(f"sft_train: {state} at step {out.get('step')}; loss {out.get('loss', float('nan')):.4f}"
          + (f"; exported to {out['hf_dir']}" if out.get("hf_dir") else ""))
  return out


@gin.configurable
def evaluate(*, workdir: str, hf_dir: str = gin.REQUIRED, prompts: str = gin.REQUIRED, judge: Any = gin.REQUIRED,
             tokenizer_dir: str | None = None, max_new_tokens: int = 1024, batch_size: int = 8,
             max_prompt_len: int = 512, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             columns: Any = None, on_bad_row: str = "raise", dtype: str = "bfloat16", mesh: Any = None,
             name: str = "policy") -> dict[str, Any]:
  """Generate on prompt rows with a policy HF dir and judge them: samples.jsonl, summary.json, report.md."""
  mesh = mesh if mesh is not None else parallel.make_mesh()
  cfg, params = models.load_hf(hf_dir, dtype=jnp.dtype(dtype), mesh=mesh)
  tok = models.load_tokenizer(tokenizer_dir or hf_dir, model_vocab_size=cfg.vocab_size)
  rows = sources.load_prompts(prompts, columns=columns, on_bad_row=on_bad_row).rows
  res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tok, rows=rows, judge=judge,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 max_prompt_len=max_prompt_len, temperature=temperature, top_p=top_p, seed=seed,
                                 mesh=mesh)
  eval_lib.write_samples(os.path.join(workdir, "samples.jsonl"), res.samples)
  table = eval_lib.write_report(workdir, {name: res.summary}, entropies={name: res.entropies},
                                title=f"Evaluation of {hf_dir}")
  if parallel.is_main_process():
    print(table)
  return res.summary


@gin.configurable
def plan(*, workdir: str, target: str = gin.REQUIRED, policy: ppo_trainer.PolicySpec = gin.REQUIRED,
         ppo: ppo_lib.PPOConfig = gin.REQUIRED, rollout: ppo_trainer.RolloutConfig = gin.REQUIRED,
         prompts_per_step: int = gin.REQUIRED, optim: ppo_trainer.OptimConfig = gin.REQUIRED,
         make_mesh: Callable[..., Any] = _make_mesh, **kwargs) -> dict[str, Any]:
  """Compile every program of a PPO run for a target and write plan.json (see cotsafe_jax/plan/run.plan)."""
  return plan_lib.plan(workdir=workdir, target=target, policy=policy, ppo=ppo, rollout=rollout,
                       prompts_per_step=prompts_per_step, optim=optim, make_mesh=make_mesh, **kwargs)


@gin.configurable
def demo(*, workdir: str, **kwargs) -> dict[str, Any]:
  """The CPU demo (gin/demo_cpu.gin): warm start, safety RM, SFT baseline, PPO, evaluation, report."""
  return demo_lib.run_demo(workdir=workdir, **kwargs)


@gin.configurable
def run(*, job: Callable[..., Any] = gin.REQUIRED, workdir: str | None = None) -> Any:
  """The launcher's entry: runs the bound job in `workdir`."""
  if workdir is None:
    raise CotsafeError("no workdir: pass --workdir=... or bind run.workdir in gin")
  os.makedirs(workdir, exist_ok=True)
  return job(workdir=workdir)
