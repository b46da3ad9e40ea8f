"""The jobs gin can select (`run.job = @model_info`) and the gin registration of library callables.

This is the only module of the package that imports gin: library functions take typed arguments.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax import demo as demo_lib, eval as eval_lib, models, parallel, paths, rewards, rl
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
    (sources.Source, "Source"), (eval_lib.EvalConfig, "EvalConfig"),
]:
  gin.external_configurable(_fn, _name)


def _write_json(path: str, obj: Any) -> None:
  if parallel.is_main_process():
    paths.write_text(path, json.dumps(obj, indent=2))


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
  if any(paths.exists(os.path.join(tok_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
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


def _suite(suite: Sequence[sources.Source] | None, prompts: str | None, columns: Any,
           on_bad_row: str, seed: int) -> sources.SourceRows:
  if (suite is None) == (prompts is None):
    raise CotsafeError("evaluate: set exactly one of evaluate.suite (a list of @Source(), e.g. from gin/eval/*.gin) "
                       "or evaluate.prompts (one prompt file)")
  if suite is None:
    suite = [sources.Source(path=prompts, preset=columns if isinstance(columns, str) else None,
                            columns=None if isinstance(columns, str) else columns)]
  return sources.load_sources(suite, on_bad_row=on_bad_row, seed=seed)


def _run_facts(config: eval_lib.EvalConfig, loaded: sources.SourceRows, judge: Any) -> dict[str, Any]:
  """What makes two evaluations comparable: the sampling, the suite, the judge (kept in summary.json)."""
  sampling = {k: v for k, v in config.kwargs().items() if k not in ("progress", "num_resamples")}
  sampling["prompt_buckets"] = list(sampling["prompt_buckets"])
  sampling["pass_at"] = None if sampling["pass_at"] is None else list(sampling["pass_at"])
  return {"sampling": sampling,
          "suite": {n: {k: st[k] for k in ("rows", "available", "weight")} for n, st in loaded.stats.items()},
          "judge": type(judge).__name__}


def _evaluate_checkpoint(*, hf_dir: str, tokenizer_dir: str | None, dtype: str, mesh: Any, rows: list,
                         judge: Any, config: eval_lib.EvalConfig, weights: Mapping[str, float]) -> Any:
  if not hf_dir:
    raise CotsafeError(f"evaluate: no policy checkpoint (hf_dir={hf_dir!r}); set POLICY_DIR (gin/eval/*.gin), "
                       "evaluate.hf_dir or compare.policies to a local HF dir")
  cfg, params = models.load_hf(hf_dir, dtype=jnp.dtype(dtype), mesh=mesh)
  tok = models.load_tokenizer(tokenizer_dir or hf_dir, model_vocab_size=cfg.vocab_size)
  if parallel.is_main_process():
    print(f"evaluate: {hf_dir}: {len(rows)} prompts x {config.samples_per_prompt} samples", flush=True)
  return eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tok, rows=rows, judge=judge, mesh=mesh,
                                  weights=weights, **config.kwargs())


def _write_evaluation(workdir: str, results: Mapping[str, Any], facts: Mapping[str, Any], *, title: str,
                      earlier: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  reports = {n: r.report for n, r in results.items()}
  speed = {n: r.speed for n, r in results.items()}
  lengths = {n: {"response": r.response_lengths, "reasoning": r.reasoning_lengths} for n, r in results.items()}
  for name, old in (earlier or {}).items():
    reports[name], speed[name] = old["report"], old.get("speed") or {}
    if old.get("lengths") is not None:
      lengths[name] = old["lengths"]
  order = list(reports) if earlier is None else [n for n in facts["order"] if n in reports]
  summary = eval_lib.summary_of({n: reports[n] for n in order}, **{k: v for k, v in facts.items() if k != "order"})
  table = eval_lib.write_report(workdir, summary, entropies={n: r.entropies for n, r in results.items()},
                                lengths={n: lengths[n] for n in order if n in lengths},
                                speed={n: speed[n] for n in order if speed.get(n)}, title=title)
  run = {n: {"speed": r.speed, "analysis": r.analysis, "num_truncated": r.num_truncated} for n, r in results.items()}
  _write_json(os.path.join(workdir, "run.json"), run)
  if parallel.is_main_process():
    print(table)
  return table


@gin.configurable
def evaluate(*, workdir: str, hf_dir: str = gin.REQUIRED, judge: Any = gin.REQUIRED,
             suite: Sequence[sources.Source] | None = None, prompts: str | None = None,
             config: eval_lib.EvalConfig | None = None, tokenizer_dir: str | None = None, columns: Any = None,
             on_bad_row: str = "raise", dtype: str = "bfloat16", mesh: Any = None,
             name: str = "policy") -> dict[str, Any]:
  """Evaluate one checkpoint on a suite of benchmarks (gin/eval/*.gin) or one prompt file: k samples per
  prompt, every sample judged. Writes samples.jsonl (every sample, every verdict), summary.json (metrics with
  95% intervals overall, per benchmark and per category), report.md + plots, run.json (speed, analysis)."""
  config = config if config is not None else eval_lib.EvalConfig()
  mesh = mesh if mesh is not None else parallel.make_mesh()
  loaded = _suite(suite, prompts, columns, on_bad_row, config.seed)
  res = _evaluate_checkpoint(hf_dir=hf_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, mesh=mesh, rows=loaded.rows,
                             judge=judge, config=config, weights=loaded.weights)
  eval_lib.write_samples(os.path.join(workdir, "samples.jsonl"), res.samples)
  _write_evaluation(workdir, {name: res}, _run_facts(config, loaded, judge), title=f"Evaluation of {hf_dir}")
  return res.report


def _earlier_run(name: str, run_dir: str, facts: Mapping[str, Any]) -> dict[str, Any]:
  """An evaluate workdir's one policy entry (and its speed, lengths), checked to be the same evaluation."""
  path = os.path.join(run_dir, "summary.json")
  try:
    summary = json.loads(paths.read_text(path))
  except (OSError, json.JSONDecodeError) as e:
    raise CotsafeError(f"compare: runs[{name!r}]: cannot read {path} ({type(e).__name__}), expected an evaluate "
                       "workdir") from None
  policies = summary.get("policies") if isinstance(summary, dict) else None
  if not isinstance(policies, dict) or len(policies) != 1:
    raise CotsafeError(f"compare: runs[{name!r}]: {path} holds {len(policies or {})} policies, expected the one of an "
                       "evaluate run")
  for key in ("sampling", "suite"):
    if summary.get(key) != facts[key]:
      raise CotsafeError(f"compare: runs[{name!r}]: {path} was evaluated with another {key} ({summary.get(key)}) "
                         f"than this comparison ({facts[key]}); side by side numbers must share suite and sampling")
  out = {"report": next(iter(policies.values())), "speed": None, "lengths": None}
  run_json = os.path.join(run_dir, "run.json")
  if paths.exists(run_json):
    out["speed"] = next(iter(json.loads(paths.read_text(run_json)).values()), {}).get("speed")
  samples = os.path.join(run_dir, "samples.jsonl")
  if paths.exists(samples):
    rows = [json.loads(line) for line in paths.read_text(samples).splitlines() if line.strip()]
    out["lengths"] = {"response": np.asarray([r["num_tokens"] for r in rows]),
                      "reasoning": np.asarray([r["num_reasoning_tokens"] for r in rows])}
  return out


@gin.configurable
def compare(*, workdir: str, judge: Any = gin.REQUIRED, policies: Mapping[str, str] | None = None,
            runs: Mapping[str, str] | None = None, suite: Sequence[sources.Source] | None = None,
            prompts: str | None = None, config: eval_lib.EvalConfig | None = None,
            tokenizer_dir: str | Mapping[str, str] | None = None, columns: Any = None, on_bad_row: str = "raise",
            dtype: str = "bfloat16", mesh: Any = None, title: str = "Comparison") -> dict[str, Any]:
  """Several checkpoints side by side in one report (base vs SFT vs PPO): `policies` {name: HF dir} are
  evaluated here one after the other on the same suite, sampling and judge; `runs` {name: an earlier evaluate
  workdir} are added from their summary.json (refused unless evaluated on the same suite and sampling).
  Writes samples_<name>.jsonl per evaluated policy, summary.json, report.md + plots, run.json."""
  config = config if config is not None else eval_lib.EvalConfig()
  policies, runs = dict(policies or {}), dict(runs or {})
  names = list(policies) + list(runs)
  if len(names) < 1 or len(set(names)) != len(names):
    raise CotsafeError(f"compare: policies {list(policies)} and runs {list(runs)}, expected at least one, names unique")
  mesh = mesh if mesh is not None else parallel.make_mesh()
  loaded = _suite(suite, prompts, columns, on_bad_row, config.seed)
  facts = _run_facts(config, loaded, judge)
  earlier = {name: _earlier_run(name, d, facts) for name, d in runs.items()}
  results = {}
  for name, hf_dir in policies.items():
    tok_dir = tokenizer_dir.get(name) if isinstance(tokenizer_dir, Mapping) else tokenizer_dir
    results[name] = _evaluate_checkpoint(hf_dir=hf_dir, tokenizer_dir=tok_dir, dtype=dtype, mesh=mesh,
                                         rows=loaded.rows, judge=judge, config=config, weights=loaded.weights)
    eval_lib.write_samples(os.path.join(workdir, f"samples_{name}.jsonl"), results[name].samples)
  _write_evaluation(workdir, results, {**facts, "order": names}, title=title, earlier=earlier)
  return {name: r.report for name, r in results.items()}


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
  paths.makedirs(workdir)  # a local dir or a gs:// URL
  return job(workdir=workdir)
