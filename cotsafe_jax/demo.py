"""The CPU demo: a miniature "Beyond SFT" experiment on the synthetic task, every stage real.

warm-start SFT | token-level safety RM -> safe-CoT SFT baseline | PPO with token penalties -> eval + report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from cotsafe_jax import eval as eval_lib, models, parallel, paths as path_lib
from cotsafe_jax.data import sources, synthetic
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import CompositeReward
from cotsafe_jax.rewards.safety_rm import load_safety_rm
from cotsafe_jax.rewards.safety_rm_trainer import train_safety_rm
from cotsafe_jax.rl.ppo import PPOConfig
from cotsafe_jax.train import ppo_trainer
from cotsafe_jax.train.sft_trainer import SFTConfig, sft_train

STAGES = ("data", "warm_start", "safety_rm", "sft_baseline", "ppo", "evaluate")
_CURVE_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
  """The synthetic task, and what the SFT baseline's curated safe-CoT set covers.

  A curated safe-CoT set (STAR-1 style) is small and covers part of the harm space, while RL only needs prompts:
  the baseline sees the safe chain of thought of the training harmful prompts about `baseline_substances`
  (None: every substance), at most `baseline_harmful_rows` of them (a seeded subset), plus the safe traces of
  the benign / reasoning training prompts when included (general data mixed in, as practitioners do).
  """
  seed: int = 0
  n_train: int = 1200
  n_eval: int = 200
  kind_fractions: Mapping[str, float] | None = None
  p_unsafe: float = 0.65
  p_unsafe_by_substance: Mapping[str, float] | None = None
  p_over_refusal: float = 0.15
  p_reflection: float = 0.3
  baseline_substances: tuple[str, ...] | None = None
  baseline_harmful_rows: int | None = None
  baseline_include_benign: bool = True
  baseline_include_reasoning: bool = True

  def __post_init__(self):
    bad = [s for s in self.baseline_substances or () if s not in synthetic.SUBSTANCES]
    if bad or (self.baseline_substances is not None and not self.baseline_substances):
      raise CotsafeError(f"TaskConfig.baseline_substances={self.baseline_substances!r}, expected a non-empty "
                         f"subset of {', '.join(synthetic.SUBSTANCES)} (or None for all)")
    if self.baseline_harmful_rows is not None and self.baseline_harmful_rows < 0:
      raise CotsafeError(f"TaskConfig.baseline_harmful_rows={self.baseline_harmful_rows}, expected >= 0 or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
  """The token-level safety RM's training run (the policy's reward model, not the evaluation judge)."""
  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 1e-3
  max_len: int = 96
  seq_pool: str = "max"


def _write_jsonl(path: str, rows) -> str:
  if parallel.is_main_process():
    path_lib.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
  parallel.barrier(f"demo {path}")  # the other processes read it next
  return path


def _substance(prompt: str) -> str | None:
  found = [s for s in synthetic.SUBSTANCES if re.search(rf"\b{s}\b", prompt)]
  return found[0] if found else None


def baseline_rows(task: synthetic.SyntheticTask, cfg: TaskConfig) -> tuple[list[dict], dict[str, Any]]:
  """The SFT baseline's curated set (see TaskConfig) and a description of what it covers."""
  subs = tuple(cfg.baseline_substances or synthetic.SUBSTANCES)
  harmful = [r for r in task.sft_safe if r["kind"] == "harmful"]
  covered = [r for r in harmful if _substance(r["prompt"]) in subs]
  if cfg.baseline_harmful_rows is not None and cfg.baseline_harmful_rows < len(covered):
    pick = np.random.default_rng(cfg.seed + 7).permutation(len(covered))[:cfg.baseline_harmful_rows]
    covered = [covered[i] for i in sorted(pick.tolist())]
  keep = {r["id"] for r in covered}
  rows = [r for r in task.sft_safe if r["id"] in keep or (r["kind"] == "benign" and cfg.baseline_include_benign)
          or (r["kind"] == "reasoning" and cfg.baseline_include_reasoning)]
  counts = {k: sum(r["kind"] == k for r in rows) for k in synthetic.KINDS}
  info = {"rows": len(rows), **{f"{k}_rows": n for k, n in counts.items()}, "substances": list(subs),
          "harmful_train_prompts": len(harmful),
          "harmful_eval_prompts_covered": sum(_substance(r["prompt"]) in subs for r in task.eval_prompts
                                              if r["kind"] == "harmful"),
          "harmful_eval_prompts": sum(r["kind"] == "harmful" for r in task.eval_prompts)}
  return rows, info


