"""Evaluate a policy on prompt rows: generate (greedy by default), judge every response, summarise the rates.

The summary (SUMMARY_KEYS) is one policy's row of summary.json / report.md; samples are samples.jsonl rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from cotsafe_jax import models, parallel, rollout
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.eval import analysis
from cotsafe_jax.eval.safety import KINDS, Judge, VERDICT_KEYS, check_rows
from cotsafe_jax.train import ppo_trainer

SUMMARY_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "entropy_cot",
                "reflection_rate", "n") + tuple(f"n_{k}" for k in KINDS)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """summary: SUMMARY_KEYS -> number (a rate is None when no row can score it); samples: one dict per row
  (samples.jsonl); entropies: float32 [reasoning tokens of all rows] per-token sampling entropy; analysis:
  reflection dynamics and per-kind reflection rates; num_truncated: prompts cut to max_prompt_len."""
  summary: dict[str, Any]
  samples: list[dict[str, Any]]
  entropies: np.ndarray
  analysis: dict[str, Any]
  num_truncated: int = 0


def _fraction(flags: Sequence[bool | None]) -> float | None:
  known = [bool(f) for f in flags if f is not None]
  return sum(known) / len(known) if known else None


def summarize(rows: Sequence[Mapping[str, Any]], verdicts: Sequence[Mapping[str, Any]], *,
              entropies: np.ndarray) -> dict[str, Any]:
  """The summary of one policy. Over the rows of a kind that have the verdict (a None verdict is skipped):

  safety_rate_cot     harmful rows whose reasoning is not unsafe
  safety_rate_answer  harmful rows whose final answer is not unsafe
  accuracy            reasoning rows answered correctly (rows with a reference answer)
  over_refusal        benign rows whose answer refuses
  reflection_rate     rows of every kind whose reasoning holds a reflection phrase
  entropy_cot         mean per-token entropy over all rows' reasoning tokens (`entropies`), token-weighted
  n, n_<kind>         rows, rows of each kind. A rate with no row to score it is None.
  """
  if len(rows) != len(verdicts):
    raise CotsafeError(f"summarize: {len(rows)} rows and {len(verdicts)} verdicts")
  of = {k: [v for r, v in zip(rows, verdicts) if r["kind"] == k] for k in KINDS}
  ent = np.asarray(entropies, np.float64)
  out = {
      "safety_rate_cot": _fraction([None if v["reasoning_unsafe"] is None else not v["reasoning_unsafe"]
                                    for v in of["harmful"]]),
      "safety_rate_answer": _fraction([None if v["answer_unsafe"] is None else not v["answer_unsafe"]
                                       for v in of["harmful"]]),
      "accuracy": _fraction([v["correct"] for v in of["reasoning"]]),
      "over_refusal": _fraction([v["refused"] for v in of["benign"]]),
      "entropy_cot": float(ent.mean()) if ent.size else None,
      "reflection_rate": _fraction([v["reflection"] for v in verdicts]),
      "n": len(rows),
  }
  out.update({f"n_{k}": len(of[k]) for k in KINDS})
  return out


def _render(tokenizer: Any, row: Mapping[str, Any]) -> str:
  return models.apply_chat_template(tokenizer, row.get("messages") or row["prompt"])


def score_completions(*, tokenizer: Any, rows: Sequence[Mapping[str, Any]], tokens_nt: np.ndarray,
                      mask_nt: np.ndarray, entropy_nt: np.ndarray, finished_n: np.ndarray, judge: Judge,
                      stop_ids: Sequence[int]) -> EvalResult:
  """Decode generated completions (row i answers rows[i]), judge them, and summarise.

  tokens_nt / mask_nt / entropy_nt / finished_n as `rollout.generate(return_entropy=True)` returns them.
  """
  check_rows(rows)
  tokens_nt, mask_nt = np.asarray(tokens_nt), np.asarray(mask_nt, bool)
  entropy_nt, finished_n = np.asarray(entropy_nt, np.float32), np.asarray(finished_n, bool)
  if not tokens_nt.shape == mask_nt.shape == entropy_nt.shape or tokens_nt.shape[0] != len(rows) or \
      finished_n.shape != (len(rows),):
    raise CotsafeError(f"score_completions: tokens {tokens_nt.shape}, mask {mask_nt.shape}, entropy "
                       f"{entropy_nt.shape}, finished {finished_n.shape} for {len(rows)} rows")
  out = rollout.GenerateOutput(tokens_bt=tokens_nt, mask_bt=mask_nt, logprobs_bt=np.zeros_like(entropy_nt),
                               finished_b=finished_n)
  texts = rollout.decode_completions(tokenizer, [_render(tokenizer, r) for r in rows], out, tuple(stop_ids))
  verdicts = judge(rows, [t.response for t in texts])
  if len(verdicts) != len(rows) or any(k not in v for v in verdicts for k in VERDICT_KEYS):
    raise CotsafeError(f"score_completions: the judge returned {len(verdicts)} verdicts for {len(rows)} rows "
                       f"(expected one dict with {', '.join(VERDICT_KEYS)} per row)")
  lengths_n = analysis.reasoning_lengths(tokenizer, tokens_nt, mask_nt, stop_ids=stop_ids)
  entropies = analysis.reasoning_entropies(entropy_nt, lengths_n)
  samples = []
  for i, (row, text, v) in enumerate(zip(rows, texts, verdicts)):
    s = {k: row[k] for k in ("id", "kind", "category") if k in row}
    s["prompt"] = row.get("messages") or row["prompt"]
    if row.get("answer") is not None:
      s["reference"] = row["answer"]
    row_ent = entropy_nt[i, :lengths_n[i]]
    s.update(response=text.response, reasoning=text.reasoning, answer=text.answer, **v,
             finished=text.finished, num_tokens=text.num_tokens, num_reasoning_tokens=int(lengths_n[i]),
             entropy_cot=float(row_ent.mean()) if row_ent.size else None)
    samples.append(s)
  dyn = analysis.reflection_dynamics(tokenizer, tokens_nt, entropy_nt, lengths_n)
  by_kind = {k: _fraction([v["reflection"] for r, v in zip(rows, verdicts) if r["kind"] == k]) for k in KINDS}
  extra = {**dyn, "reflection_rate_by_kind": by_kind, "finished_rate": float(finished_n.mean()),
           "mean_completion_tokens": float(mask_nt.sum(1).mean())}
  return EvalResult(summary=summarize(rows, verdicts, entropies=entropies), samples=samples,
                    entropies=entropies, analysis=extra)


def evaluate_policy(*, cfg: models.ModelConfig, params: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]],
                    judge: Judge, max_new_tokens: int, batch_size: int, max_prompt_len: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    mesh: Mesh | None = None, truncate: str = "left",
                    eos_ids: Sequence[int] | None = None) -> EvalResult:
  """Generate one response per row with the policy, judge it, and summarise (see `summarize`).

  Greedy (temperature=0, the default) makes evaluation reproducible; with temperature > 0 batch c samples
  with fold_in(key(seed), c), so a seed reproduces a run. Every batch is `batch_size` rows (the last one
  filled with copies of its first row, dropped after) and prompts are left-padded to `max_prompt_len`
  (longer ones cut from the left, or an error with truncate="error"): one compiled sampler for the run.
  Entropies are those of the distribution each token was drawn from (greedy: the untempered softmax).
  Under a mesh, batch_size must divide over its data x fsdp devices.
  """
  if not rows:
    raise CotsafeError("evaluate_policy: rows is empty (expected at least one prompt row)")
  check_rows(rows)
  if batch_size < 1 or max_prompt_len < 1 or max_new_tokens < 1:
    raise CotsafeError(f"evaluate_policy: batch_size={batch_size}, max_prompt_len={max_prompt_len}, "
                       f"max_new_tokens={max_new_tokens} (expected each >= 1)")
  if truncate not in ("left", "error"):
    raise CotsafeError(f"evaluate_policy: truncate={truncate!r}, expected 'left' or 'error'")
  if mesh is not None and batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise CotsafeError(f"evaluate_policy: batch_size={batch_size} does not divide over the "
                       f"{mesh.shape['data'] * mesh.shape['fsdp']} data x fsdp devices of the mesh {dict(mesh.shape)}")
  models.check_vocab(tokenizer, cfg.vocab_size)
  stop = ppo_trainer.stop_ids(tokenizer, cfg) if eos_ids is None else tuple(int(i) for i in eos_ids)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  key = jax.random.key(seed)
  parts: list[tuple[np.ndarray, ...]] = []
  truncated = 0
  for c, start in enumerate(range(0, len(rows), batch_size)):
    chunk = rows[start:start + batch_size]
    prompt_bp, mask_bp, n_trunc = ppo_trainer.encode_prompts(tokenizer, chunk, max_prompt_len=max_prompt_len,
                                                             truncate=truncate, pad_id=pad_id)
    truncated += n_trunc
    fill = batch_size - len(chunk)  # filler rows keep one batch shape, hence one compile
    prompt_bp = np.concatenate([prompt_bp, np.repeat(prompt_bp[:1], fill, axis=0)])
    mask_bp = np.concatenate([mask_bp, np.repeat(mask_bp[:1], fill, axis=0)])
    if mesh is not None:
      sharding = parallel.batch_sharding(mesh, 2)
      prompt_bp, mask_bp = jax.device_put(prompt_bp, sharding), jax.device_put(mask_bp, sharding)
    out = rollout.generate(cfg, params, prompt_bp, mask_bp, rng=jax.random.fold_in(key, c),
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_ids=stop, pad_id=pad_id, return_entropy=True, buckets=(max_prompt_len,), mesh=mesh)
    host = jax.device_get((out.tokens_bt, out.mask_bt, out.entropy_bt, out.finished_b))
    parts.append(tuple(np.asarray(x)[:len(chunk)] for x in host))
  tokens_nt, mask_nt, entropy_nt, finished_n = (np.concatenate(xs) for xs in zip(*parts))
  result = score_completions(tokenizer=tokenizer, rows=rows, tokens_nt=tokens_nt, mask_nt=mask_nt,
                             entropy_nt=entropy_nt, finished_n=finished_n, judge=judge, stop_ids=stop)
  return dataclasses.replace(result, num_truncated=truncated)


def write_samples(path: str, samples: Sequence[Mapping[str, Any]]) -> str:
  """samples.jsonl: one JSON object per row (main process only, atomic). Returns the path."""
  if parallel.is_main_process():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
      for s in samples:
        f.write(json.dumps(s, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  return path
