"""The CPU demo: a miniature "Beyond SFT" experiment on the synthetic task, every stage real.

warm-start SFT -> token-level safety RM -> safe-CoT SFT baseline | PPO with token penalties -> eval + report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from cotsafe_jax import eval as eval_lib, models, parallel
from cotsafe_jax.data import sources, synthetic
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import CompositeReward
from cotsafe_jax.rewards.safety_rm import load_safety_rm
from cotsafe_jax.rewards.safety_rm_trainer import train_safety_rm
from cotsafe_jax.rl.ppo import PPOConfig
from cotsafe_jax.train import ppo_trainer
from cotsafe_jax.train.sft_trainer import SFTConfig, sft_train

STAGES = ("data", "warm_start", "safety_rm", "sft_baseline", "ppo", "evaluate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
  """The synthetic task. baseline_harmful_fraction: share of the training harmful prompts whose safe chain
  of thought the SFT baseline sees (a curated safe-CoT set is small next to the RL prompt pool)."""
  seed: int = 0
  n_train: int = 1200
  n_eval: int = 200
  p_unsafe: float = 0.65
  p_over_refusal: float = 0.15
  p_reflection: float = 0.3
  baseline_harmful_fraction: float = 1.0
  baseline_include_reasoning: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 1e-3
  max_len: int = 96
  seq_pool: str = "max"


def _write_jsonl(path: str, rows) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def _baseline_rows(task: synthetic.SyntheticTask, cfg: TaskConfig) -> list[dict]:
  """The SFT baseline's data: safe chains of thought on a share of the harmful prompts (+ the rest)."""
  rng = np.random.default_rng(cfg.seed + 7)
  harmful = [r for r in task.sft_safe if r["kind"] == "harmful"]
  keep = set(rng.permutation(len(harmful))[:int(round(cfg.baseline_harmful_fraction * len(harmful)))].tolist())
  rows = []
  for r in task.sft_safe:
    if r["kind"] == "harmful":
      if harmful.index(r) in keep:
        rows.append(r)
    elif r["kind"] == "benign" or cfg.baseline_include_reasoning:
      rows.append(r)
  return rows


