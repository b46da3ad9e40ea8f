"""Evaluate a policy on prompt rows: k samples per prompt (prompts batched by length bucket, a progress bar
with ETA), every sample judged, metrics with intervals per benchmark and category (eval/metrics.py).

`EvalResult.report` is one policy's entry of summary.json; `samples` are the samples.jsonl rows.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from cotsafe_jax import models, parallel, paths, rollout
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.eval import analysis, metrics, reasoning
from cotsafe_jax.eval.safety import KINDS, Judge, VERDICT_KEYS, check_rows
from cotsafe_jax.rewards import verifiers
from cotsafe_jax.train import ppo_trainer

R1_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# simple-evals' GPQA prompt (the one R1 and the reasoning-model papers report GPQA with)
CHOICE_INSTRUCTION = ("Answer the following multiple choice question. The last line of your response should be of "
                      "the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think "
                      "step by step before answering.")
DEFAULT_PROMPT_TEMPLATES = {"math": "{prompt}\n" + R1_MATH_INSTRUCTION, "choice": CHOICE_INSTRUCTION + "\n\n{prompt}"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """How an evaluation samples and reports, at the field's defaults (R1 / SafeChain: k samples at T=0.6,
  top-p 0.95; Safe@1, Safe@K, ConsSafe@K, pass@1 over k). temperature=0 is greedy (then k must be 1).

  max_new_tokens: R1 reports with 32768; 16384 holds most R1-Distill chains of thought, and a response cut
  there counts as unfinished (never safe). prompt_buckets: padded prompt lengths (None: powers of two from
  64 up to max_prompt_len): one compiled sampler per bucket used. prompt_templates: grader -> text with
  {prompt}, applied to reasoning rows (the model's math / multiple-choice conventions; {} for none).
  pass_at: the j of the unbiased pass@j (None: K when K > 1). num_resamples: bootstrap resamples of the 95%
  intervals (0: none). seed: sampling and bootstrap.
  """
  samples_per_prompt: int = 5
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  max_new_tokens: int = 16384
  batch_size: int = 32
  max_prompt_len: int = 2048
  prompt_buckets: tuple[int, ...] | None = None
  truncate: str = "left"
  prompt_templates: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PROMPT_TEMPLATES))
  pass_at: tuple[int, ...] | None = None
  num_resamples: int = 1000
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    if self.temperature == 0 and self.samples_per_prompt > 1:
      raise CotsafeError(f"EvalConfig: temperature=0 (greedy) with samples_per_prompt={self.samples_per_prompt}, "
                         "expected samples_per_prompt=1 for greedy decoding")
    if self.samples_per_prompt < 1 or self.num_resamples < 0:
      raise CotsafeError(f"EvalConfig: samples_per_prompt={self.samples_per_prompt}, num_resamples="
                         f"{self.num_resamples}, expected >= 1 and >= 0")

  def kwargs(self) -> dict[str, Any]:
    """The evaluate_policy keywords this config sets."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if out["prompt_buckets"] is None:
      out["prompt_buckets"] = default_buckets(self.max_prompt_len)
    out["prompt_templates"] = dict(self.prompt_templates)
    return out


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """report: this policy's summary.json entry ({"metrics", "by_category", "counts"}, "by_benchmark" and
  "macro" when rows name a source); summary: {metric: value} + counts (the same numbers, flat); samples: one
  dict per sample (samples.jsonl); entropies: float32 per-token entropies of every sample's reasoning tokens,
  concatenated; analysis: reflection dynamics; speed: generation / judging times and throughput;
  num_truncated: prompts cut to max_prompt_len."""
  report: dict[str, Any]
  summary: dict[str, Any]
  samples: list[dict[str, Any]]
  entropies: np.ndarray
  analysis: dict[str, Any]
  speed: dict[str, float] = dataclasses.field(default_factory=dict)
  num_truncated: int = 0

  @property
  def response_lengths(self) -> np.ndarray:
    return np.asarray([s["num_tokens"] for s in self.samples], np.int64)

  @property
  def reasoning_lengths(self) -> np.ndarray:
    return np.asarray([s["num_reasoning_tokens"] for s in self.samples], np.int64)


def apply_prompt_template(row: Mapping[str, Any], templates: Mapping[str, str] | None) -> dict[str, Any]:
  """The row as the policy sees it: a reasoning row's prompt (or last user message) put into its grader's
  template ({prompt} replaced), e.g. R1's "... put your final answer within \\boxed{}."."""
  row = dict(row)
  if not templates or row.get("kind") != "reasoning":
    return row
  template = templates.get(row.get("grader") or "math")
  if template is None:
    return row
  if "{prompt}" not in template:
    raise CotsafeError(f"prompt_templates: {template[:60]!r} has no {{prompt}} placeholder")
  if row.get("messages"):
    msgs = [dict(m) for m in row["messages"]]
    msgs[-1]["content"] = template.replace("{prompt}", msgs[-1]["content"])
    row["messages"] = msgs
  else:
    row["prompt"] = template.replace("{prompt}", row["prompt"])
  return row


def default_buckets(max_prompt_len: int) -> tuple[int, ...]:
  """Powers of two from 64 below max_prompt_len, then max_prompt_len."""
  out, b = [], 64
  while b < max_prompt_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_prompt_len,)


