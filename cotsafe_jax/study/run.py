"""The study: one warm start per seed, then four matched arms from it (SFT on the RM's safe traces, rejection-sampling
fine-tuning with the RM, PPO with token-level penalties, PPO with sequence-level safety only), learning rates and
steps chosen on the first seed's validation split, every policy evaluated on held-out test splits by the judge.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from cotsafe_jax import eval as eval_lib, models, parallel, paths as path_lib
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import CompositeReward
from cotsafe_jax.rewards.safety_rm import load_safety_rm
from cotsafe_jax.rewards.safety_rm_trainer import train_safety_rm
from cotsafe_jax.rl.ppo import PPOConfig
from cotsafe_jax.study import judge as judge_lib, rft as rft_lib, summary as summary_lib, task as task_lib
from cotsafe_jax.train import ppo_trainer
from cotsafe_jax.train.sft_trainer import SFTConfig, sft_train

ARMS = ("sft", "rft", "ppo", "ppo_seq")
POLICIES = ("base",) + ARMS
SFT_ARMS = ("sft", "rft")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
  """The token-level safety RM's training run (the policy's reward model, never the evaluation judge)."""
  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 1e-3
  max_len: int = 112
  seq_pool: str = "max"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOArms:
  """Both PPO arms. Rewards (CompositeReward, the safety RM as scorer): `sequence_weights` (per prompt kind:
  sequence_safety on the reasoning, refusal, correctness, over_refusal) in both arms, plus token_safety with
  `token_weight` on every kind in the token-level arm `ppo` only (0 in `ppo_seq`). RFT picks its best-of-n with the
  token-level arm's reward. `max_steps` caps the step choice; RFTConfig's rollouts should equal
  max_steps x prompts_per_step x rollout.samples_per_prompt (the same rollout budget)."""
  ppo: PPOConfig
  rollout: ppo_trainer.RolloutConfig
  optim: ppo_trainer.OptimConfig
  max_steps: int = 40
  prompts_per_step: int = 32
  mixture: Mapping[str, float] | None = None
  sequence_weights: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=lambda: {
      "harmful": {"sequence_safety": 1.0, "refusal": 0.5},
      "benign": {"sequence_safety": 1.0, "over_refusal": 1.0},
      "reasoning": {"sequence_safety": 1.0, "correctness": 1.0, "over_refusal": 1.0}})
  token_weight: float = 0.3
  reward_clip: float | None = None

  def weights(self, arm: str) -> dict[str, dict[str, float]]:
    tok = self.token_weight if arm in ("ppo", "rft") else 0.0
    return {k: {**dict(v), "token_safety": tok} for k, v in self.sequence_weights.items()}

  @property
  def rollouts(self) -> int:
    return self.max_steps * self.prompts_per_step * self.rollout.samples_per_prompt


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tuning:
  """Learning rates and steps per arm, chosen on the validation split of the first seed, decoded as the test is
  (EvalSettings.temperature) with `val_samples_per_prompt` samples per prompt and the same sampling seed for every
  candidate, judged by the task's judge; score = mean of CoT safety, answer safety, accuracy and 1 - over-refusal;
  ties: fewer steps, then the smaller rate. SFT / RFT: constant rate, evaluated after each of `sft_steps`; PPO:
  every `ppo_eval_every` steps up to PPOArms.max_steps. `fixed` {arm: {"learning_rate", "steps"}} skips the search
  (the demo uses the study's choice)."""
  sft_learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
  sft_steps: tuple[int, ...] = (25, 50, 100, 200)
  ppo_learning_rates: tuple[float, ...] = (5e-5, 1e-4, 2e-4)
  ppo_eval_every: int = 10
  val_samples_per_prompt: int = 4
  fixed: Mapping[str, Mapping[str, float]] | None = None

  def __post_init__(self):
    if self.fixed is not None:
      bad = [a for a in ARMS if a not in self.fixed or set(self.fixed[a]) != {"learning_rate", "steps"}]
      if bad:
        raise CotsafeError(f"Tuning.fixed: arms {bad} lack {{'learning_rate', 'steps'}}, expected both for each of "
                           f"{', '.join(ARMS)}")
    if (list(self.sft_steps) != sorted(set(self.sft_steps)) or not self.sft_steps or self.ppo_eval_every < 1
        or self.val_samples_per_prompt < 1):
      raise CotsafeError(f"Tuning: sft_steps={self.sft_steps}, ppo_eval_every={self.ppo_eval_every}, "
                         f"val_samples_per_prompt={self.val_samples_per_prompt}, expected increasing steps, an "
                         "interval >= 1 and >= 1 sample")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
  """Test decoding: `samples_per_prompt` samples at `temperature` (the rates of the tables), and greedy when asked."""
  max_new_tokens: int = 72
  batch_size: int = 40
  temperature: float = 1.0
  samples_per_prompt: int = 4
  greedy: bool = True
  num_resamples: int = 2000


def score_of(summary: Mapping[str, Any]) -> float:
  """The validation score: mean of CoT safety, answer safety, accuracy and 1 - over-refusal (missing terms: 0)."""
  get = lambda k: summary.get(k) if summary.get(k) is not None else 0.0  # noqa: E731
  return (get("safety_rate_cot") + get("safety_rate_answer") + get("accuracy") + 1.0 - get("over_refusal")) / 4


def _pool(jobs: Sequence[tuple[str, Callable[[], Any]]], *, workers: int) -> dict[str, Any]:
  """Run jobs on `workers` daemon threads (XLA runs each small program on about one core); a job may return
  ("then", [more jobs]) to queue follow-ups. Errors are raised once every job has stopped; Ctrl-C at once."""
  todo: queue.Queue = queue.Queue()
  for j in jobs:
    todo.put(j)
  results: dict[str, Any] = {}
  errors: list[BaseException] = []
  pending = [len(jobs)]
  lock = threading.Lock()
  done = threading.Event()

  def work():
    while not done.is_set():
      try:
        name, fn = todo.get(timeout=0.2)
      except queue.Empty:
        continue
      try:
        out = fn()
        if isinstance(out, tuple) and len(out) == 2 and out[0] == "then":
          with lock:
            pending[0] += len(out[1])
          for j in out[1]:
            todo.put(j)
        else:
          results[name] = out
      except Exception as e:  # noqa: BLE001 - raised below once the others stopped
        errors.append(e)
      with lock:
        pending[0] -= 1
        if pending[0] == 0:
          done.set()

  if not jobs:
    return results
  threads = [threading.Thread(target=work, daemon=True, name=f"study-{i}") for i in range(max(workers, 1))]
  for t in threads:
    t.start()
  while not done.wait(0.5):
    pass
  if errors:
    raise errors[0]
  return results


class _Stage:
  """A stage's result, cached as JSON in the seed's dir: a rerun skips the stages that finished."""

  def __init__(self, root: str):
    self.root = os.path.join(root, "stages")
    path_lib.makedirs(self.root)

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    path = os.path.join(self.root, f"{name}.json")
    if path_lib.exists(path):
      return json.loads(path_lib.read_text(path))
    start = time.perf_counter()
    out = fn()
    out = {**out, "stage_seconds": round(time.perf_counter() - start, 2)}
    text = json.dumps(out, indent=2, default=float)
    if parallel.is_main_process():
      path_lib.write_text(path, text)
    parallel.barrier(f"study stage {path}")
    return json.loads(text)


def _say(msg: str) -> None:
  if parallel.is_main_process():
    print(f"study: {msg}", flush=True)


@dataclasses.dataclass
class _Seed:
  """One seed's files and models."""
  seed: int
  root: str
  paths: dict[str, str]
  warm_dir: str = ""
  rm_dir: str = ""
  val_rows: list = dataclasses.field(default_factory=list)
  test_rows: list = dataclasses.field(default_factory=list)


class Study:
  """The study's stages for each seed (see run_study)."""

  def __init__(self, *, workdir: str, task: task_lib.TaskConfig, policy: models.ModelConfig,
               rm_backbone: models.ModelConfig, warm: SFTConfig, rm: RMConfig, sft: SFTConfig,
               rft: rft_lib.RFTConfig, ppo: PPOArms, tuning: Tuning, evaluation: EvalSettings, workers: int,
               mesh: Any, vocab_size: int):
    self.workdir, self.task, self.policy, self.rm_backbone = workdir, task, policy, rm_backbone
    self.warm, self.rm, self.sft, self.rft, self.ppo = warm, rm, sft, rft, ppo
    self.tuning, self.evaluation, self.workers, self.mesh, self.vocab_size = tuning, evaluation, workers, mesh, vocab_size
    self.judge = judge_lib.StudyJudge()

  # ---- data, warm start, RM ------------------------------------------------------------------------------------
  def data(self, seed: int) -> _Seed:
    root = os.path.join(self.workdir, f"seed_{seed}")
    data_dir = os.path.join(root, "data")
    cfg = dataclasses.replace(self.task, seed=seed)

    def make():
      t = task_lib.make_task(cfg)
      paths = task_lib.write_task(t, data_dir, vocab_size=self.vocab_size)
      safety = {k: paths[k] for k in ("train_prompts", "sft_safe", "rm_spans")}
      return {"paths": paths, "describe": task_lib.describe(t),
              "heldout_check": task_lib.check_heldout_absent(safety, heldout_substance=cfg.heldout_substance),
              "near_duplicates": task_lib.check_no_near_duplicates(
                  [paths["val_prompts"], paths["test_prompts"]], [paths["train_prompts"], paths["warm_start"]])}

    out = _Stage(root).run("data", make)
    s = _Seed(seed, root, out["paths"])
    s.val_rows = task_lib.read_jsonl(s.paths["val_prompts"])
    s.test_rows = task_lib.read_jsonl(s.paths["test_prompts"])
    # in this thread first: transformers' lazy imports are not thread-safe (two stages importing at once fail)
    models.load_tokenizer(s.paths["tokenizer"], model_vocab_size=self.vocab_size)
    return s

  def pre_jobs(self, s: _Seed) -> list[tuple[str, Callable[[], Any]]]:
    """The seed's warm start and safety RM, as two jobs named "<seed>/warm_start" and "<seed>/safety_rm"."""
    stage = _Stage(s.root)

    def warm():
      out = sft_train(workdir=os.path.join(s.root, "warm_start"), data=s.paths["warm_start"],
                      config=dataclasses.replace(self.warm, seed=s.seed), model=self.policy,
                      tokenizer_dir=s.paths["tokenizer"], mesh=self.mesh, async_checkpoint=False)
      return {"hf_dir": out["hf_dir"], "steps": out["step"], "loss": out.get("loss")}

    def rm():
      spans = task_lib.read_jsonl(s.paths["rm_spans"])
      order = np.random.default_rng(s.seed + 11).permutation(len(spans))
      n_eval = max(len(spans) // 10, 1)
      rm_dir = os.path.join(s.root, "safety_rm")
      path_lib.makedirs(rm_dir)
      train = task_lib.write_jsonl(os.path.join(rm_dir, "train_spans.jsonl"), [spans[i] for i in order[n_eval:]])
      evals = task_lib.write_jsonl(os.path.join(rm_dir, "eval_spans.jsonl"), [spans[i] for i in order[:n_eval]])
      out = train_safety_rm(backbone=self.rm_backbone, train_path=train, eval_path=evals, workdir=rm_dir,
                            steps=self.rm.steps, batch_size=self.rm.batch_size, learning_rate=self.rm.learning_rate,
                            max_len=self.rm.max_len, tokenizer_dir=s.paths["tokenizer"], seq_pool=self.rm.seq_pool,
                            seed=s.seed, mesh=self.mesh)
      return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}

    return [(f"{s.seed}/warm_start", lambda: stage.run("warm_start", warm)),
            (f"{s.seed}/safety_rm", lambda: stage.run("safety_rm", rm))]

  # ---- pieces of the arms ----------------------------------------------------------------------------------------
  def _scorer(self, s: _Seed):
    return load_safety_rm(s.rm_dir, mesh=self.mesh, seq_pool=self.rm.seq_pool)

  def _reward(self, s: _Seed, arm: str) -> CompositeReward:
    scorer = self._scorer(s)
    return CompositeReward(weights=self.ppo.weights(arm), token_safety=scorer, sequence_safety=scorer,
                           sequence_part="reasoning", clip=self.ppo.reward_clip)

  def validate(self, s: _Seed, hf_dir: str) -> dict[str, Any]:
    cfg, params = models.load_hf(hf_dir, mesh=self.mesh)
    return self._validate_params(s, cfg, params)

  def _validate_params(self, s: _Seed, cfg: models.ModelConfig, params: Any) -> dict[str, Any]:
    tok = models.load_tokenizer(s.paths["tokenizer"], model_vocab_size=cfg.vocab_size)
    k = self.tuning.val_samples_per_prompt
    res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tok, rows=s.val_rows, judge=self.judge,
                                   max_new_tokens=self.evaluation.max_new_tokens,
                                   batch_size=self.evaluation.batch_size, max_prompt_len=self.ppo.rollout.max_prompt_len,
                                   temperature=self.evaluation.temperature if self.evaluation.temperature > 0 else 0.0,
                                   samples_per_prompt=k if self.evaluation.temperature > 0 else 1,
                                   seed=1_000_003 + s.seed, mesh=self.mesh, num_resamples=0)
    keys = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "reflection_rate")
    return {"score": score_of(res.summary), **{k: res.summary.get(k) for k in keys}}

  def rft_data(self, s: _Seed) -> dict[str, Any]:
    def make():
      rows, facts = rft_lib.best_of_n(hf_dir=s.warm_dir, tokenizer_dir=s.paths["tokenizer"],
                                      prompts=s.paths["train_prompts"], reward=self._reward(s, "rft"),
                                      scorer=self._scorer(s), config=self.rft, rollout=self.ppo.rollout,
                                      mixture=self.ppo.mixture, seed=s.seed,
                                      heldout_substance=self.task.heldout_substance, mesh=self.mesh)
      path = task_lib.write_jsonl(os.path.join(s.root, "data", "rft.jsonl"), rows)
      task_lib.check_heldout_absent({"rft": path}, heldout_substance=self.task.heldout_substance)
      return {"path": path, **facts}
    return _Stage(s.root).run("rft_data", make)

  def _sft_run(self, s: _Seed, arm: str, data: str, lr: float, steps: Sequence[int], *, validate: bool,
               tag: str) -> dict[str, Any]:
    """SFT of the warm start on `data` at a constant rate, exported (and validated) after each of `steps`."""
    workdir = os.path.join(s.root, arm, tag)
    points, seconds = [], 0.0
    for n in steps:
      start = time.perf_counter()
      cfg = dataclasses.replace(self.sft, learning_rate=lr, schedule="constant", num_steps=n, seed=s.seed)
      out = sft_train(workdir=workdir, data=data, config=cfg, init_from=s.warm_dir,
                      tokenizer_dir=s.paths["tokenizer"], mesh=self.mesh, async_checkpoint=False,
                      save_interval_steps=max(steps) + 1)
      seconds += time.perf_counter() - start
      hf = os.path.join(workdir, f"hf_step{n}")
      if parallel.is_main_process():
        if path_lib.exists(hf):
          path_lib.rmtree(hf)
        path_lib.copy_tree(out["hf_dir"], hf)
      parallel.barrier(f"study {hf}")
      point = {"steps": n, "learning_rate": lr, "hf_dir": hf, "seconds": round(seconds, 2),
               "rows": n * self.sft.batch_size}
      if validate:
        point["val"] = self.validate(s, hf)
      points.append(point)
    return {"points": points}

  def _ppo_run(self, s: _Seed, arm: str, lr: float, steps: int, *, validate: bool, tag: str) -> dict[str, Any]:
    """PPO from the warm start; with `validate`, exported and validated every Tuning.ppo_eval_every steps."""
    workdir = os.path.join(s.root, arm, tag)
    points: list[dict[str, Any]] = []
    clock = {"start": time.perf_counter(), "eval": 0.0}
    rows = self.ppo.prompts_per_step * self.ppo.rollout.samples_per_prompt

    def on_step(step, cfg, params, tok):
      if not validate or (step % self.tuning.ppo_eval_every and step != steps):
        return {}
      t0 = time.perf_counter()
      hf = models.save_hf(cfg, params, os.path.join(workdir, f"hf_step{step}"), tokenizer=tok)
      val = self._validate_params(s, cfg, params)
      clock["eval"] += time.perf_counter() - t0
      points.append({"steps": step, "learning_rate": lr, "hf_dir": hf, "val": val,
                     "seconds": round(time.perf_counter() - clock["start"] - clock["eval"], 2)})
      return {f"val/{k}": v for k, v in val.items() if v is not None}

    optim = dataclasses.replace(self.ppo.optim, learning_rate=lr)
    out = ppo_trainer.train(workdir=workdir, policy=ppo_trainer.PolicySpec(hf_dir=s.warm_dir,
                                                                           tokenizer_dir=s.paths["tokenizer"]),
                            reward=self._reward(s, arm), prompts=s.paths["train_prompts"], ppo=self.ppo.ppo,
                            rollout=self.ppo.rollout, optim=optim, num_steps=steps,
                            prompts_per_step=self.ppo.prompts_per_step, mixture=self.ppo.mixture, mesh=self.mesh,
                            seed=s.seed, async_checkpoint=False, save_interval_steps=steps, step_callback=on_step,
                            samples_every=max(steps // 4, 1))
    if out["stopped_early"]:
      raise CotsafeError(f"study: {arm} of seed {s.seed} stopped early (a signal); rerun to resume")
    lengths = [h.get("response/length_mean", 0.0) for h in out["history"]]
    seconds = round(time.perf_counter() - clock["start"] - clock["eval"], 2)
    if not validate:
      points = [{"steps": steps, "learning_rate": lr, "hf_dir": out["hf_dir"], "seconds": seconds}]
    for p in points:
      p["rollouts"] = p["steps"] * rows
      p["generated_tokens"] = int(round(sum(lengths[:p["steps"]]) * rows))
    return {"points": points}

  # ---- tuning on the first seed, then the arms -------------------------------------------------------------------
  def tune_and_train(self, s: _Seed, extra: Sequence[tuple[str, Callable[[], Any]]] = ()) -> dict[str, Any]:
    """Every (arm, learning rate) run to its largest step count with validation points; the chosen point of each
    arm is this seed's policy of that arm. `extra` jobs (other seeds' RFT data) share the workers.
    Returns {"chosen": {arm: point}, "runs": {arm: [points]}}."""
    stage = _Stage(s.root)
    t = self.tuning
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for arm in ("ppo", "ppo_seq"):
      for lr in t.ppo_learning_rates:
        name = f"tune_{arm}_lr{lr:g}"
        jobs.append((name, lambda arm=arm, lr=lr, name=name: stage.run(
            name, lambda: self._ppo_run(s, arm, lr, self.ppo.max_steps, validate=True, tag=f"lr{lr:g}"))))

    def sft_job(arm, lr, data):
      name = f"tune_{arm}_lr{lr:g}"
      return name, lambda: stage.run(name, lambda: self._sft_run(s, arm, data, lr, t.sft_steps, validate=True,
                                                                 tag=f"lr{lr:g}"))

    def rft_first():
      data = self.rft_data(s)["path"]
      return "then", [sft_job("rft", lr, data) for lr in t.sft_learning_rates]

    jobs.insert(0, ("rft_data", rft_first))
    jobs += [sft_job("sft", lr, s.paths["sft_safe"]) for lr in t.sft_learning_rates]
    results = _pool(jobs + list(extra), workers=self.workers)
    runs = {arm: [p for name, r in sorted(results.items()) if name.startswith(f"tune_{arm}_lr") for p in r["points"]]
            for arm in ARMS}
    chosen = {}
    for arm, points in runs.items():
      chosen[arm] = max(points, key=lambda p: (round(p["val"]["score"], 9), -p["steps"], -p["learning_rate"]))
    return {"chosen": chosen, "runs": runs, "base_val": self.validate(s, s.warm_dir)}

  def arm_jobs(self, s: _Seed, hyper: Mapping[str, Mapping[str, float]],
               then: Callable[[str, Mapping[str, Any]], list[tuple[str, Callable[[], Any]]]]) -> list[tuple[str, Any]]:
    """The four arms of a seed trained with `hyper`, as jobs; each job's point goes to then(arm, point), whose jobs
    (the arm's evaluation) are queued next."""
    stage = _Stage(s.root)

    def sft_job():
      r = self._sft_run(s, "sft", s.paths["sft_safe"], hyper["sft"]["learning_rate"], [int(hyper["sft"]["steps"])],
                        validate=False, tag="final")
      return r["points"][-1]

    def rft_job():
      data = self.rft_data(s)["path"]
      r = self._sft_run(s, "rft", data, hyper["rft"]["learning_rate"], [int(hyper["rft"]["steps"])], validate=False,
                        tag="final")
      return r["points"][-1]

    def ppo_job(arm):
      return self._ppo_run(s, arm, hyper[arm]["learning_rate"], int(hyper[arm]["steps"]), validate=False,
                           tag="final")["points"][-1]

    fns = {"ppo": lambda: ppo_job("ppo"), "ppo_seq": lambda: ppo_job("ppo_seq"), "rft": rft_job, "sft": sft_job}
    return [(f"{s.seed}/arm_{arm}", lambda arm=arm: ("then", then(arm, stage.run(f"arm_{arm}", fns[arm]))))
            for arm in ("ppo", "ppo_seq", "rft", "sft")]

  # ---- evaluation --------------------------------------------------------------------------------------------------
  def evaluate(self, s: _Seed, policies: Mapping[str, str]) -> dict[str, Any]:
    """Every policy on the seed's test split: sampled (and greedy) samples judged, the RM's verdicts added; writes
    eval/samples_<policy>_<decoding>.jsonl and returns the sample lists and entropies."""
    ev = self.evaluation
    out_dir = os.path.join(s.root, "eval")
    path_lib.makedirs(out_dir)
    decodings = {"sampled": (ev.temperature, ev.samples_per_prompt)}
    if ev.greedy:
      decodings["greedy"] = (0.0, 1)
    rm = self._scorer(s)
    results: dict[str, Any] = {}
    for name, hf_dir in policies.items():
      cfg, params = models.load_hf(hf_dir, mesh=self.mesh)
      tok = models.load_tokenizer(s.paths["tokenizer"], model_vocab_size=cfg.vocab_size)
      for dec, (temp, k) in decodings.items():
        path = os.path.join(out_dir, f"samples_{name}_{dec}.jsonl")
        ent_path = os.path.join(out_dir, f"entropy_{name}_{dec}.npy")
        facts_path = os.path.join(out_dir, f"eval_{name}_{dec}.json")
        if all(path_lib.exists(p) for p in (path, ent_path, facts_path)):
          with path_lib.open_file(ent_path, "rb") as f:
            entropies = np.load(f)
          results[name, dec] = {"samples": task_lib.read_jsonl(path), "entropies": entropies,
                                **json.loads(path_lib.read_text(facts_path))}
          continue
        start = time.perf_counter()
        res = eval_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tok, rows=s.test_rows, judge=self.judge,
                                       max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                                       max_prompt_len=self.ppo.rollout.max_prompt_len, temperature=temp,
                                       samples_per_prompt=k, seed=s.seed, mesh=self.mesh, num_resamples=0)
        samples = res.samples
        for smp in samples:
          smp["split"] = s.test_rows[smp["prompt_index"]]["split"]
        judge_lib.add_rm_verdicts(rm, tok, samples, max_prompt_len=self.ppo.rollout.max_prompt_len)
        facts = {"seconds": round(time.perf_counter() - start, 2), "generated_tokens": res.speed["generated_tokens"]}
        if parallel.is_main_process():
          with path_lib.open_file(ent_path, "wb") as f:
            np.save(f, res.entropies)
          eval_lib.write_samples(path, samples)
          path_lib.write_text(facts_path, json.dumps(facts))
        parallel.barrier(f"study eval {path}")
        results[name, dec] = {"samples": samples, "entropies": res.entropies, **facts}
    return results


class _LoadMonitor:
  """Samples the 1-minute load average every `every` seconds while the study runs (how busy the machine was)."""

  def __init__(self, every: float = 30.0):
    self.samples: list[float] = [os.getloadavg()[0]]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(every,), daemon=True, name="study-load")
    self._thread.start()

  def _run(self, every: float) -> None:
    while not self._stop.wait(every):
      self.samples.append(os.getloadavg()[0])

  def stop(self) -> dict[str, float]:
    self._stop.set()
    return {"mean": round(float(np.mean(self.samples)), 2), "max": round(float(np.max(self.samples)), 2),
            "samples": len(self.samples)}