def _logged_curve(metrics_path: str) -> list[dict[str, float]]:
  """The eval/ points PPO logged (also those of an earlier, resumed part of the run)."""
  rows = [json.loads(line) for line in path_lib.read_text(metrics_path).splitlines() if line.strip()]
  return [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
          for r in rows if any(k.startswith("eval/") for k in r)]


def _run_stages(fns: Mapping[str, Callable[[], Any]], *, concurrent_stages: bool) -> dict[str, Any]:
  """Run independent stages; concurrently when asked: XLA runs each small program on about one core, so two
  stages use both cores of a laptop. The first stage runs in the calling thread (it keeps the trainers' SIGINT /
  SIGTERM handling), the others in daemon threads (they do not keep an interrupted demo alive). An error of any
  stage is raised once every stage has finished; an interrupt, or a stop request to the first stage, at once."""
  names = list(fns)
  results: dict[str, Any] = {}
  errors: dict[str, BaseException] = {}

  def work(name):
    try:
      results[name] = fns[name]()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other stages
      errors[name] = e

  def check(name):
    if name in errors:
      raise errors[name]
    if isinstance(results[name], Mapping) and results[name].get("stopped_early"):
      raise CotsafeError(f"demo: stage {name} stopped early (a signal); run the same command again to resume "
                         "from its checkpoint")

  if concurrent_stages:
    threads = [threading.Thread(target=work, args=(n,), name=f"demo-{n}", daemon=True) for n in names[1:]]
    for th in threads:
      th.start()
    work(names[0])
    if names[0] not in errors:
      check(names[0])  # stopped by a signal: do not wait for the others
    for th in threads:
      th.join()
  else:
    for name in names:
      work(name)
      check(name)
  for name in names:
    check(name)
  return results


def _announce(names: tuple[str, ...], concurrent_stages: bool) -> None:
  if parallel.is_main_process():
    how = "concurrently, one progress bar each" if concurrent_stages else "one after the other"
    print(f"demo: {' and '.join(names)} ({how})", flush=True)


