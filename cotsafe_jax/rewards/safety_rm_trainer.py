"""The `train_safety_rm` job: class-weighted BCE on safety-span rows, held-out evaluation, orbax checkpoints,
export of the backbone (HF dir) and the head (safetensors + json).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from cotsafe_jax import models, paths
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import distributed, mesh as mesh_lib
from cotsafe_jax.rewards.safety_rm import (SafetyRM, check_pool, init_safety_rm, pool_probs, pooled_log_probs,
                                           token_logits)
from cotsafe_jax.rewards.safety_rm_data import Encoded, encode_file
from cotsafe_jax.train.guard import StepGuard
from cotsafe_jax.train.logging import MetricLogger
from cotsafe_jax.train.optim import make_optimizer, opt_state_shardings


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve = P(score of a random positive > a random negative), ties counting 1/2
  (the Mann-Whitney U statistic from average ranks). NaN without both classes."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  n_pos, n_neg = labels.sum(), (~labels).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0  # average 1-based rank of a tie group
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(probs: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
  pred, labels = np.asarray(probs) >= threshold, np.asarray(labels).astype(bool)
  tp, fp, fn = float((pred & labels).sum()), float((pred & ~labels).sum()), float((~pred & labels).sum())
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1, "auroc": auroc(probs, labels)}


def rm_loss(cfg: models.ModelConfig, params: dict, batch: dict[str, jax.Array], *, pos_weight: float,
            seq_pool: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token BCE (positives weighted by pos_weight) over labelled tokens + sequence BCE of the pooled response
  probability for rows that only have a sequence label; each a mean over its own count."""
  z_bt = token_logits(cfg, params, batch["tokens"], batch["mask"])
  y_bt = batch["token_labels"]
  labelled_bt = y_bt >= 0
  bce_bt = jnp.where(y_bt == 1, pos_weight * jax.nn.softplus(-z_bt), jax.nn.softplus(z_bt))
  token_loss = jnp.where(labelled_bt, bce_bt, 0.0).sum() / jnp.maximum(labelled_bt.sum(), 1)
  seq_rows_b = (batch["seq_labels"] >= 0) & ~batch["has_token_labels"]
  logp_b, log1mp_b = pooled_log_probs(z_bt, batch["response_mask"], seq_pool)
  seq_bce_b = -jnp.where(batch["seq_labels"] == 1, logp_b, log1mp_b)
  seq_loss = jnp.where(seq_rows_b, seq_bce_b, 0.0).sum() / jnp.maximum(seq_rows_b.sum(), 1)
  return token_loss + seq_loss, {"loss": token_loss + seq_loss, "token_loss": token_loss, "seq_loss": seq_loss}


