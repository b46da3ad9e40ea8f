"""Supervised fine-tuning (the safe-CoT baseline and the PPO warm start): loss on assistant tokens only.

Chat rows -> fixed-length token rows with a target mask -> one jitted, sharded, donated step -> HF export.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cotsafe_jax import kernels, models, parallel, paths
from cotsafe_jax.data import mixture as mixture_lib
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models.tokenizer import THINK_CLOSE, THINK_OPEN
from cotsafe_jax.parallel import mesh as mesh_lib
from cotsafe_jax.train import guard as guard_lib
from cotsafe_jax.train.checkpointing import Checkpointer
from cotsafe_jax.train.logging import MetricLogger
from cotsafe_jax.train.optim import SCHEDULES, make_optimizer, make_schedule, opt_state_shardings

TRUNCATE = ("right", "error")
# argmax(z) == y iff softmax(z / T)_y -> 1 as T -> 0: token accuracy from the fused op, no [T, V] logits
_ARGMAX_TEMPERATURE = 1e-3
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
  """One SFT run. Set exactly one of num_steps / num_epochs. batch_size is global (rows per optimizer step),
  split into num_microbatches for gradient accumulation. Params and AdamW state are float32; compute_dtype
  (None: the model config's) is the matmul dtype. truncate: "right" cuts rows past max_len (counted),
  "error" rejects them. pad_to_multiple: None pads every batch to max_len (one compiled shape); n pads each batch
  to its longest row rounded up to a multiple of n (at most max_len): no maths changes, fewer padded tokens
  computed, one compile per length met (the study's rows are 50-80 tokens of a 104-token max_len)."""
  max_len: int = 1024
  batch_size: int = 8
  num_steps: int | None = None
  num_epochs: int | None = None
  learning_rate: float = 1e-5
  schedule: str = "cosine"
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  num_microbatches: int = 1
  microbatch_rows_per_device: int | None = None  # set: num_microbatches follows the mesh (`for_mesh`)
  seed: int = 0
  compute_dtype: str | None = None
  remat: str = "none"  # models.REMAT_POLICIES; "none" keeps the model config's (True / False read as full / none)
  truncate: str = "right"
  pad_to_multiple: int | None = None
  log_every: int = 1
  logprob_impl: str = "auto"

  def __post_init__(self):
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in models.REMAT_POLICIES:
      raise CotsafeError(f"SFTConfig.remat={self.remat!r}, expected one of {', '.join(models.REMAT_POLICIES)}")
    if (self.num_steps is None) == (self.num_epochs is None):
      raise CotsafeError(f"SFTConfig: num_steps={self.num_steps}, num_epochs={self.num_epochs}, expected exactly "
                         "one of them")
    for name in ("max_len", "batch_size", "num_microbatches", "log_every") + (
        ("num_steps",) if self.num_steps is not None else ("num_epochs",)):
      if getattr(self, name) < 1:
        raise CotsafeError(f"SFTConfig.{name}={getattr(self, name)}, expected >= 1")
    if self.max_len < 2:
      raise CotsafeError(f"SFTConfig.max_len={self.max_len}, expected >= 2 (a token and its successor)")
    if self.batch_size % self.num_microbatches:
      raise CotsafeError(f"SFTConfig: batch_size={self.batch_size} is not a multiple of num_microbatches="
                         f"{self.num_microbatches}")
    if self.microbatch_rows_per_device is not None and self.microbatch_rows_per_device < 1:
      raise CotsafeError(f"SFTConfig.microbatch_rows_per_device={self.microbatch_rows_per_device}, expected >= 1 "
                         "(or None: num_microbatches as set)")
    if self.pad_to_multiple is not None and (isinstance(self.pad_to_multiple, bool)
                                             or not isinstance(self.pad_to_multiple, int) or self.pad_to_multiple < 1):
      raise CotsafeError(f"SFTConfig.pad_to_multiple={self.pad_to_multiple!r}, expected a positive int or None "
                         "(pad every batch to max_len)")
    if self.truncate not in TRUNCATE:
      raise CotsafeError(f"SFTConfig.truncate={self.truncate!r}, expected one of {', '.join(TRUNCATE)}")
    if self.schedule not in SCHEDULES:
      raise CotsafeError(f"SFTConfig.schedule={self.schedule!r}, expected one of {', '.join(SCHEDULES)}")
    if self.logprob_impl not in kernels.IMPLS:
      raise CotsafeError(f"SFTConfig.logprob_impl={self.logprob_impl!r}, expected one of "
                         f"{', '.join(kernels.IMPLS)}")


  def for_mesh(self, shards: int) -> "SFTConfig":
    """With microbatch_rows_per_device set: num_microbatches = batch_size / (shards x rows per device)."""
    if self.microbatch_rows_per_device is None:
      return self
    per = self.microbatch_rows_per_device
    if self.batch_size % (per * shards):
      raise CotsafeError(f"SFTConfig.microbatch_rows_per_device={per}: batch_size={self.batch_size} does not split "
                         f"into micro-batches of {per} row(s) on each of {shards} data x fsdp devices (expected a "
                         f"multiple of {per * shards})")
    return dataclasses.replace(self, num_microbatches=self.batch_size // (per * shards))


# ---- rows -> token rows with a target mask ------------------------------------------------------------
def _chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation: bool, thinking: bool = True) -> str:
  return models.apply_chat_template(tokenizer, list(messages), add_generation_prompt=generation, thinking=thinking)


def _after_open_think(prefix: str, response: str) -> str:
  """The response without the `<think>` (and the whitespace after it) that the prefix already opened."""
  at = prefix.rfind(THINK_OPEN)
  tail = prefix[at + len(THINK_OPEN):] if at >= 0 else None
  body = response.lstrip()
  if tail is None or tail.strip() or not body.startswith(THINK_OPEN):
    return response
  body = body[len(THINK_OPEN):]
  return body[len(tail):] if body.startswith(tail) else body


def _header_end(tokenizer: Any, candidate: str, text: str, start: int) -> int:
  """End of the longest token-aligned piece of candidate[start:] that text[start:] also starts with."""
  offsets = tokenizer(candidate[start:], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
  best = start
  for _, end in offsets:
    if not text.startswith(candidate[start:start + end], start):
      break
    best = start + end
  return best


def _check_reasoning_kept(content: str, target: str, *, where: str) -> None:
  """Refuse a chat template that renders an assistant turn without the reasoning its content has.

  DeepSeek-R1-Distill's template keeps only the text after `</think>` of every assistant message: SFT on such
  rows would silently train on the answers and never on the chain of thought.
  """
  if THINK_CLOSE not in content:
    return
  reasoning, _ = models.split_reasoning(content)
  if reasoning and reasoning not in target:
    raise CotsafeError(
        f"{where}: the tokenizer's chat template drops the reasoning (<think>...</think>) of assistant turns "
        "(as DeepSeek-R1-Distill's does), so SFT would train on the answer only; expected a template that keeps "
        "it: write the row as prompt + response (the response, reasoning included, is the target after the "
        "generation prompt; one row per assistant turn), or give the tokenizer a chat template that keeps "
        "assistant reasoning (sft_train.tokenizer_dir)")


def _message_segments(tokenizer: Any, messages: Sequence[Mapping[str, str]], eos: str,
                      where: str) -> list[tuple[str, bool]]:
  """Render growing prefixes: each assistant turn's text after its header (the generation prompt, incl. an
  opened think block) through its eos is a target; everything else (other turns, role headers) is not."""
  segments: list[tuple[str, bool]] = []
  done = ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    through = _chat(tokenizer, messages[:i + 1], generation=False)
    headers = [_chat(tokenizer, messages[:i], generation=True, thinking=t) for t in (True, False)]
    if not through.startswith(done) or not all(h.startswith(done) for h in headers):
      raise CotsafeError(f"{where}: the chat template renders earlier turns differently once a later turn is "
                         "added (e.g. Qwen3 drops earlier reasoning), expected each render to extend the last; "
                         "split the conversation into one row per assistant turn")
    start = max(_header_end(tokenizer, h, through, len(done)) for h in headers)
    turn = through[start:]
    cut = turn.rfind(eos)
    target, rest = (turn[:cut + len(eos)], turn[cut + len(eos):]) if cut >= 0 else (turn + eos, "")
    _check_reasoning_kept(m["content"], target, where=f"{where}: message {i + 1} (assistant)")
    segments += [(through[len(done):start], False), (target, True), (rest, False)]
    done = through
  return [s for s in segments if s[0]]


def encode_row(tokenizer: Any, row: Mapping[str, Any], *, where: str = "row") -> tuple[list[int], list[bool]]:
  """(token ids, target mask) of one SFT row, untruncated.

  prompt + response: the chat-template generation prompt (thinking format, so it ends with an opened
  `<think>`) is the context; the response (without a duplicate leading `<think>`) + eos is the target.
  messages: every assistant turn (without its role header) through its eos is a target.
  """
  eos = tokenizer.eos_token
  if not eos:
    raise CotsafeError("tokenizer has no eos_token, expected one: SFT targets end with it so the model learns "
                       "to stop")
  from jinja2 import TemplateError  # transformers renders chat templates with jinja2

  try:
    if "messages" in row:
      segments = _message_segments(tokenizer, row["messages"], eos, where)
    else:
      prefix = _chat(tokenizer, [{"role": "user", "content": row["prompt"]}], generation=True)
      segments = [(prefix, False), (_after_open_think(prefix, row["response"]) + eos, True)]
  except TemplateError as e:
    raise CotsafeError(f"{where}: the tokenizer's chat template cannot render it ({e}), expected roles and "
                       "fields the template knows") from None
  ids = tokenizer([s for s, _ in segments], add_special_tokens=False)["input_ids"]
  tokens = [t for seg in ids for t in seg]
  target = [is_target for seg, (_, is_target) in zip(ids, segments) for _ in seg]
  return tokens, target


@dataclasses.dataclass(frozen=True)
class SFTExamples:
  """Encoded rows, right-padded to max_len: one shape, one compile."""
  tokens_nt: np.ndarray       # int32
  attention_nt: np.ndarray    # bool: real (not padding) tokens
  target_nt: np.ndarray       # bool: assistant tokens, predicted with loss
  num_truncated: int          # rows cut at max_len
  num_without_target: int     # rows with no target token left after the cut


def encode_rows(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, max_len: int, truncate: str = "right",
                pad_id: int | None = None, source: str = "rows") -> SFTExamples:
  if truncate not in TRUNCATE:
    raise CotsafeError(f"truncate={truncate!r}, expected one of {', '.join(TRUNCATE)}")
  pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
  n = len(rows)
  tokens_nt = np.full((n, max_len), pad_id, np.int32)
  attention_nt = np.zeros((n, max_len), bool)
  target_nt = np.zeros((n, max_len), bool)
  truncated = no_target = 0
  for i, row in enumerate(rows):
    where = f"{source}: row {i + 1}" + (f" (id {row['id']})" if "id" in row else "")
    ids, target = encode_row(tokenizer, row, where=where)
    if len(ids) > max_len:
      if truncate == "error":
        raise CotsafeError(f"{where}: {len(ids)} tokens, longer than max_len={max_len} (expected at most "
                           "max_len tokens; raise max_len or set truncate='right')")
      truncated += 1
      ids, target = ids[:max_len], target[:max_len]
    no_target += not any(target[1:])  # the first token is never predicted
    tokens_nt[i, :len(ids)] = ids
    attention_nt[i, :len(ids)] = True
    target_nt[i, :len(ids)] = target
  return SFTExamples(tokens_nt, attention_nt, target_nt, truncated, no_target)


# ---- loss and step ------------------------------------------------------------------------------------
def sft_loss(cfg: models.ModelConfig, params: Any, batch: Mapping[str, jax.Array], *,
             num_targets: jax.Array | float | None = None, mesh: Mesh | None = None,
             impl: str = "auto") -> tuple[jax.Array, dict[str, jax.Array]]:
  """NLL of the target tokens divided by num_targets (default: this batch's target count), through the fused
  op (no [T, V] logits). batch: tokens_bt, attention_bt, target_bt. Metrics are sums / num_targets too, so
  microbatch values add up to the batch's."""
  tokens_bt = batch["tokens_bt"]
  h_btd = models.hidden_states(cfg, params, tokens_bt, attention_mask_bt=batch["attention_bt"])
  w_dv = models.unembedding(cfg, params).astype(cfg.dtype)
  # predict token t+1 from position t; the last position has no successor (masked), T stays tile-aligned
  y_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
  m_bt = jnp.pad(batch["target_bt"][:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
  if num_targets is None:
    num_targets = jnp.maximum(m_bt.sum(), 1.0)
  logp_bt, _ = kernels.logprob_entropy(h_btd, w_dv, y_bt, impl=impl, mesh=mesh)
  loss = -(logp_bt * m_bt).sum() / num_targets
  logp0_bt, _ = kernels.logprob_entropy(jax.lax.stop_gradient(h_btd), jax.lax.stop_gradient(w_dv), y_bt,
                                        temperature=_ARGMAX_TEMPERATURE, impl=impl, mesh=mesh)
  correct_bt = (logp0_bt > math.log(0.5)).astype(jnp.float32)
  return loss, {"loss": loss, "token_accuracy": (correct_bt * m_bt).sum() / num_targets}


def _microbatches(x: jax.Array, m: int) -> jax.Array:
  # row j of microbatch i is row j*m + i: every microbatch spreads over all batch shards
  return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def make_sft_optimizer(sft: SFTConfig, total_steps: int) -> optax.GradientTransformation:
  return make_optimizer(learning_rate=sft.learning_rate, schedule=sft.schedule, warmup_steps=sft.warmup_steps,
                        total_steps=total_steps, weight_decay=sft.weight_decay, max_grad_norm=sft.max_grad_norm,
                        min_lr_ratio=sft.min_lr_ratio)


def check_batch_size(sft: SFTConfig, mesh: Mesh) -> None:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if (sft.batch_size // sft.num_microbatches) % dp:
    raise CotsafeError(f"sft_train: batch_size / num_microbatches = {sft.batch_size} / "
                       f"{sft.num_microbatches} is not a multiple of the mesh's data x fsdp = {dp}")


def state_shardings(cfg: models.ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> dict:
  """Shardings of {step, params, opt_state}: optimizer moments sharded like their params."""
  params = models.param_shardings(cfg, mesh)
  opt = opt_state_shardings(optimizer, models.param_shapes(cfg), params, mesh_lib.replicated(mesh))
  return {"step": mesh_lib.replicated(mesh), "params": params, "opt_state": opt}


def _batch_shardings(mesh: Mesh, shape: tuple[int, int]) -> dict:
  s = mesh_lib.batch_sharding(mesh, 2, shape)
  return {"tokens_bt": s, "attention_bt": s, "target_bt": s}


@functools.lru_cache(maxsize=4)  # a rerun in the same process (resume, notebook) reuses the compiled step
def make_train_step(cfg: models.ModelConfig, sft: SFTConfig, *, total_steps: int, mesh: Mesh):
  """(state, batch) -> (state, metrics), jitted with in/out shardings; the state is donated.

  The loss of every microbatch is divided by the global batch's target count, so the summed gradients are
  the full batch's token-mean gradient whatever the microbatch split or the data-parallel size.
  """
  optimizer = make_sft_optimizer(sft, total_steps)
  shardings = state_shardings(cfg, optimizer, mesh)
  batch_shardings = _batch_shardings(mesh, (sft.batch_size, sft.max_len))
  micro_shardings = _batch_shardings(mesh, (sft.batch_size // sft.num_microbatches, sft.max_len))

  def step(state, batch):
    num_targets = jnp.maximum(batch["target_bt"][:, 1:].sum(), 1).astype(jnp.float32)
    micro = jax.tree.map(lambda x: _microbatches(x, sft.num_microbatches), batch)

    def body(grads, mb):
      mb = jax.lax.with_sharding_constraint(mb, micro_shardings)
      (_, metrics), g = jax.value_and_grad(sft_loss, argnums=1, has_aux=True)(
          cfg, state["params"], mb, num_targets=num_targets, mesh=mesh, impl=sft.logprob_impl)
      # the accumulators stay split like the params inside the loop too
      return jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, g), shardings["params"]), metrics

    zeros = jax.lax.with_sharding_constraint(  # float32 gradient accumulators split like the params
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"]), shardings["params"])
    grads, per_micro = jax.lax.scan(body, zeros, micro)
    metrics = jax.tree.map(lambda x: x.sum(0), per_micro)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["target_tokens"] = num_targets
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # non-finite guard: a step whose loss or gradients are not finite leaves params and optimizer state as they were
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
    return {"step": state["step"] + 1, "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"])}, metrics

  return mesh_lib.OnMesh(jax.jit(step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
                                 donate_argnums=(0,)), mesh)


# ---- the run ------------------------------------------------------------------------------------------
class _StopRequest:
  """SIGTERM / SIGINT ask the loop to finish its step, save and return; a second signal acts as usual."""

  def __init__(self):
    self.requested = False
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.requested:
      old = self._old[signum]
      signal.signal(signum, old)
      if callable(old):
        old(signum, frame)
      else:
        signal.raise_signal(signum)
      return
    self.requested = True
    _log.warning("sft_train: got signal %d, stopping after this step (a checkpoint will be saved)", signum)

  def __enter__(self) -> "_StopRequest":
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # all processes must stop at the same step
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _model_source(model: models.ModelConfig | None, hf_dir: str | None, init_from: str | None,
                  sft: SFTConfig) -> models.ModelConfig:
  if model is not None and hf_dir is not None:
    raise CotsafeError("sft_train: both model (a ModelConfig) and hf_dir are set, expected one of them")
  if model is None and hf_dir is None and init_from is None:
    raise CotsafeError("sft_train: no model, expected model (a ModelConfig, random init), hf_dir (an HF "
                       "checkpoint dir) or init_from (an HF dir to start from)")
  cfg = model if model is not None else models.ModelConfig.from_hf(hf_dir or init_from)
  compute = jnp.dtype(sft.compute_dtype) if sft.compute_dtype else cfg.dtype
  # float32 master params and AdamW moments: bf16 updates would round small steps away
  return cfg.replace(param_dtype=jnp.float32, dtype=compute, remat=sft.remat if sft.remat != "none" else cfg.remat)


def _initial_params(cfg: models.ModelConfig, *, hf_dir: str | None, init_from: str | None, seed: int,
                    mesh: Mesh) -> Any:
  source = init_from or hf_dir
  if source is None:
    return models.init_params(cfg, jax.random.key(seed), mesh=mesh)
  loaded_cfg, params = models.load_hf(source, dtype=jnp.float32, mesh=mesh, compute_dtype=cfg.dtype)
  want = jax.tree.map(lambda s: s.shape, models.param_shapes(cfg))
  got = jax.tree.map(lambda s: s.shape, models.param_shapes(loaded_cfg))
  if want != got:
    raise CotsafeError(f"{source}: its architecture ({loaded_cfg.model_type}, hidden_size="
                       f"{loaded_cfg.hidden_size}, num_layers={loaded_cfg.num_layers}, vocab_size="
                       f"{loaded_cfg.vocab_size}) differs from the model being trained ({cfg.model_type}, "
                       f"hidden_size={cfg.hidden_size}, num_layers={cfg.num_layers}, vocab_size={cfg.vocab_size})")
  return params


def _check_resume(saved: Mapping[str, Any], sft: SFTConfig, where: str) -> None:
  now = dataclasses.asdict(sft)
  # a run may be extended, logged differently, or resumed on another mesh (micro-batching changes no maths)
  free = ("num_steps", "num_epochs", "log_every", "num_microbatches", "pad_to_multiple")
  changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k not in free and k in saved and saved[k] != now[k]]
  if changed:
    raise CotsafeError(f"{where}: the checkpoint was written with a different SFTConfig ({'; '.join(changed)}), "
                       "expected the same config to resume (only num_steps, num_epochs, log_every, num_microbatches, "
                       "pad_to_multiple may change), or a new workdir")


def _host_batch(examples: SFTExamples, rows: Sequence[Mapping[str, Any]],
                pad_to_multiple: int | None = None) -> dict[str, np.ndarray]:
  """This process's rows of the batch, right-padded to max_len, or with pad_to_multiple to the longest row of the
  global batch (every process's) rounded up to a multiple of it."""
  idx = np.asarray([r["_row"] for r in rows])
  batch = {"tokens_bt": examples.tokens_nt[idx], "attention_bt": examples.attention_nt[idx],
           "target_bt": examples.target_nt[idx]}
  if pad_to_multiple is None:
    return batch
  longest = int(batch["attention_bt"].sum(1).max(initial=0))
  if jax.process_count() > 1:  # every process must build the same global shape
    longest = int(np.max(parallel.to_host(np.asarray([longest], np.int32), tiled=True)))
  max_len = examples.tokens_nt.shape[1]
  length = min(max_len, max(2, -(-longest // pad_to_multiple) * pad_to_multiple))
  return {k: v[:, :length] for k, v in batch.items()}


def _write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  if parallel.is_main_process():
    paths.write_text(paths.join(workdir, "summary.json"), json.dumps(summary, indent=2))


def sft_train(*, workdir: str, data: Any, config: SFTConfig, model: models.ModelConfig | None = None,
              hf_dir: str | None = None, tokenizer_dir: str | None = None, init_from: str | None = None,
              columns: Mapping[str, str] | str | None = None, split: str | None = None,
              data_dir: str | None = None, on_bad_row: str = "error", mesh: Mesh | None = None,
              save_interval_steps: int = 500, max_to_keep: int | None = 2, async_checkpoint: bool = True,
              export_hf: bool = True, export_dtype: str | None = None,
              max_nonfinite_steps: int = 3, step_callback: Any = None) -> dict[str, Any]:
  """Fine-tune a decoder on SFT rows (docs/data.md: `messages`, or `prompt` + `response`); returns final metrics
  and paths.

  The model: `model` (a ModelConfig, random init from config.seed) or `hf_dir` (a local HF checkpoint);
  `init_from` (an HF dir, e.g. an earlier stage's export) supplies the starting weights instead, and the
  architecture too when neither is set. The tokenizer comes from tokenizer_dir, else hf_dir, else init_from.
  mesh: default make_mesh() (every device on fsdp). Resumes from the newest checkpoint in workdir/checkpoints
  with the same batches; SIGTERM / SIGINT finish the step, save and return (stopped_early=True). At the end the
  params are saved as an HF dir in workdir/hf (export_dtype: default float32) with the tokenizer.
  data: one file or dataset dir (columns / split / data_dir apply to it), a list of data.Source (mixed by
  weight), or a data.TrainingData. step_callback(step, cfg, params, tokenizer) -> dict of extra metrics (e.g.
  validation), called after each step; a step it returns metrics for is logged.
  """
  if on_bad_row not in ("error", "skip"):
    raise CotsafeError(f"sft_train: on_bad_row={on_bad_row!r}, expected 'error' or 'skip'")
  cfg = _model_source(model, hf_dir, init_from, config)
  tok_dir = tokenizer_dir or hf_dir or init_from
  if tok_dir is None:
    raise CotsafeError("sft_train: no tokenizer, expected tokenizer_dir (required when the model is a "
                       "ModelConfig without hf_dir / init_from)")
  tokenizer = models.load_tokenizer(tok_dir, model_vocab_size=cfg.vocab_size)
  if cfg.eos_token_id is None:  # exported configs say where generation stops
    cfg = cfg.replace(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  config = config.for_mesh(mesh.shape["data"] * mesh.shape["fsdp"])
  check_batch_size(config, mesh)

  loaded = mixture_lib.training_data(data, schema="sft", columns=columns, split=split, data_dir=data_dir,
                                     on_bad_row="raise" if on_bad_row == "error" else "skip", seed=config.seed,
                                     job="sft_train")
  examples = encode_rows(tokenizer, loaded.rows, max_len=config.max_len, truncate=config.truncate,
                         source=loaded.source)
  if examples.num_truncated:
    _log.warning("sft_train: %d of %d rows cut at max_len=%d (%d have no target token left)",
                 examples.num_truncated, len(loaded.rows), config.max_len, examples.num_without_target)
  if config.num_steps is not None:
    num_steps = config.num_steps
  else:
    num_steps = config.num_epochs * len(loaded.rows) // config.batch_size
    if num_steps < 1:
      raise CotsafeError(f"sft_train: {config.num_epochs} epochs of {len(loaded.rows)} rows make no batch of "
                         f"{config.batch_size}, expected batch_size <= num_epochs x rows")
  pipeline = loaded.make_pipeline(rows=[{"_row": i, **r} for i, r in enumerate(loaded.rows)],
                                  batch_size=config.batch_size, seed=config.seed, num_epochs=config.num_epochs)

  # the constant schedule ignores the run length, so an extended rerun reuses the compiled step
  schedule_steps = num_steps if config.schedule == "cosine" else 1
  key_config = dataclasses.replace(config, num_steps=schedule_steps, num_epochs=None, log_every=1)
  train_step = make_train_step(cfg, key_config, total_steps=schedule_steps, mesh=mesh)
  lr_at = make_schedule(learning_rate=config.learning_rate, schedule=config.schedule,
                        warmup_steps=config.warmup_steps, total_steps=schedule_steps,
                        min_lr_ratio=config.min_lr_ratio)
  optimizer = make_sft_optimizer(config, schedule_steps)
  shardings = state_shardings(cfg, optimizer, mesh)
  batch_shardings = _batch_shardings(mesh, (config.batch_size, config.max_len))

  workdir = paths.resolve(workdir)  # absolute when local; a gs:// URL as it is
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=save_interval_steps,
                      max_to_keep=max_to_keep, async_save=async_checkpoint)
  start = ckpt.latest_step() or 0
  last: dict[str, float] = {}
  resumed_guard = None
  if start:
    shapes = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                       "opt_state": optimizer.init(p)}, models.param_shapes(cfg))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    try:
      state, data_state, extra = ckpt.restore(start, target)
    except (ValueError, KeyError, TypeError) as e:  # orbax: missing keys, shape or dtype mismatch
      raise CotsafeError(f"{ckpt.directory}: cannot restore step {start} into this model and optimizer "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}), expected a checkpoint "
                         "of the same run, or a new workdir") from e
    _check_resume(extra.get("config", {}), config, ckpt.directory)
    pipeline.set_state(data_state)
    last = dict(extra.get("metrics", {}))
    resumed_guard = extra.get("guard")
  else:
    params = _initial_params(cfg, hf_dir=hf_dir, init_from=init_from, seed=config.seed, mesh=mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]), "params": params,
             "opt_state": opt_state}

  guard = guard_lib.StepGuard(workdir, job="sft_train", max_nonfinite_steps=max_nonfinite_steps)
  guard.restore(resumed_guard)

  def extra(metrics):
    return {"config": dataclasses.asdict(config), "metrics": metrics, "num_rows": len(loaded.rows),
            "guard": guard.state()}

  step = start
  stopped = False
  logger = MetricLogger(workdir, total_steps=num_steps, resume_step=start or None,
                        postfix_keys=("loss", "token_accuracy"), desc="sft")
  try:
    with _StopRequest() as stop:
      while step < num_steps:
        rows = next(pipeline)
        local = _host_batch(examples, rows, config.pad_to_multiple)
        logger.add_tokens(int(local["attention_bt"].sum()) * jax.process_count())
        lr = float(lr_at(step))
        state, metrics = train_step(state, parallel.host_local_to_global(local, batch_shardings))
        step += 1
        metrics = jax.device_get(metrics)
        metrics.update(guard.observe(step, finite=float(metrics["nonfinite"]) == 0.0, loss=float(metrics["loss"]),
                                     row_ids=[r.get("id", f"row {r['_row'] + 1}") for r in rows]))
        if guard.must_stop:
          logger.write(step, {**metrics, "lr": lr})
          raise guard.error(step)
        extra_metrics = step_callback(step, cfg, state["params"], tokenizer) if step_callback is not None else None
        metrics.update(extra_metrics or {})
        if step % config.log_every == 0 or step == num_steps or metrics["guard/skipped"] or extra_metrics:
          last = logger.write(step, {**metrics, "lr": lr})
        stopped = step < num_steps and stop.any_process()
        ckpt.save(step, state, data=pipeline.get_state(), extra=extra(last), force=step == num_steps or stopped)
        if stopped:
          break
  finally:
    logger.close()
    ckpt.close()
  hf_out = None
  if export_hf and not stopped:
    hf_out = models.save_hf(cfg, state["params"], os.path.join(workdir, "hf"), tokenizer=tokenizer,
                            dtype=jnp.dtype(export_dtype) if export_dtype else None)
  summary = {**{k: v for k, v in last.items() if not k.startswith("time/")}, "step": step,
             "num_steps": num_steps, "stopped_early": stopped, "num_rows": len(loaded.rows),
             "num_skipped_rows": loaded.num_skipped, "num_truncated_rows": examples.num_truncated,
             "num_rows_without_target": examples.num_without_target, "hf_dir": hf_out,
             "checkpoint_dir": ckpt.directory, "metrics_path": os.path.join(workdir, "metrics.jsonl")}
  _write_summary(workdir, summary)
  return summary