@dataclasses.dataclass
class _Generated:
  """Per sample (index i * k + j): its decoded text, reasoning entropies, reflection-phrase token positions."""
  texts: list[Any]
  entropies: list[np.ndarray]
  reflection_at: list[list[int]]
  num_reasoning: list[int]
  num_truncated: int
  seconds: float


def _generate(*, cfg: models.ModelConfig, params: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], k: int,
              temperature: float, top_k: int, top_p: float, max_new_tokens: int, batch_size: int,
              max_prompt_len: int, buckets: Sequence[int], truncate: str, seed: int, mesh: Mesh | None,
              stop: tuple[int, ...], pad_id: int, progress: bool) -> _Generated:
  """k samples of every row. Rows are sorted by prompt-length bucket (stable), cut into batches of
  batch_size (a bucket's last batch filled with copies, dropped after): one compiled sampler per bucket.
  Batch c samples with fold_in(key(seed), c), so a seed reproduces a run."""
  rendered, ids, truncated = [], [], 0
  for i, row in enumerate(rows):
    text = models.apply_chat_template(tokenizer, row.get("messages") or row["prompt"])
    x = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(x) > max_prompt_len:
      if truncate == "error":
        raise CotsafeError(f"prompt {row.get('id', f'row {i}')}: {len(x)} tokens > max_prompt_len={max_prompt_len} "
                           "(raise max_prompt_len or set truncate='left')")
      x, truncated = x[-max_prompt_len:], truncated + 1
    rendered.append(text)
    ids.append(x)
  bucket_of = [rollout.bucket_length(len(x), buckets=tuple(buckets)) for x in ids]
  items = sorted(((bucket_of[i], len(ids[i]), i, j) for i in range(len(rows)) for j in range(k)))
  batches: list[list[tuple[int, int]]] = []
  for b in sorted(set(bucket_of)):
    mine = [(i, j) for bb, _, i, j in items if bb == b]
    batches += [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
  n = len(rows) * k
  gen = _Generated([None] * n, [np.zeros(0, np.float32)] * n, [[] for _ in range(n)], [0] * n, truncated, 0.0)
  regex = reasoning.reflection_regex()
  pieces = analysis.token_pieces(tokenizer)
  key = jax.random.key(seed)
  sharding = parallel.batch_sharding(mesh, 2) if mesh is not None else None
  params = rollout.decode_params(cfg, params, mesh=mesh)  # laid out for sampling once, for every batch
  bar = tqdm.tqdm(total=n, desc="generate", unit="sample", dynamic_ncols=True,
                  disable=not (progress and parallel.is_main_process()))
  start, tokens_done = time.perf_counter(), 0
  for c, batch in enumerate(batches):
    width = bucket_of[batch[0][0]]
    prompt_bp = np.full((batch_size, width), pad_id, np.int32)
    mask_bp = np.zeros((batch_size, width), bool)
    for r in range(batch_size):
      x = ids[batch[min(r, len(batch) - 1)][0]]  # filler rows copy the batch's last prompt
      prompt_bp[r, width - len(x):], mask_bp[r, width - len(x):] = x, True
    if sharding is not None:  # every process holds the whole batch and places its own devices' rows
      prompt_bp, mask_bp = parallel.global_array(prompt_bp, sharding), parallel.global_array(mask_bp, sharding)
    out = rollout.generate(cfg, params, prompt_bp, mask_bp, rng=jax.random.fold_in(key, c),
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_ids=stop, pad_id=pad_id, return_entropy=True, buckets=(width,), mesh=mesh)
    tok_bt, mask_bt, ent_bt, fin_b = (x[:len(batch)] for x in   # all-gathered over processes
                                      parallel.to_host((out.tokens_bt, out.mask_bt, out.entropy_bt, out.finished_b)))
    host = rollout.GenerateOutput(tokens_bt=tok_bt, mask_bt=mask_bt, logprobs_bt=np.zeros_like(ent_bt),
                                  finished_b=fin_b)
    texts = rollout.decode_completions(tokenizer, [rendered[i] for i, _ in batch], host, stop)
    lengths = analysis.reasoning_lengths(tokenizer, tok_bt, mask_bt, stop_ids=stop)
    for r, (i, j) in enumerate(batch):
      s = i * k + j
      gen.texts[s] = texts[r]
      gen.num_reasoning[s] = int(lengths[r])
      gen.entropies[s] = ent_bt[r, :lengths[r]].astype(np.float32)
      gen.reflection_at[s] = analysis.phrase_start_tokens(pieces(tok_bt[r, :lengths[r]]), regex=regex)
    tokens_done += int(mask_bt.sum())
    bar.update(len(batch))
    bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)
  bar.close()
  gen.seconds = time.perf_counter() - start
  return gen