def _put(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  # every process draws the same global batch and places its own devices' rows
  return {k: distributed.global_array(v, mesh_lib.batch_sharding(mesh, v.ndim, v.shape)) for k, v in batch.items()}


def evaluate_rm(rm: SafetyRM, data: Encoded, *, batch_size: int, threshold: float = 0.5) -> dict[str, float]:
  """Token precision / recall / F1 (at `threshold`) and AUROC over labelled response tokens; sequence
  accuracy of the pooled response probability over all rows."""
  probs, seq = [], []
  for start in range(0, len(data), batch_size):
    idx = np.arange(start, min(start + batch_size, len(data)))
    idx = np.pad(idx, (0, batch_size - len(idx)), mode="edge")  # one shape: one compile
    p_bt = rm.token_probs(data.tokens[idx], data.mask[idx])
    n = min(batch_size, len(data) - start)
    probs.append(p_bt[:n])
    seq.append(np.asarray(pool_probs(jnp.asarray(p_bt[:n]), jnp.asarray(data.response_mask[idx[:n]]),
                                     rm.seq_pool)))
  p_nt, seq_n = np.concatenate(probs), np.concatenate(seq)
  labelled = data.token_labels >= 0
  out = {f"token_{k}": v for k, v in binary_metrics(p_nt[labelled], data.token_labels[labelled],
                                                    threshold=threshold).items()}
  out["seq_accuracy"] = float(((seq_n >= threshold) == (data.seq_labels == 1)).mean())
  out["eval_tokens"], out["eval_rows"] = float(labelled.sum()), float(len(data))
  return out


def train_safety_rm(*, backbone: str | models.ModelConfig, train_path: Any, eval_path: Any, workdir: str,
                    steps: int, batch_size: int, learning_rate: float, max_len: int,
                    tokenizer_dir: str | None = None, pos_weight: float | None = None, seq_pool: str = "max",
                    seed: int = 0, warmup_steps: int | None = None, weight_decay: float = 0.0,
                    checkpoint_every: int = 500, log_every: int = 10,
                    columns: Mapping[str, str] | str | None = None, on_bad_row: str = "raise",
                    mesh: Mesh | None = None, stop_token_id: int | None = None, remat: str = "none",
                    max_nonfinite_steps: int = 3) -> dict[str, Any]:
  """Train the token-level safety RM; returns the held-out metrics and where the export went.

  backbone: an HF dir (loaded) or a ModelConfig (initialised with `seed`); tokenizer_dir defaults to the
  backbone dir. Data (train_path, eval_path): one file in any format data.load_spans reads (`columns`: a field
  map or preset; on_bad_row: raise | skip), a list of data.Source (weights mix the training batches), or a
  data.TrainingData. Every whole response ends with the policy's stop token (stop_token_id, default the
  tokenizer's eos), labelled safe: PPO scores it (safety_rm_data.encode_row says why). pos_weight None =
  n_negative / n_positive over the training tokens. Resumes from the latest checkpoint in workdir/checkpoints
  (the batches are a function of the step). Writes metrics.jsonl, TensorBoard events, summary.json, export/.
  The state (params and AdamW moments) is born sharded on `mesh`; remat: the backbone's rematerialisation
  (models.REMAT_POLICIES). A step with a non-finite loss or gradients changes nothing (counted, its rows
  logged); max_nonfinite_steps of them in a row stop the job.
  """
  check_pool(seq_pool)
  if steps < 1 or batch_size < 1 or max_len < 8:
    raise CotsafeError(f"train_safety_rm: steps={steps}, batch_size={batch_size}, max_len={max_len}, expected "
                       "steps >= 1, batch_size >= 1, max_len >= 8")
  if mesh is not None and batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise CotsafeError(f"train_safety_rm: batch_size={batch_size} is not a multiple of the mesh's data x fsdp "
                       f"= {mesh.shape['data'] * mesh.shape['fsdp']}")
  if tokenizer_dir is None:
    if isinstance(backbone, models.ModelConfig):
      raise CotsafeError("train_safety_rm: tokenizer_dir is required when the backbone is a ModelConfig")
    tokenizer_dir = backbone
  tokenizer = models.load_tokenizer(tokenizer_dir)
  enc = dict(max_len=max_len, columns=columns, on_bad_row=on_bad_row, stop_token_id=stop_token_id)
  train, evals = encode_file(tokenizer, train_path, **enc), encode_file(tokenizer, eval_path, **enc)
  n_pos = int((train.token_labels == 1).sum())
  n_neg = int((train.token_labels == 0).sum())
  if pos_weight is None:
    pos_weight = n_neg / n_pos if n_pos else 1.0
  rm = init_safety_rm(backbone=backbone, tokenizer=tokenizer, seed=seed, seq_pool=seq_pool, mesh=mesh)
  rm.batch_size = batch_size
  rm.cfg = cfg = rm.cfg.replace(remat=remat)
  optimizer = make_optimizer(learning_rate=learning_rate, warmup_steps=warmup_steps if warmup_steps is not None
                             else max(steps // 20, 0), total_steps=steps, weight_decay=weight_decay)
  shardings = None
  if mesh is not None:  # params born sharded; AdamW moments split like them, its step count replicated
    params_sh = jax.tree.map(lambda x: x.sharding, rm.params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rm.params)
    shardings = {"params": params_sh,
                 "opt_state": opt_state_shardings(optimizer, shapes, params_sh, mesh_lib.replicated(mesh))}
  state = {"params": rm.params,
           "opt_state": jax.jit(optimizer.init, out_shardings=shardings and shardings["opt_state"])(rm.params)}

  def train_step(state, batch):
    grads, metrics = jax.grad(lambda p: rm_loss(cfg, p, batch, pos_weight=float(pos_weight), seq_pool=seq_pool),
                              has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    metrics["grad_norm"] = optax.global_norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])  # else: a skipped step
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
    return {"params": keep(optax.apply_updates(state["params"], updates), state["params"]),
            "opt_state": keep(opt_state, state["opt_state"])}, metrics

  # the state keeps the shardings it was born with (the scoring program expects the params there; under several
  # processes jit does not move a committed array to another sharding)
  train_step = mesh_lib.OnMesh(jax.jit(train_step, out_shardings=(shardings, None) if shardings else None,
                                       donate_argnums=(0,)), mesh)
  workdir = paths.resolve(workdir)  # absolute when local; a gs:// URL as it is
  manager = ocp.CheckpointManager(paths.join(workdir, "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                                       save_interval_steps=checkpoint_every))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
  logger = MetricLogger(workdir, total_steps=steps, resume_step=start or None, postfix_keys=("loss",),
                        desc="safety_rm")
  metrics: dict[str, Any] = {}
  guard = StepGuard(workdir, job="train_safety_rm", max_nonfinite_steps=max_nonfinite_steps)
  for step in range(start, steps):
    rows = train.batch(step, batch_size=batch_size, seed=seed)
    state, metrics = train_step(state, _put(train.take(rows), mesh))
    metrics = distributed.to_host(metrics)
    metrics.update(guard.observe(step + 1, finite=float(metrics["nonfinite"]) == 0.0, loss=float(metrics["loss"]),
                                 row_ids=[train.row_name(i) for i in rows]))
    if guard.must_stop:
      logger.write(step + 1, metrics)
      manager.wait_until_finished()
      manager.close()
      raise guard.error(step + 1)
    if ((step + 1) % log_every == 0 and step + 1 < steps) or metrics["guard/skipped"]:
      logger.write(step + 1, metrics)
    if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
      manager.save(step + 1, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  manager.close()
  rm.params = state["params"]
  result: dict[str, Any] = evaluate_rm(rm, evals, batch_size=batch_size)
  result.update(pos_weight=float(pos_weight), train_rows=float(len(train)), train_unsafe_tokens=float(n_pos),
                truncated_rows=float(train.truncated + evals.truncated),
                skipped_rows=float(train.skipped + evals.skipped), steps=float(steps))
  logger.write(steps, {**distributed.to_host(metrics), **{f"eval/{k}": v for k, v in result.items()}})
  logger.close()
  export_dir = rm.export(paths.join(workdir, "export"))
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "summary.json"), json.dumps({**result, "export_dir": export_dir}, indent=2))
  return {**result, "export_dir": export_dir}