def _describe(info: Mapping[str, Any], baseline: Mapping[str, Any], *, steps: Mapping[str, int],
              batch: Mapping[str, int], ppo: PPOConfig, samples_per_prompt: int, rl_prompts: Mapping[str, int],
              mixture: Mapping[str, float] | None) -> str:
  """The report's account of what each policy was trained on, and of the run itself."""
  drawn = f" drawn {' / '.join(f'{k} {w:g}' for k, w in mixture.items())}" if mixture else ""
  lines = [
      "", "## What each policy saw", "",
      f"- **base** (warm start): SFT from scratch, {steps['warm_start']} steps x {batch['warm_start']} rows, on a "
      "mixture where harmful prompts often get an unsafe chain of thought (the failure the method targets).",
      f"- **sft** (baseline): the warm start fine-tuned for {steps['sft_baseline']} steps x {batch['sft_baseline']} "
      f"rows on a curated safe-CoT set of {baseline['rows']} rows: {baseline['harmful_rows']} harmful prompts with a "
      f"safe chain of thought and a refusal (all about {', '.join(baseline['substances'])}; the training pool has "
      f"{baseline['harmful_train_prompts']} harmful prompts, and {baseline['harmful_eval_prompts_covered']} of the "
      f"{baseline['harmful_eval_prompts']} held-out ones are about these substances), {baseline['benign_rows']} "
      f"benign prompts with a helpful answer and {baseline['reasoning_rows']} reasoning prompts with a correct "
      "chain of thought.",
      f"- **ppo**: the warm start trained for {steps['ppo']} PPO steps x {batch['ppo']} prompts x "
      f"{samples_per_prompt} samples from the training prompt pool (" +
      ", ".join(f"{n} {k}" for k, n in rl_prompts.items()) + f"{drawn}; prompts only, no reference responses) "
      f"with {ppo.advantage.estimator} advantages and KL coefficient {ppo.kl_coef:g} to the warm start, rewarded "
      "by the token-level safety RM (trained on the span data, not the evaluation judge), answer correctness and "
      "(over-)refusal terms.",
      "", "Evaluation: greedy decoding on the held-out prompts (text-disjoint from every training set), judged by "
      "the generator's ground-truth phrase inventory.",
      "", "## Run", "",
      f"Wall time {info['total_s']:.0f} s; stage times (s): " +
      ", ".join(f"{k} {v:.0f}" for k, v in info["timings_s"].items()) +
      (" (warm_start and safety_rm ran concurrently, then sft_baseline and ppo)" if info["concurrent_stages"]
       else "") + f". Load average (1, 5, 15 min) before / after: {info['load_before']} / {info['load_after']} on "
      f"{info['cpus']} CPUs.",
  ]
  return "\n".join(lines) + "\n"