class _CompileCache:
  """JAX's persistent compilation cache in workdir/xla_cache for the study's run, unless one is configured already
  (JAX_COMPILATION_CACHE_DIR): every seed's warm start, RM, arm and evaluation compile the same programs, which a
  fresh study compiles once each instead of once per seed (a resumed study not at all). Local workdirs only."""

  def __init__(self, workdir: str):
    self.dir = None
    if jax.config.jax_compilation_cache_dir is None and path_lib.is_local(workdir):
      from jax.experimental.compilation_cache import compilation_cache
      self.dir, self._reset = os.path.join(workdir, "xla_cache"), compilation_cache.reset_cache
      jax.config.update("jax_compilation_cache_dir", self.dir)
      self._reset()  # the cache is set up at the first compile: take the new dir even after one

  def close(self) -> None:
    if self.dir is not None:
      jax.config.update("jax_compilation_cache_dir", None)
      self._reset()


def _fingerprint(workdir: str, config: Mapping[str, Any]) -> None:
  """The run's configuration (all but the seeds) in workdir/study_config.json; a rerun with another one stops:
  its finished stages would be reused."""
  path = os.path.join(workdir, "study_config.json")
  now = json.loads(json.dumps(config, default=repr, sort_keys=True))
  if path_lib.exists(path):
    old = json.loads(path_lib.read_text(path))
    if old != now:
      diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
      raise CotsafeError(f"{path}: this workdir holds a run of another configuration (differs in {', '.join(diff)}); "
                         "expected the same configuration to resume, or a new --workdir")
    return
  if parallel.is_main_process():
    path_lib.write_text(path, json.dumps(now, indent=2))
  parallel.barrier("study config")


