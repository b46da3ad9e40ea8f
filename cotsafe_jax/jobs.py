"""The jobs gin can select (`run.job = @model_info`) and the gin registration of library callables.

This is the only module of the package that imports gin: library functions take typed arguments.
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
import types
import typing
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cotsafe_jax import demo as demo_lib, eval as eval_lib, models, parallel, paths, rewards, rl
from cotsafe_jax.data import mixture as mixture_lib, sources
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.plan import run as plan_lib
from cotsafe_jax.rewards import safety_rm_data
from cotsafe_jax.rewards.rules import TokenSetReward
from cotsafe_jax.rl import ppo as ppo_lib
from cotsafe_jax.study import run as study_lib
from cotsafe_jax.train import logging as logging_lib, ppo_trainer, sft_trainer, validation as validation_lib

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
    (rewards.GuardTemplate, "GuardTemplate"), (mixture_lib.Dedup, "Dedup"),
    (logging_lib.WandbConfig, "WandbConfig"),
    (eval_lib.SyntheticJudge, "SyntheticJudge"), (eval_lib.RuleJudge, "RuleJudge"),
    (demo_lib.TaskConfig, "TaskConfig"), (demo_lib.RMConfig, "RMConfig"), (demo_lib.RFTConfig, "RFTConfig"),
    (demo_lib.PPOArms, "PPOArms"), (demo_lib.Tuning, "Tuning"), (demo_lib.EvalSettings, "EvalSettings"),
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


_PLAIN = (bool, int, float, str, type(None))


def _forward(fn: Callable[..., Any], kwargs: Mapping[str, Any], job: str) -> None:
  """The bindings a job passes on to `fn` must be its parameters, and plain values must fit plain annotations:
  the launcher's one-line errors for what gin cannot check through the job's **kwargs."""
  params = inspect.signature(fn).parameters
  try:
    hints = typing.get_type_hints(fn)
  except Exception:  # noqa: BLE001 - annotations that do not resolve: names are still checked
    hints = {}
  for name, value in kwargs.items():
    if name not in params:
      close = difflib.get_close_matches(name, list(params), n=3)
      hint = f" (did you mean: {', '.join(close)}?)" if close else ""
      raise CotsafeError(f"gin: '{job}' has no parameter '{name}'{hint}")
    hint = hints.get(name)
    if hint is None or type(value) not in _PLAIN:
      continue
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if all(a in _PLAIN for a in allowed) and not any(type(value) is a or (a is float and type(value) is int)
                                                     for a in allowed):
      want = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
      raise CotsafeError(f"gin: {job}.{name} = {value!r} is a {type(value).__name__}, expected {want}")


def _tokenizer_dir(job: str, *dirs: Any) -> str:
  found = next((d for d in dirs if isinstance(d, str) and d), None)
  if found is None:
    raise CotsafeError(f"{job}: no tokenizer dir for the data statistics, expected the model's HF dir or a "
                       "tokenizer_dir")
  return found


def _data_stats(workdir: str, job: str, data: mixture_lib.TrainingData, *, batch_size: int, num_steps: int | None,
                mixture: Mapping[str, float] | None = None, length_of: Callable[[Any], int] | None = None,
                max_len: int | None = None, extra: Mapping[str, Any] | None = None,
                write: bool = True) -> dict[str, Any]:
  """The mixture's statistics, printed and (write) written to workdir/data_stats.json. A training run writes
  them once it has run (a run that fails on bad input leaves nothing behind)."""
  stats = mixture_lib.mixture_stats(data, batch_size=batch_size, num_steps=num_steps, mixture=mixture,
                                    length_of=length_of, max_len=max_len)
  stats.update(extra or {})
  if parallel.is_main_process():
    print(mixture_lib.format_stats(stats, title=f"{job} data"), flush=True)
  if write:
    _write_json(os.path.join(workdir, "data_stats.json"), stats)
  return stats


def _report(workdir: str, job: str, curves: Sequence[str], final: Mapping[str, Any] | None = None) -> None:
  eval_lib.write_training_report(workdir, job=job, curves=curves, final=final)
  if parallel.is_main_process():
    print(f"{job}: report in {os.path.join(workdir, 'report.md')}")


def _run_config() -> dict[str, Any]:
  return {"gin": gin.config_str()}


_PPO_CURVES = ("reward/mean", "kl/mean", "entropy/rollout", "response/length_mean", "response/finished_rate",
               "reward/token_safety", "reward/sequence_safety", "reward/correctness", "update/loss")


@gin.configurable
def ppo_train(*, workdir: str, num_steps: int = gin.REQUIRED, policy: ppo_trainer.PolicySpec = gin.REQUIRED,
              reward: Any = gin.REQUIRED, prompts: Any = gin.REQUIRED, prompts_per_step: int = gin.REQUIRED,
              ppo: ppo_lib.PPOConfig = gin.REQUIRED, rollout: ppo_trainer.RolloutConfig = gin.REQUIRED,
              optim: ppo_trainer.OptimConfig = gin.REQUIRED, prompt_columns: Any = None,
              mixture: Mapping[str, float] | None = None, on_bad_row: str = "raise", seed: int = 0,
              dedup: mixture_lib.Dedup | None = None, dry_run: bool = False,
              validation: Sequence[sources.Source] | None = None, eval_every: int = 0,
              eval_config: eval_lib.EvalConfig | None = None, eval_judge: Any = None,
              wandb: logging_lib.WandbConfig | None = None, report: bool = True, **kwargs) -> dict[str, Any]:
  """PPO with token-level rewards (see train/ppo_trainer.train for every option).

  prompts: one prompt file (prompt_columns: its column map or preset), or a list of @Source() (mixed by their
  weights; `mixture` fixes the kinds' shares). dedup: drop training prompts that duplicate evaluation prompts
  (data.Dedup). dry_run: print the data's statistics (data_stats.json) and return; no model or reward is
  built. validation + eval_every: evaluate the policy on these prompt Sources every eval_every steps with
  eval_judge (default RuleJudge(): no safety scorer) and eval_config (default: greedy, one sample, the
  rollout's lengths), logged as val/*. report: write report.md at the end. wandb: a WandbConfig to log to W&B.
  """
  _forward(ppo_trainer.train, kwargs, "ppo_train")
  data = mixture_lib.training_data(prompts, schema="prompts", columns=prompt_columns, on_bad_row=on_bad_row,
                                   dedup=dedup, seed=seed, job="ppo_train")
  rows_per_step = prompts_per_step * rollout.samples_per_prompt
  val_rows = (sources.load_sources(validation, on_bad_row=on_bad_row, seed=seed, schema="prompts")
              if validation else None)
  extra = {"validation_rows": len(val_rows.rows)} if val_rows else None
  if dry_run:
    tok = models.load_tokenizer(_tokenizer_dir("ppo_train", policy.tokenizer_dir, policy.hf_dir))

    def length_of(row):  # the prompt as the policy sees it: chat template, thinking format
      return len(tok(models.apply_chat_template(tok, row.get("messages") or row["prompt"]),
                     add_special_tokens=False)["input_ids"])
    stats = _data_stats(workdir, "ppo_train", data, batch_size=prompts_per_step, num_steps=num_steps,
                        mixture=mixture, length_of=length_of, max_len=rollout.max_prompt_len, extra=extra)
    return {"dry_run": True, "data": stats}
  stats = _data_stats(workdir, "ppo_train", data, batch_size=prompts_per_step, num_steps=num_steps,
                      mixture=mixture, extra=extra, write=False)
  check = None
  if val_rows is not None and eval_every:
    config = eval_config if eval_config is not None else eval_lib.EvalConfig(
        samples_per_prompt=1, temperature=0.0, max_new_tokens=rollout.max_new_tokens, batch_size=rows_per_step,
        max_prompt_len=rollout.max_prompt_len, prompt_buckets=(rollout.max_prompt_len,), num_resamples=0,
        progress=False)
    check = validation_lib.PolicyValidation(workdir=workdir, rows=val_rows.rows,
                                            judge=eval_judge if eval_judge is not None else eval_lib.RuleJudge(),
                                            config=config, every=eval_every, num_steps=num_steps,
                                            weights=val_rows.weights)
  elif validation and not eval_every:
    raise CotsafeError("ppo_train: validation sources are set but eval_every=0, expected eval_every >= 1")
  callback = validation_lib.compose(kwargs.pop("step_callback", None), check)
  with logging_lib.wandb_run(wandb, workdir=workdir, job="ppo_train", run_config=_run_config()):
    out = ppo_trainer.train(workdir=workdir, num_steps=num_steps, policy=policy, reward=reward, prompts=data,
                            prompts_per_step=prompts_per_step, ppo=ppo, rollout=rollout, optim=optim, mixture=mixture,
                            on_bad_row=on_bad_row, seed=seed, step_callback=callback, **kwargs)
  _write_json(os.path.join(workdir, "data_stats.json"), stats)
  if report:
    _report(workdir, "ppo_train", _PPO_CURVES)
  if parallel.is_main_process():
    m = out["metrics"]
    state = "stopped early (checkpoint saved; rerun the same command to resume)" if out["stopped_early"] else "done"
    print(f"ppo_train: {state} at step {out['step']}/{num_steps}; reward/mean {m.get('reward/mean', float('nan')):.4f}"
          + (f"; policy exported to {out['hf_dir']}" if out["hf_dir"] else ""))
  return out


@gin.configurable
def sft_train(*, workdir: str, data: Any = gin.REQUIRED, config: sft_trainer.SFTConfig = gin.REQUIRED,
              columns: Any = None, split: str | None = None, data_dir: str | None = None, on_bad_row: str = "error",
              dedup: mixture_lib.Dedup | None = None, dry_run: bool = False,
              validation: Sequence[sources.Source] | None = None, eval_every: int = 0,
              wandb: logging_lib.WandbConfig | None = None, report: bool = True, **kwargs) -> dict[str, Any]:
  """Supervised fine-tuning with the loss on assistant tokens (see train/sft_trainer.sft_train).

  data: one SFT file (columns / split / data_dir apply to it) or a list of @Source() (mixed by weights).
  dedup, dry_run, wandb, report: as ppo_train. validation + eval_every: the loss on these SFT Sources every
  eval_every steps, logged as val/loss and val/token_accuracy.
  """
  _forward(sft_trainer.sft_train, kwargs, "sft_train")
  if on_bad_row not in ("error", "skip"):
    raise CotsafeError(f"sft_train: on_bad_row={on_bad_row!r}, expected 'error' or 'skip'")
  bad = "raise" if on_bad_row == "error" else "skip"
  loaded = mixture_lib.training_data(data, schema="sft", columns=columns, split=split, data_dir=data_dir,
                                     on_bad_row=bad, dedup=dedup, seed=config.seed, job="sft_train")
  num_steps = config.num_steps or (config.num_epochs * len(loaded.rows) // config.batch_size)
  val_rows = sources.load_sources(validation, on_bad_row=bad, seed=config.seed, schema="sft") if validation else None
  extra = {"validation_rows": len(val_rows.rows)} if val_rows else None
  if dry_run:
    tok = models.load_tokenizer(_tokenizer_dir("sft_train", kwargs.get("tokenizer_dir"), kwargs.get("hf_dir"),
                                               kwargs.get("init_from")))
    stats = _data_stats(workdir, "sft_train", loaded, batch_size=config.batch_size, num_steps=num_steps,
                        length_of=lambda row: len(sft_trainer.encode_row(tok, row, where=loaded.source)[0]),
                        max_len=config.max_len, extra=extra)
    return {"dry_run": True, "data": stats}
  stats = _data_stats(workdir, "sft_train", loaded, batch_size=config.batch_size, num_steps=num_steps,
                      extra=extra, write=False)
  check = None
  if val_rows is not None:
    if not eval_every:
      raise CotsafeError("sft_train: validation sources are set but eval_every=0, expected eval_every >= 1")
    check = validation_lib.LossValidation(rows=val_rows.rows, config=config, every=eval_every, num_steps=num_steps)
  callback = validation_lib.compose(kwargs.pop("step_callback", None), check)
  with logging_lib.wandb_run(wandb, workdir=workdir, job="sft_train", run_config=_run_config()):
    out = sft_trainer.sft_train(workdir=workdir, data=loaded, config=config, on_bad_row=on_bad_row,
                                step_callback=callback, **kwargs)
  _write_json(os.path.join(workdir, "data_stats.json"), stats)
  if report:
    _report(workdir, "sft_train", ("loss", "token_accuracy", "grad_norm", "lr"),
            final={k: v for k, v in out.items() if k.startswith(("num_", "val/"))})
  if parallel.is_main_process():
    state = "stopped early (checkpoint saved; rerun to resume)" if out.get("stopped_early") else "done"
    print(f"sft_train: {state} at step {out.get('step')}; loss {out.get('loss', float('nan')):.4f}"
          + (f"; exported to {out['hf_dir']}" if out.get("hf_dir") else ""))
  return out


@gin.configurable
def train_safety_rm(*, workdir: str, train_path: Any = gin.REQUIRED, eval_path: Any = gin.REQUIRED,
                    columns: Any = None, on_bad_row: str = "raise", dedup: mixture_lib.Dedup | None = None,
                    dry_run: bool = False, wandb: logging_lib.WandbConfig | None = None, report: bool = True,
                    **kwargs) -> dict[str, Any]:
  """The token-level safety RM (see rewards/safety_rm_trainer.train_safety_rm for every option).

  train_path / eval_path: one span file each (columns: its map or preset), or lists of @Source() (e.g. preset
  'beavertails' or 'pku_saferlhf': sequence labels; the training list mixed by weights). dedup (training rows
  only), dry_run, wandb, report: as ppo_train.
  """
  _forward(rewards.train_safety_rm, kwargs, "train_safety_rm")
  seed = kwargs.get("seed", 0)
  train = mixture_lib.training_data(train_path, schema="spans", columns=columns, on_bad_row=on_bad_row, dedup=dedup,
                                    seed=seed, job="train_safety_rm")
  evals = mixture_lib.training_data(eval_path, schema="spans", columns=columns, on_bad_row=on_bad_row, seed=seed,
                                    job="train_safety_rm")
  batch_size, steps, max_len = kwargs.get("batch_size", 32), kwargs.get("steps"), kwargs.get("max_len", 1024)
  extra = {"eval_rows": len(evals.rows)}
  if dry_run:
    backbone = kwargs.get("backbone")
    tok = models.load_tokenizer(_tokenizer_dir("train_safety_rm", kwargs.get("tokenizer_dir"), backbone))
    stop = safety_rm_data.stop_token(tok, kwargs.get("stop_token_id"))

    def length_of(row):  # chat-templated prompt + response + the stop token, before any cut
      ids, *_ = safety_rm_data.encode_row(tok, safety_rm_data._span_row(row), 1 << 30, stop_id=stop)
      return len(ids)
    stats = _data_stats(workdir, "train_safety_rm", train, batch_size=batch_size, num_steps=steps,
                        length_of=length_of, max_len=max_len, extra=extra)
    return {"dry_run": True, "data": stats}
  stats = _data_stats(workdir, "train_safety_rm", train, batch_size=batch_size, num_steps=steps, extra=extra,
                      write=False)
  with logging_lib.wandb_run(wandb, workdir=workdir, job="train_safety_rm", run_config=_run_config()):
    out = rewards.train_safety_rm(workdir=workdir, train_path=train, eval_path=evals, on_bad_row=on_bad_row,
                                  **kwargs)
  _write_json(os.path.join(workdir, "data_stats.json"), stats)
  if report:
    _report(workdir, "train_safety_rm", ("loss", "token_loss", "seq_loss", "grad_norm"),
            final={k: v for k, v in out.items() if k != "export_dir"})
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
  """The CPU demo (gin/demo_cpu.gin): the study's design for one seed (warm start, safety RM, SFT, RFT, PPO,
  sequence-only PPO, evaluation, report)."""
  return demo_lib.run_demo(workdir=workdir, **kwargs)


# what a job's dry run does not build (its gin references are not evaluated): models and judges
_NOT_BUILT_IN_DRY_RUN = {"ppo_train": ("reward", "eval_judge"), "sft_train": (), "train_safety_rm": ()}


def _dry_run_requested(name: str) -> bool:
  try:
    return gin.query_parameter(f"{name}.dry_run") is True
  except ValueError:
    return False


@gin.configurable
def study(*, workdir: str, seeds: Sequence[int] = gin.REQUIRED, **kwargs) -> dict[str, Any]:
  """The study (gin/study_cpu.gin): every arm x seeds, learning rates and steps chosen on the first seed's
  validation split, intervals and paired differences (see cotsafe_jax/study/run.run_study)."""
  return study_lib.run_study(workdir=workdir, seeds=tuple(seeds), **kwargs)


@gin.configurable
def run(*, job: Callable[..., Any] = gin.REQUIRED, workdir: str | None = None) -> Any:
  """The launcher's entry: runs the bound job in `workdir`. A training job with `<job>.dry_run = True` only
  reads its data: its reward and judge bindings are left unbuilt (no guard or RM is loaded)."""
  if workdir is None:
    raise CotsafeError("no workdir: pass --workdir=... or bind run.workdir in gin")
  paths.makedirs(workdir)  # a local dir or a gs:// URL
  name = getattr(job, "__name__", "")
  if name in _NOT_BUILT_IN_DRY_RUN and _dry_run_requested(name):
    with gin.unlock_config():
      for param in _NOT_BUILT_IN_DRY_RUN[name]:
        gin.bind_parameter(f"{name}.{param}", None)
  return job(workdir=workdir)