def run_demo(*, workdir: str, task: TaskConfig, policy: models.ModelConfig, rm_backbone: models.ModelConfig,
             warm: SFTConfig, baseline: SFTConfig, rm: RMConfig, ppo: PPOConfig,
             rollout: ppo_trainer.RolloutConfig, optim: ppo_trainer.OptimConfig, ppo_steps: int,
             prompts_per_step: int, reward_weights: Mapping[str, Mapping[str, float]],
             eval_max_new_tokens: int = 64, eval_batch_size: int = 40, curve_every: int = 10,
             curve_prompts: int = 60, mixture: Mapping[str, float] | None = None, reward_clip: float | None = None,
             concurrent_stages: bool = True, mesh: Any = None) -> dict[str, Any]:
  """Run every stage into `workdir`; returns the summary {"base", "sft", "ppo"}, stage timings and run facts.

  With several processes the concurrent stages run one after another: each stage's programs span every
  process's devices, and all processes must launch them in the same order."""
  mesh = mesh if mesh is not None else parallel.make_mesh()
  concurrent_stages = concurrent_stages and jax.process_count() == 1
  if path_lib.exists(os.path.join(workdir, "summary.json")) and parallel.is_main_process():
    print(f"demo: {workdir} holds an earlier run: its stages resume from their checkpoints, so the stage times "
          "below are not a fresh run's (pass a new --workdir for one)", flush=True)
  path_lib.makedirs(workdir)
  timings: dict[str, float] = {}
  load_before = [round(x, 2) for x in os.getloadavg()]
  t0 = time.perf_counter()
  lock = threading.Lock()

  def timed(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
      start = time.perf_counter()
      out = fn()
      with lock:
        timings[name] = round(time.perf_counter() - start, 2)
        if parallel.is_main_process():
          print(f"demo: {name} done ({timings[name]:.0f} s)", flush=True)
      return out
    return run

  # 1. data: the task, its tokenizer, and the SFT baseline's curated safe-CoT set
  def data():
    data_dir = os.path.join(workdir, "data")
    t = synthetic.make_task(seed=task.seed, n_train=task.n_train, n_eval=task.n_eval,
                            kind_fractions=task.kind_fractions, p_unsafe=task.p_unsafe,
                            p_unsafe_by_substance=task.p_unsafe_by_substance,
                            p_over_refusal=task.p_over_refusal, p_reflection=task.p_reflection)
    files = {f: os.path.join(data_dir, n) for f, n in synthetic.TASK_FILES.items()}
    files["tokenizer"] = os.path.join(data_dir, "tokenizer")
    if parallel.is_main_process():  # one writer; the task is the same on every process (seeded)
      synthetic.write_task(t, data_dir)
    parallel.barrier("demo data")
    rows, info = baseline_rows(t, task)
    files["sft_baseline"] = _write_jsonl(os.path.join(data_dir, "sft_baseline.jsonl"), rows)
    return t, files, info

  t, paths, base_info = timed("data", data)()
  tok_dir = paths["tokenizer"]
  tok = models.load_tokenizer(tok_dir, model_vocab_size=policy.vocab_size)

  # 2. warm start (SFT on a mixture where harmful prompts often get unsafe reasoning) and, independent of it,
  # 3. the token-level safety RM the policy is trained against (not the evaluation judge)
  def warm_start():
    return sft_train(workdir=os.path.join(workdir, "warm_start"), data=paths["sft_warm"], config=warm,
                     model=policy, tokenizer_dir=tok_dir, mesh=mesh, async_checkpoint=False)

  def safety_rm():
    spans = sources.load_spans(paths["safety_spans"]).rows
    order = np.random.default_rng(task.seed + 11).permutation(len(spans))
    n_eval_rm = max(len(spans) // 10, 1)
    rm_dir = os.path.join(workdir, "safety_rm")
    path_lib.makedirs(rm_dir)
    rm_train = _write_jsonl(os.path.join(rm_dir, "train_spans.jsonl"), [spans[i] for i in order[n_eval_rm:]])
    rm_eval = _write_jsonl(os.path.join(rm_dir, "eval_spans.jsonl"), [spans[i] for i in order[:n_eval_rm]])
    return train_safety_rm(backbone=rm_backbone, train_path=rm_train, eval_path=rm_eval, workdir=rm_dir,
                           steps=rm.steps, batch_size=rm.batch_size, learning_rate=rm.learning_rate,
                           max_len=rm.max_len, tokenizer_dir=tok_dir, seq_pool=rm.seq_pool, seed=task.seed,
                           mesh=mesh)

  _announce(("warm_start", "safety_rm"), concurrent_stages)
  out = _run_stages({"warm_start": timed("warm_start", warm_start), "safety_rm": timed("safety_rm", safety_rm)},
                    concurrent_stages=concurrent_stages)
  warm_dir, rm_out = out["warm_start"]["hf_dir"], out["safety_rm"]
  steps = {"warm_start": out["warm_start"]["num_steps"]}
  scorer = load_safety_rm(rm_out["export_dir"], mesh=mesh, seq_pool=rm.seq_pool)

  # 4. the baseline (SFT of the warm start on the curated safe-CoT set) and, independently,
  # 5. PPO from the warm start with token-level safety penalties, correctness and over-refusal terms
  judge = eval_lib.SyntheticJudge()
  eval_rows = list(t.eval_prompts)
  curve_rows = eval_rows[:curve_prompts]
  start_point: list[dict[str, float]] = []
  eval_kw = dict(judge=judge, max_new_tokens=eval_max_new_tokens, batch_size=eval_batch_size,
                 max_prompt_len=rollout.max_prompt_len, mesh=mesh)

  def curve_point(cfg, params, tokenizer) -> dict[str, float]:
    res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tokenizer, rows=curve_rows, **eval_kw)
    return {f"eval/{k}": res.summary[k] for k in _CURVE_KEYS if res.summary.get(k) is not None}

  def on_step(step, cfg, params, tokenizer):  # logged to ppo/metrics.jsonl, where the curve is read back
    return curve_point(cfg, params, tokenizer) if step % curve_every == 0 or step == ppo_steps else {}

  def sft_baseline():
    return sft_train(workdir=os.path.join(workdir, "sft_baseline"), data=paths["sft_baseline"], config=baseline,
                     init_from=warm_dir, tokenizer_dir=tok_dir, mesh=mesh, async_checkpoint=False)

  def run_ppo():
    cfg, params = models.load_hf(warm_dir, mesh=mesh)
    start_point.append({"step": 0, **curve_point(cfg, params, tok)})  # where PPO starts
    reward = CompositeReward(weights=reward_weights, token_safety=scorer, sequence_safety=scorer,
                             sequence_part="reasoning", clip=reward_clip)
    return ppo_trainer.train(
        workdir=os.path.join(workdir, "ppo"), policy=ppo_trainer.PolicySpec(hf_dir=warm_dir, tokenizer_dir=tok_dir),
        reward=reward, prompts=paths["train_prompts"], ppo=ppo, rollout=rollout, optim=optim, num_steps=ppo_steps,
        prompts_per_step=prompts_per_step, mixture=mixture, mesh=mesh, seed=task.seed, async_checkpoint=False,
        save_interval_steps=max(ppo_steps, 1), step_callback=on_step, samples_every=max(ppo_steps // 4, 1))

  _announce(("ppo", "sft_baseline"), concurrent_stages)
  out = _run_stages({"ppo": timed("ppo", run_ppo), "sft_baseline": timed("sft_baseline", sft_baseline)},
                    concurrent_stages=concurrent_stages)
  sft_dir, ppo_dir = out["sft_baseline"]["hf_dir"], out["ppo"]["hf_dir"]
  steps.update(sft_baseline=out["sft_baseline"]["num_steps"], ppo=out["ppo"]["step"])

  # 6. evaluate the three policies on the held-out prompts with the generator's ground truth
  def evaluate():
    reports, summaries, entropies = {}, {}, {}
    for name, hf_dir in (("base", warm_dir), ("sft", sft_dir), ("ppo", ppo_dir)):
      cfg, params = models.load_hf(hf_dir, mesh=mesh)
      res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tok, rows=eval_rows, **eval_kw)
      reports[name], summaries[name], entropies[name] = res.report, res.summary, res.entropies
      eval_lib.write_samples(os.path.join(workdir, f"samples_{name}.jsonl"), res.samples)
    return reports, summaries, entropies

  reports, summaries, entropies = timed("evaluate", evaluate)()
  if not summaries:
    raise CotsafeError("demo: no policy was evaluated")
  curve = start_point + _logged_curve(os.path.join(workdir, "ppo", "metrics.jsonl"))
  table = eval_lib.write_report(workdir, eval_lib.summary_of(reports), curves={"ppo": curve},
                                entropies=entropies, title="cotsafe_jax CPU demo: Beyond SFT in miniature")
  rl_kinds = [r["kind"] for r in t.train_prompts]
  info = {"timings_s": {k: timings[k] for k in STAGES if k in timings}, "total_s": round(time.perf_counter() - t0, 1),
          "concurrent_stages": concurrent_stages, "load_before": load_before,
          "load_after": [round(x, 2) for x in os.getloadavg()], "cpus": len(os.sched_getaffinity(0)),
          "baseline": base_info,
          "rm_eval": {k: rm_out[k] for k in rm_out if k.startswith(("token_", "seq", "auroc"))}}
  if parallel.is_main_process():
    path_lib.write_text(os.path.join(workdir, "demo_info.json"), json.dumps(info, indent=2, default=float))
    report = os.path.join(workdir, "report.md")
    path_lib.write_text(report, path_lib.read_text(report) + _describe(
        info, base_info, steps=steps, ppo=ppo, samples_per_prompt=rollout.samples_per_prompt,
        batch={"warm_start": warm.batch_size, "sft_baseline": baseline.batch_size, "ppo": prompts_per_step},
        rl_prompts={k: rl_kinds.count(k) for k in synthetic.KINDS}, mixture=mixture))
    print(table)
    print(f"demo: total {info['total_s']:.0f} s; stage times {info['timings_s']}")
  return {"summary": summaries, **info}