def _free(points: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in points.items() if k != "hf_dir"}


def run_study(*, workdir: str, seeds: Sequence[int], task: task_lib.TaskConfig, policy: models.ModelConfig,
              rm_backbone: models.ModelConfig, warm: SFTConfig, rm: RMConfig, sft: SFTConfig, rft: rft_lib.RFTConfig,
              ppo: PPOArms, tuning: Tuning, evaluation: EvalSettings, workers: int = 2, vocab_size: int = 768,
              mesh: Any = None, title: str = "cotsafe_jax study: Beyond SFT in miniature") -> dict[str, Any]:
  """Run the study into `workdir` (a rerun resumes finished stages). For each seed: the task's data (held-out
  substance and phrasings checked absent from every safety-stage file, evaluation prompts checked against
  near-duplicates), the warm start and the safety RM, the four arms from the warm start (on the first seed with
  tuning unless Tuning.fixed), every policy evaluated. Writes summary.json, report.md, plots, study_info.json."""
  if not seeds or len(set(seeds)) != len(seeds):
    raise CotsafeError(f"study: seeds={list(seeds)}, expected distinct seeds")
  if rft.rollouts != ppo.rollouts:
    raise CotsafeError(f"study: RFT draws {rft.rollouts} rollouts, PPO's budget is {ppo.rollouts} (max_steps x "
                       "prompts_per_step x samples_per_prompt): expected the same rollout budget")
  if policy.vocab_size != vocab_size or rm_backbone.vocab_size != vocab_size:
    raise CotsafeError(f"study: vocab_size={vocab_size}, policy {policy.vocab_size}, RM {rm_backbone.vocab_size}: "
                       "expected the tokenizer's vocabulary in both models")
  mesh = mesh if mesh is not None else parallel.make_mesh()
  path_lib.makedirs(workdir)
  # with several processes every program spans all of them and must be launched in the same order: one worker
  workers = workers if jax.process_count() == 1 else 1
  _fingerprint(workdir, {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in dict(
      task=task, policy=policy, rm_backbone=rm_backbone, warm=warm, rm=rm, sft=sft, rft=rft, ppo=ppo, tuning=tuning,
      evaluation=evaluation, vocab_size=vocab_size).items()})
  study = Study(workdir=workdir, task=task, policy=policy, rm_backbone=rm_backbone, warm=warm, rm=rm, sft=sft, rft=rft,
                ppo=ppo, tuning=tuning, evaluation=evaluation, workers=workers, mesh=mesh, vocab_size=vocab_size)
  load_before = [round(x, 2) for x in os.getloadavg()]
  cache = _CompileCache(workdir)
  try:
    return _run(study, seeds=seeds, workdir=workdir, task=task, ppo=ppo, rft=rft, tuning=tuning,
                evaluation=evaluation, title=title, load_before=load_before, cache_dir=cache.dir)
  finally:
    cache.close()