def _dynamics(gen: _Generated, rows: Sequence[Mapping[str, Any]], k: int,
              verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Reflection phrases per response and the sampling entropy at the tokens where they start vs elsewhere."""
  at_sum = at_n = other_sum = other_n = phrases = 0
  for ent, at in zip(gen.entropies, gen.reflection_at):
    phrases += len(at)
    hit = np.zeros(ent.shape, bool)
    hit[[a for a in at if a < ent.size]] = True
    at_sum, at_n = at_sum + float(ent[hit].sum(dtype=np.float64)), at_n + int(hit.sum())
    other_sum, other_n = other_sum + float(ent[~hit].sum(dtype=np.float64)), other_n + int((~hit).sum())
  by_kind = {}
  for kind in KINDS:
    flags = [v["reflection"] for s, v in enumerate(verdicts) if rows[s // k]["kind"] == kind]
    by_kind[kind] = sum(map(bool, flags)) / len(flags) if flags else None
  return {"reflections_per_response": phrases / max(len(gen.entropies), 1), "reflection_tokens": at_n,
          "entropy_at_reflection": at_sum / at_n if at_n else None,
          "entropy_elsewhere": other_sum / other_n if other_n else None, "reflection_rate_by_kind": by_kind}


def _sample_record(row: Mapping[str, Any], seen: Mapping[str, Any], i: int, j: int, text: Any, v: Mapping[str, Any],
                   n_reason: int, ent: np.ndarray, n_reflect: int) -> dict[str, Any]:
  s: dict[str, Any] = {k: row[k] for k in ("id", "source", "kind", "category", "grader") if k in row}
  s.update(prompt_index=i, sample=j, prompt=row.get("messages") or row["prompt"])
  if (seen.get("messages") or seen["prompt"]) != s["prompt"]:
    s["policy_prompt"] = seen.get("messages") or seen["prompt"]  # with the model's prompt template
  if row.get("answer") is not None:
    s["reference"] = row["answer"]
  s.update(response=text.response, reasoning=text.reasoning, answer=text.answer)
  s["pred"] = verifiers.predicted_answer(text.answer, grader=row.get("grader") or "math") if text.answer else None
  s.update(v)
  if row["kind"] == "harmful":
    s["cot_status"] = metrics.part_status(v["reasoning_unsafe"], text.finished)
    s["answer_status"] = metrics.part_status(v["answer_unsafe"], text.finished)
  s.update(finished=text.finished, num_tokens=text.num_tokens, num_reasoning_tokens=n_reason,
           entropy_cot=float(ent.mean(dtype=np.float64)) if ent.size else None, reflections=n_reflect)
  return s


def _score(*, rows: Sequence[Mapping[str, Any]], gen: _Generated, k: int, judge: Judge, pass_at: Sequence[int],
           num_resamples: int, seed: int, weights: Mapping[str, float] | None,
           seen: Sequence[Mapping[str, Any]] | None = None) -> EvalResult:
  expanded = [rows[s // k] for s in range(len(rows) * k)]
  start = time.perf_counter()
  verdicts = judge(expanded, [t.response for t in gen.texts])
  judge_s = time.perf_counter() - start
  if len(verdicts) != len(expanded) or any(key not in v for v in verdicts for key in VERDICT_KEYS):
    raise CotsafeError(f"evaluate: the judge returned {len(verdicts)} verdicts for {len(expanded)} samples "
                       f"(expected one dict with {', '.join(VERDICT_KEYS)} per sample)")
  seen = rows if seen is None else seen
  samples = [_sample_record(rows[s // k], seen[s // k], s // k, s % k, gen.texts[s], verdicts[s],
                            gen.num_reasoning[s], gen.entropies[s], len(gen.reflection_at[s]))
             for s in range(len(expanded))]
  report = metrics.aggregate(samples, samples_per_prompt=k, pass_at=pass_at, num_resamples=num_resamples,
                             seed=seed, weights=weights)
  tokens = sum(t.num_tokens for t in gen.texts)
  speed = {"generate_s": gen.seconds, "judge_s": judge_s,
           "prompts_per_s": len(rows) / gen.seconds if gen.seconds > 0 else None,
           "samples_per_s": len(expanded) / gen.seconds if gen.seconds > 0 else None,
           "tokens_per_s": tokens / gen.seconds if gen.seconds > 0 else None, "generated_tokens": tokens}
  entropies = np.concatenate(gen.entropies) if gen.entropies else np.zeros(0, np.float32)
  return EvalResult(report=report, summary=metrics.flat(report), samples=samples,
                    entropies=entropies.astype(np.float32), analysis=_dynamics(gen, rows, k, verdicts), speed=speed,
                    num_truncated=gen.num_truncated)


def score_completions(*, tokenizer: Any, rows: Sequence[Mapping[str, Any]], tokens_nt: np.ndarray,
                      mask_nt: np.ndarray, entropy_nt: np.ndarray, finished_n: np.ndarray, judge: Judge,
                      stop_ids: Sequence[int], samples_per_prompt: int = 1, pass_at: Sequence[int] | None = None,
                      num_resamples: int = 1000, seed: int = 0) -> EvalResult:
  """Judge and summarise generated completions: sample i * k + j answers rows[i] (k = samples_per_prompt).

  tokens_nt / mask_nt / entropy_nt / finished_n as `rollout.generate(return_entropy=True)` returns them.
  """
  check_rows(rows)
  k = samples_per_prompt
  tokens_nt, mask_nt = np.asarray(tokens_nt), np.asarray(mask_nt, bool)
  entropy_nt, finished_n = np.asarray(entropy_nt, np.float32), np.asarray(finished_n, bool)
  n = len(rows) * k
  if not tokens_nt.shape == mask_nt.shape == entropy_nt.shape or tokens_nt.shape[0] != n or finished_n.shape != (n,):
    raise CotsafeError(f"score_completions: tokens {tokens_nt.shape}, mask {mask_nt.shape}, entropy "
                       f"{entropy_nt.shape}, finished {finished_n.shape} for {len(rows)} rows x {k} samples")
  out = rollout.GenerateOutput(tokens_bt=tokens_nt, mask_bt=mask_nt, logprobs_bt=np.zeros_like(entropy_nt),
                               finished_b=finished_n)
  prompts = [models.apply_chat_template(tokenizer, rows[s // k].get("messages") or rows[s // k]["prompt"])
             for s in range(n)]
  texts = rollout.decode_completions(tokenizer, prompts, out, tuple(stop_ids))
  lengths = analysis.reasoning_lengths(tokenizer, tokens_nt, mask_nt, stop_ids=stop_ids)
  regex, pieces = reasoning.reflection_regex(), analysis.token_pieces(tokenizer)
  gen = _Generated(texts, [entropy_nt[s, :lengths[s]] for s in range(n)],
                   [analysis.phrase_start_tokens(pieces(tokens_nt[s, :lengths[s]]), regex=regex) for s in range(n)],
                   [int(x) for x in lengths], 0, 0.0)
  return _score(rows=rows, gen=gen, k=k, judge=judge, pass_at=(k,) if pass_at is None and k > 1 else pass_at or (),
                num_resamples=num_resamples, seed=seed, weights=None)


def evaluate_policy(*, cfg: models.ModelConfig, params: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]],
                    judge: Judge, max_new_tokens: int, batch_size: int, max_prompt_len: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    mesh: Mesh | None = None, truncate: str = "left", eos_ids: Sequence[int] | None = None,
                    samples_per_prompt: int = 1, prompt_buckets: Sequence[int] | None = None,
                    prompt_templates: Mapping[str, str] | None = None, pass_at: Sequence[int] | None = None,
                    num_resamples: int = 1000, progress: bool = False,
                    weights: Mapping[str, float] | None = None) -> EvalResult:
  """Generate samples_per_prompt responses per row with the policy, judge each, and report (see
  `metrics.aggregate`; EvalConfig documents the options and the field's defaults).

  Defaults here are the demo's: greedy, one sample, prompts padded to max_prompt_len (prompt_buckets None:
  one bucket, one compiled sampler), no prompt templates. Rows may carry `source` (benchmark) and `category`.
  Entropies are those of the distribution each token was drawn from (greedy: the untempered softmax).
  Under a mesh, batch_size must divide over its data x fsdp devices. `weights`: each source's weight in the
  macro average over benchmarks.
  """
  if not rows:
    raise CotsafeError("evaluate_policy: rows is empty (expected at least one prompt row)")
  check_rows(rows)
  k = samples_per_prompt
  if batch_size < 1 or max_prompt_len < 1 or max_new_tokens < 1 or k < 1:
    raise CotsafeError(f"evaluate_policy: batch_size={batch_size}, max_prompt_len={max_prompt_len}, "
                       f"max_new_tokens={max_new_tokens}, samples_per_prompt={k} (expected each >= 1)")
  if temperature == 0 and k > 1:
    raise CotsafeError(f"evaluate_policy: temperature=0 (greedy) gives {k} identical samples per prompt, expected "
                       "samples_per_prompt=1 with greedy decoding or a temperature > 0")
  if truncate not in ("left", "error"):
    raise CotsafeError(f"evaluate_policy: truncate={truncate!r}, expected 'left' or 'error'")
  if mesh is not None and batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise CotsafeError(f"evaluate_policy: batch_size={batch_size} does not divide over the "
                       f"{mesh.shape['data'] * mesh.shape['fsdp']} data x fsdp devices of the mesh {dict(mesh.shape)}")
  buckets = (max_prompt_len,) if prompt_buckets is None else tuple(int(b) for b in prompt_buckets)
  if not buckets or any(b < 1 for b in buckets):
    raise CotsafeError(f"evaluate_policy: prompt_buckets={prompt_buckets!r}, expected positive lengths")
  if max(buckets) < max_prompt_len:
    buckets = buckets + (max_prompt_len,)
  pass_at = tuple(pass_at) if pass_at is not None else ((k,) if k > 1 else ())
  if any(j < 1 or j > k for j in pass_at):
    raise CotsafeError(f"evaluate_policy: pass_at={pass_at}, expected values in [1, samples_per_prompt={k}]")
  models.check_vocab(tokenizer, cfg.vocab_size)
  stop = ppo_trainer.stop_ids(tokenizer, cfg) if eos_ids is None else tuple(int(i) for i in eos_ids)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  seen = [apply_prompt_template(r, prompt_templates) for r in rows]
  gen = _generate(cfg=cfg, params=params, tokenizer=tokenizer, rows=seen, k=k, temperature=temperature, top_k=top_k,
                  top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_len=max_prompt_len,
                  buckets=buckets, truncate=truncate, seed=seed, mesh=mesh, stop=stop, pad_id=pad_id,
                  progress=progress)
  return _score(rows=rows, gen=gen, k=k, judge=judge, pass_at=pass_at, num_resamples=num_resamples, seed=seed,
                weights=weights, seen=seen)


def write_samples(path: str, samples: Sequence[Mapping[str, Any]]) -> str:
  """samples.jsonl: one JSON object per sample (main process only, atomic; path may be a gs:// URL). Returns
  the path."""
  if parallel.is_main_process():
    paths.write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
  return path
