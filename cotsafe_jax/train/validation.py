"""Validation during training, as `step_callback`s of the trainers: every `every` steps (and at the last), a
PPO policy's generations on held-out prompts judged by the evaluation (eval.evaluate_policy), or an SFT
model's loss on held-out SFT rows. Their metrics are logged under `val/` (metrics.jsonl, TensorBoard, W&B).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from cotsafe_jax import parallel, paths
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.eval import evaluate as evaluate_lib
from cotsafe_jax.parallel import mesh as mesh_lib

# per-benchmark metrics worth a curve of their own (the rest stay in validation/step_N.json)
_BENCH_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal")


def _mesh_of(params: Any) -> Any:
  """The mesh the params are sharded over (None for arrays on one device without a NamedSharding)."""
  sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
  return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _due(step: int, every: int, num_steps: int) -> bool:
  return every > 0 and (step % every == 0 or step == num_steps)


def _scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in values.items():
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      continue
    if math.isfinite(float(v)):
      out[f"{prefix}{k}"] = float(v)
  return out


class PolicyValidation:
  """PPO validation: evaluate_policy on `rows` (prompt rows, e.g. from a list of Sources) with `judge` and
  `config` (an EvalConfig), every `every` steps and at step `num_steps`. Logs val/<metric> (the summary's
  metrics) and val/<benchmark>/<metric> for the key rates; writes validation/step_N.jsonl (every sample and
  verdict) and validation/step_N.json (the report entry eval.write_report reads) in `workdir`."""

  def __init__(self, *, workdir: str, rows: Sequence[Mapping[str, Any]], judge: Any,
               config: evaluate_lib.EvalConfig, every: int, num_steps: int,
               weights: Mapping[str, float] | None = None):
    if every < 0:
      raise CotsafeError(f"eval_every={every}, expected >= 0 (0: no validation)")
    if not rows:
      raise CotsafeError("validation: no rows, expected validation sources with at least one prompt row")
    self.workdir, self.rows, self.judge, self.config = workdir, list(rows), judge, config
    self.every, self.num_steps, self.weights = every, num_steps, weights

  def __call__(self, step: int, cfg: Any, params: Any, tokenizer: Any) -> dict[str, float]:
    if not _due(step, self.every, self.num_steps):
      return {}
    start = time.perf_counter()
    res = evaluate_lib.evaluate_policy(cfg=cfg, params=params, tokenizer=tokenizer, rows=self.rows, judge=self.judge,
                                       mesh=_mesh_of(params), weights=self.weights, **self.config.kwargs())
    out = _scalars("val/", res.summary)
    for bench, entry in res.report.get("by_benchmark", {}).items():
      ms = entry["metrics"]
      out.update(_scalars(f"val/{bench}/", {k: ms[k]["value"] for k in _BENCH_KEYS if k in ms}))
    out["time/validation_s"] = time.perf_counter() - start
    if parallel.is_main_process():
      folder = paths.join(self.workdir, "validation")
      evaluate_lib.write_samples(paths.join(folder, f"step_{step}.jsonl"), res.samples)
      paths.write_text(paths.join(folder, f"step_{step}.json"),
                       json.dumps({"step": step, "report": res.report, "speed": res.speed}, indent=2, allow_nan=False))
    return out


class LossValidation:
  """SFT validation: the mean NLL and token accuracy of the assistant tokens of held-out SFT `rows` (encoded
  like the training rows: chat template, loss on assistant tokens, cut at config.max_len), every `every` steps
  and at step `num_steps`, in batches of one training micro-batch. Logs val/loss, val/token_accuracy,
  val/target_tokens. The rows are encoded at the first call (with the trainer's tokenizer)."""

  def __init__(self, *, rows: Sequence[Mapping[str, Any]], config: Any, every: int, num_steps: int,
               source: str = "validation"):
    if every < 0:
      raise CotsafeError(f"eval_every={every}, expected >= 0 (0: no validation)")
    if not rows:
      raise CotsafeError("validation: no rows, expected validation sources with at least one SFT row")
    self.rows, self.config, self.every, self.num_steps, self.source = list(rows), config, every, num_steps, source
    self._examples = self._step = None

  def _program(self, cfg: Any, mesh: Any, batch: int):
    from cotsafe_jax.train import sft_trainer

    def loss_sums(params, b):
      # num_targets=1: the loss and accuracy come back as sums over the batch's target tokens
      _, m = sft_trainer.sft_loss(cfg, params, b, num_targets=1.0, mesh=mesh, impl=self.config.logprob_impl)
      return {"nll": m["loss"], "correct": m["token_accuracy"],
              "targets": b["target_bt"][:, 1:].astype(jnp.float32).sum()}
    if mesh is None:
      return jax.jit(loss_sums), None
    rows = mesh_lib.batch_sharding(mesh, 2, (batch, self.config.max_len))
    return mesh_lib.OnMesh(jax.jit(loss_sums), mesh), rows

  def __call__(self, step: int, cfg: Any, params: Any, tokenizer: Any) -> dict[str, float]:
    if not _due(step, self.every, self.num_steps):
      return {}
    from cotsafe_jax.train import sft_trainer
    start = time.perf_counter()
    if self._examples is None:
      self._examples = sft_trainer.encode_rows(tokenizer, self.rows, max_len=self.config.max_len,
                                               truncate=self.config.truncate, source=self.source)
    ex, mesh = self._examples, _mesh_of(params)
    batch = self.config.batch_size // self.config.num_microbatches
    if self._step is None:
      self._step = self._program(cfg, mesh, batch)
    fn, sharding = self._step
    sums = {"nll": 0.0, "correct": 0.0, "targets": 0.0}
    for lo in range(0, len(self.rows), batch):
      idx = np.arange(lo, lo + batch)
      real = idx < len(self.rows)
      idx = np.where(real, idx, 0)
      b = {"tokens_bt": ex.tokens_nt[idx], "attention_bt": ex.attention_nt[idx],
           "target_bt": ex.target_nt[idx] & real[:, None]}  # filler rows: no target token
      if sharding is not None:
        b = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]) for k, v in b.items()}
      got = jax.device_get(fn(params, b))
      for k in sums:
        sums[k] += float(got[k])
    n = max(sums["targets"], 1.0)
    return {"val/loss": sums["nll"] / n, "val/token_accuracy": sums["correct"] / n,
            "val/target_tokens": sums["targets"], "time/validation_s": time.perf_counter() - start}


def compose(*callbacks: Any) -> Any:
  """One step_callback calling each given one (None skipped) and merging their metrics."""
  live = [c for c in callbacks if c is not None]
  if not live:
    return None

  def call(step, cfg, params, tokenizer):
    out: dict[str, float] = {}
    for c in live:
      out.update(c(step, cfg, params, tokenizer) or {})
    return out
  return call