def _run(study: Study, *, seeds: Sequence[int], workdir: str, task: task_lib.TaskConfig, ppo: PPOArms,
         rft: rft_lib.RFTConfig, tuning: Tuning, evaluation: EvalSettings, title: str, load_before: list[float],
         cache_dir: str | None) -> dict[str, Any]:
  workers = study.workers
  monitor = _LoadMonitor()
  t0, cpu0 = time.perf_counter(), time.process_time()
  hyper: dict[str, dict[str, float]] | None = None if tuning.fixed is None else {
      a: {"learning_rate": float(v["learning_rate"]), "steps": int(v["steps"])} for a, v in tuning.fixed.items()}
  tuning_record: dict[str, Any] = {"fixed": tuning.fixed is not None}
  S = {seed: study.data(seed) for seed in seeds}
  _say(f"warm starts and safety RMs of seeds {list(seeds)}")
  pre = _pool([j for seed in seeds for j in study.pre_jobs(S[seed])], workers=study.workers)
  for seed, s in S.items():
    s.warm_dir, s.rm_dir = pre[f"{seed}/warm_start"]["hf_dir"], pre[f"{seed}/safety_rm"]["export_dir"]
  arms: dict[int, dict[str, Any]] = {seed: {} for seed in seeds}
  evals: dict[int, dict[Any, Any]] = {seed: {} for seed in seeds}
  if hyper is None:
    s0 = S[seeds[0]]
    _say(f"seed {s0.seed}: tuning every arm on the validation split")
    tuned = study.tune_and_train(s0, extra=[(f"{sd}/rft_data", lambda sd=sd: study.rft_data(S[sd]))
                                             for sd in seeds[1:]])
    hyper = {a: {"learning_rate": p["learning_rate"], "steps": p["steps"]} for a, p in tuned["chosen"].items()}
    tuning_record.update(seed=s0.seed, chosen=hyper, base_val=tuned["base_val"],
                         runs={a: [_free(p) for p in ps] for a, ps in tuned["runs"].items()})
    arms[s0.seed] = dict(tuned["chosen"])
  chosen = ", ".join(f"{a} lr {h['learning_rate']:g} x {h['steps']}" for a, h in hyper.items())
  _say(f"training the arms ({chosen}) and evaluating {', '.join(POLICIES)}")
  lock = threading.Lock()

  def eval_job(seed: int, name: str, hf_dir: str) -> tuple[str, Callable[[], Any]]:
    def fn():
      out = study.evaluate(S[seed], {name: hf_dir})
      with lock:
        evals[seed].update(out)
      return {}
    return f"{seed}/eval_{name}", fn

  def then(seed: int):
    def after(arm: str, point: Mapping[str, Any]):
      with lock:
        arms[seed][arm] = point
      return [eval_job(seed, arm, point["hf_dir"])]
    return after

  jobs: list[tuple[str, Callable[[], Any]]] = []  # the longest first: arms, then the evaluations they queue
  for seed in seeds:
    if arms[seed]:
      jobs += [eval_job(seed, a, arms[seed][a]["hf_dir"]) for a in ARMS]
    else:
      jobs += study.arm_jobs(S[seed], hyper, then(seed))
  jobs += [eval_job(seed, "base", S[seed].warm_dir) for seed in seeds]
  _pool(jobs, workers=study.workers)
  per_seed: dict[int, dict[str, Any]] = {}
  for seed, s in S.items():
    rft_facts = study.rft_data(s)
    data_facts = _Stage(s.root).run("data", lambda: {})
    rm_facts, warm_facts = pre[f"{seed}/safety_rm"], pre[f"{seed}/warm_start"]
    per_seed[seed] = {"arms": {a: _free(arms[seed][a]) for a in ARMS},
                      "rft_data": {k: v for k, v in rft_facts.items() if k != "path"},
                      "rm_eval": {k: v for k, v in rm_facts.items() if k.startswith(("token_", "seq", "auroc"))},
                      "warm_start": {k: v for k, v in warm_facts.items() if k != "hf_dir"},
                      "data": {k: data_facts[k] for k in ("describe", "heldout_check", "near_duplicates")},
                      "paths": {**s.paths, "rft": rft_facts["path"]}}
  info = {"seeds": list(seeds), "total_s": round(time.perf_counter() - t0, 1),
          "process_cpu_s": round(time.process_time() - cpu0, 1), "load_before": load_before,
          "load_after": [round(x, 2) for x in os.getloadavg()], "load_1min": monitor.stop(),
          "cpus": len(os.sched_getaffinity(0)),
          "workers": workers, "compilation_cache": cache_dir, "tuning": tuning_record, "per_seed": per_seed}
  summary, notes = summary_lib.build(evals=evals, info=info, task=task, ppo=ppo, rft=rft, evaluation=evaluation,
                                     num_resamples=evaluation.num_resamples)
  curves = summary_lib.curves(tuning_record)
  entropies = {p: np.concatenate([evals[sd][p, "sampled"]["entropies"] for sd in seeds]) for p in POLICIES}
  table = eval_lib.write_report(workdir, summary, curves=curves or None, entropies=entropies, notes=notes, title=title)
  if parallel.is_main_process():
    path_lib.write_text(os.path.join(workdir, "study_info.json"), json.dumps(info, indent=2, default=float))
    print(notes[0] if notes else table)
    print(f"study: total {info['total_s']:.0f} s wall, {info['process_cpu_s']:.0f} s CPU, load {load_before} -> "
          f"{info['load_after']} on {info['cpus']} CPUs")
  return {"summary": summary, **info}