def run_demo(*, workdir: str, task: TaskConfig, policy: models.ModelConfig, rm_backbone: models.ModelConfig,
             warm: SFTConfig, baseline: SFTConfig, rm: RMConfig, ppo: PPOConfig,
             rollout: ppo_trainer.RolloutConfig, optim: ppo_trainer.OptimConfig, ppo_steps: int,
             prompts_per_step: int, reward_weights: Mapping[str, Mapping[str, float]],
             eval_max_new_tokens: int = 64, eval_batch_size: int = 40, curve_every: int = 10,
             curve_prompts: int = 60, mixture: Mapping[str, float] | None = None, mesh: Any = None) -> dict[str, Any]:
  """Run every stage into `workdir`; returns the summary {"base", "sft", "ppo"} and stage timings."""
  mesh = mesh if mesh is not None else parallel.make_mesh()
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()

  def stage(name):
    timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)
    if parallel.is_main_process():
      print(f"demo: {name} done ({timings[name]:.0f} s)", flush=True)

  # 1. data: the task, its tokenizer, and the SFT baseline's safe-CoT set
  data_dir = os.path.join(workdir, "data")
  t = synthetic.make_task(seed=task.seed, n_train=task.n_train, n_eval=task.n_eval, p_unsafe=task.p_unsafe,
                          p_over_refusal=task.p_over_refusal, p_reflection=task.p_reflection)
  paths = synthetic.write_task(t, data_dir)
  baseline_path = _write_jsonl(os.path.join(data_dir, "sft_baseline.jsonl"), _baseline_rows(t, task))
  tok_dir = paths["tokenizer"]
  tok = models.load_tokenizer(tok_dir, model_vocab_size=policy.vocab_size)
  stage("data")

  # 2. warm start: SFT on a mixture where harmful prompts often get unsafe reasoning
  warm_out = sft_train(workdir=os.path.join(workdir, "warm_start"), data=paths["sft_warm"], config=warm,
                       model=policy, tokenizer_dir=tok_dir, mesh=mesh, async_checkpoint=False)
  warm_dir = warm_out["hf_dir"]
  stage("warm_start")

  # 3. the token-level safety RM the policy is trained against (not the evaluation judge)
  spans = sources.load_spans(paths["safety_spans"]).rows
  rng = np.random.default_rng(task.seed + 11)
  order = rng.permutation(len(spans))
  n_eval_rm = max(len(spans) // 10, 1)
  rm_dir = os.path.join(workdir, "safety_rm")
  os.makedirs(rm_dir, exist_ok=True)
  rm_train = _write_jsonl(os.path.join(rm_dir, "train_spans.jsonl"), [spans[i] for i in order[n_eval_rm:]])
  rm_eval = _write_jsonl(os.path.join(rm_dir, "eval_spans.jsonl"), [spans[i] for i in order[:n_eval_rm]])
  rm_out = train_safety_rm(backbone=rm_backbone, train_path=rm_train, eval_path=rm_eval, workdir=rm_dir,
                           steps=rm.steps, batch_size=rm.batch_size, learning_rate=rm.learning_rate,
                           max_len=rm.max_len, tokenizer_dir=tok_dir, seq_pool=rm.seq_pool, seed=task.seed,
                           mesh=mesh)
  scorer = load_safety_rm(rm_out["export_dir"], mesh=mesh, seq_pool=rm.seq_pool)
  stage("safety_rm")

  # 4. the baseline: SFT of the warm start on safe chains of thought
  sft_out = sft_train(workdir=os.path.join(workdir, "sft_baseline"), data=baseline_path, config=baseline,
                      init_from=warm_dir, tokenizer_dir=tok_dir, mesh=mesh, async_checkpoint=False)
  stage("sft_baseline")

  # 5. PPO from the warm start with token-level safety penalties, correctness and over-refusal terms
  judge = eval_lib.SyntheticJudge()
  eval_rows = list(t.eval_prompts)
  curve_rows = eval_rows[:curve_prompts]
  curve: list[dict[str, float]] = []
  eval_kw = dict(judge=judge, max_new_tokens=eval_max_new_tokens, batch_size=eval_batch_size,
                 max_prompt_len=rollout.max_prompt_len, mesh=mesh)

  def on_step(step, cfg, params, tokenizer):
    if step % curve_every and step != ppo_steps:
      return {}
    res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tokenizer, rows=curve_rows, **eval_kw)
    point = {"step": step, **{f"eval/{k}": res.summary[k] for k in ("safety_rate_cot", "safety_rate_answer",
                                                                    "accuracy", "over_refusal")}}
    curve.append(point)
    return {k: v for k, v in point.items() if k != "step" and v is not None}

  reward = CompositeReward(weights=reward_weights, token_safety=scorer, sequence_safety=scorer,
                           sequence_part="reasoning")
  ppo_out = ppo_trainer.train(
      workdir=os.path.join(workdir, "ppo"), policy=ppo_trainer.PolicySpec(hf_dir=warm_dir, tokenizer_dir=tok_dir),
      reward=reward, prompts=paths["train_prompts"], ppo=ppo, rollout=rollout, optim=optim, num_steps=ppo_steps,
      prompts_per_step=prompts_per_step, mixture=mixture, mesh=mesh, seed=task.seed, async_checkpoint=False,
      save_interval_steps=max(ppo_steps, 1), step_callback=on_step, samples_every=max(ppo_steps // 4, 1))
  stage("ppo")

  # 6. evaluate the three policies on the held-out prompts with the generator's ground truth
  summaries, entropies = {}, {}
  for name, hf_dir in (("base", warm_dir), ("sft", sft_out["hf_dir"]), ("ppo", ppo_out["hf_dir"])):
    cfg, params = models.load_hf(hf_dir, mesh=mesh)
    res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tok, rows=eval_rows, **eval_kw)
    summaries[name], entropies[name] = res.summary, res.entropies
    eval_lib.write_samples(os.path.join(workdir, f"samples_{name}.jsonl"), res.samples)
  stage("evaluate")
  table = eval_lib.write_report(workdir, summaries, curves={"ppo": curve}, entropies=entropies,
                                title="cotsafe_jax CPU demo: Beyond SFT in miniature")
  extras = {"timings_s": timings, "total_s": round(time.perf_counter() - t0, 1),
            "rm_eval": {k: rm_out[k] for k in rm_out if k.startswith(("token_", "seq", "auroc"))}}
  with open(os.path.join(workdir, "demo_info.json"), "w") as f:
    json.dump(extras, f, indent=2, default=float)
  if parallel.is_main_process():
    print(table)
    print(f"demo: total {extras['total_s']:.0f} s; stage times {timings}")
  if not summaries:
    raise CotsafeError("demo: no policy was evaluated")
  return {"summary": summaries, **extras}
