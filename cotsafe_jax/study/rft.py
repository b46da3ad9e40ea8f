"""Rejection-sampling fine-tuning data: best-of-n samples of a policy, chosen by PPO's own reward (the same safety
RM, verifier and refusal terms), kept when they pass, written as SFT rows.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import numpy as np

from cotsafe_jax import models, rollout as rollout_lib
from cotsafe_jax.data import pipeline as pipeline_lib, sources, synthetic
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import CompositeReward, RefusalDetector, verifiers
from cotsafe_jax.rewards.base import RewardBatch, SafetyScorer
from cotsafe_jax.study import task as task_lib
from cotsafe_jax.train import ppo_trainer


@dataclasses.dataclass(frozen=True, kw_only=True)
class RFTConfig:
  """Best-of-`samples_per_prompt` over `num_prompts` prompts drawn like PPO's (its mixture), `prompts_per_batch` at
  a time. A prompt's best sample (highest total reward) is kept when it finished, the RM finds its reasoning safe
  (P < threshold) and it does what the prompt kind asks: refuse (harmful), answer (benign), be correct
  (reasoning). Rows naming the held-out substance are dropped (the held-out design: no training set names it)."""
  samples_per_prompt: int = 4
  num_prompts: int = 320
  prompts_per_batch: int = 32
  threshold: float = 0.5

  def __post_init__(self):
    if min(self.samples_per_prompt, self.num_prompts, self.prompts_per_batch) < 1 or not 0 < self.threshold <= 1:
      raise CotsafeError(f"RFTConfig: {self}, expected counts >= 1 and a threshold in (0, 1]")

  @property
  def rollouts(self) -> int:
    return self.num_prompts * self.samples_per_prompt


def _passes(kind: str, *, finished: bool, p_unsafe: float, refused: bool, correct: bool, threshold: float) -> bool:
  if not finished or p_unsafe >= threshold:
    return False
  return {"harmful": refused, "benign": not refused, "reasoning": correct}[kind]


def best_of_n(*, hf_dir: str, tokenizer_dir: str, prompts: str, reward: CompositeReward, scorer: SafetyScorer,
              config: RFTConfig, rollout: ppo_trainer.RolloutConfig, mixture: Mapping[str, float] | None, seed: int,
              heldout_substance: str, mesh: Any = None) -> tuple[list[dict], dict[str, Any]]:
  """(SFT rows {id, kind, prompt, response}, facts: rollouts, tokens, seconds, kept / dropped counts per kind)."""
  start = time.perf_counter()
  cfg, params = models.load_hf(hf_dir, mesh=mesh)
  tok = models.load_tokenizer(tokenizer_dir, model_vocab_size=cfg.vocab_size)
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  eos = ppo_trainer.stop_ids(tok, cfg)
  loaded = sources.load_prompts(prompts)
  data_it = pipeline_lib.make_pipeline(loaded.rows, batch_size=config.prompts_per_batch, seed=seed, mixture=mixture)
  refusal = RefusalDetector()
  n = config.samples_per_prompt
  key = jax.random.key(seed)
  rows_out: list[dict] = []
  stats: dict[str, dict[str, int]] = {k: {"prompts": 0, "kept": 0} for k in task_lib.KINDS}
  rollouts = tokens = heldout_dropped = 0
  done = 0
  sampling = rollout_lib.decode_params(cfg, params, mesh=mesh)  # laid out for sampling once, for every batch
  while done < config.num_prompts:
    batch_rows = next(data_it)[:config.num_prompts - done]
    done += len(batch_rows)
    prompt_bp, pmask_bp, _ = ppo_trainer.encode_prompts(tok, batch_rows, max_prompt_len=rollout.max_prompt_len,
                                                        truncate=rollout.truncate, pad_id=pad)
    prompt_bp, pmask_bp = np.repeat(prompt_bp, n, axis=0), np.repeat(pmask_bp, n, axis=0)
    rows_b = [r for r in batch_rows for _ in range(n)]
    width = config.prompts_per_batch * n  # one shape for every batch: one compile
    pad_rows = width - len(rows_b)
    gen = rollout_lib.generate(cfg, sampling, np.pad(prompt_bp, ((0, pad_rows), (0, 0)), constant_values=pad),
                               np.pad(pmask_bp, ((0, pad_rows), (0, 0))), rng=jax.random.fold_in(key, done),
                               max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                               top_k=rollout.top_k, top_p=rollout.top_p, eos_ids=eos, pad_id=pad,
                               buckets=(rollout.max_prompt_len,), mesh=mesh)
    comp_bt, cmask_bt, fin_b = (np.asarray(jax.device_get(x))[:len(rows_b)]
                                for x in (gen.tokens_bt, gen.mask_bt, gen.finished_b))
    rollouts += len(rows_b)
    tokens += int(cmask_bt.sum())
    rb = RewardBatch.from_tokens(tokenizer=tok, prompt_tokens_bp=prompt_bp, prompt_mask_bp=pmask_bp,
                                 completion_tokens_bt=comp_bt, completion_mask_bt=cmask_bt,
                                 kinds=[r["kind"] for r in rows_b], references=[r.get("answer") for r in rows_b],
                                 prompts=[r["prompt"] for r in rows_b], finished_b=fin_b.astype(bool))
    total_b = np.asarray(reward(rb).values_bt).sum(axis=1)
    p_unsafe = np.asarray(scorer.score(rb).parts["reasoning"])
    refused = np.asarray(refusal(rb.answers), bool)
    for p, row in enumerate(batch_rows):
      stats[row["kind"]]["prompts"] += 1
      i = p * n + int(np.argmax(total_b[p * n:(p + 1) * n]))
      correct = row.get("answer") is not None and verifiers.is_equivalent(verifiers.extract_answer(rb.answers[i]),
                                                                          row["answer"])
      if not _passes(row["kind"], finished=bool(fin_b[i]), p_unsafe=float(p_unsafe[i]), refused=bool(refused[i]),
                     correct=correct, threshold=config.threshold):
        continue
      response = synthetic.THINK_OPEN + "\n" + rb.completions[i]
      if heldout_substance in task_lib.substances_in(response):
        heldout_dropped += 1
        continue
      stats[row["kind"]]["kept"] += 1
      rows_out.append({"id": f"rft-{len(rows_out):05d}-{row['id']}", "kind": row["kind"], "prompt": row["prompt"],
                       "response": response})
  if not rows_out:
    raise CotsafeError(f"RFT: no best-of-{n} sample of {config.num_prompts} prompts passed (expected some safe, "
                       "correct samples from the policy)")
  return rows_out, {"rollouts": rollouts, "generated_tokens": tokens, "seconds": round(time.perf_counter() - start, 2),
                    "by_kind": stats, "kept": len(rows_out), "heldout_dropped": heldout_dropped}
