"""Token-level safety reward model: a decoder backbone plus a per-token head giving P(unsafe) for every token.

Export layout: `backbone/` (an HF dir, with the tokenizer), `safety_head.safetensors`, `safety_head.json`.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors.numpy import load, save

from cotsafe_jax import models, paths
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.models.heads import TokenClassificationHead, head_shardings, init_head
from cotsafe_jax.parallel import distributed, mesh as mesh_lib
from cotsafe_jax.rewards.base import RewardBatch, SafetyScores, part_masks
from cotsafe_jax.rewards.spans import spans_to_token_labels  # noqa: F401  (re-exported: the RM's labels)

SEQ_POOLS = ("max", "mean")
BACKBONE_DIR, HEAD_FILE, HEAD_CONFIG = "backbone", "safety_head.safetensors", "safety_head.json"
_HEAD = TokenClassificationHead(num_classes=1)
_FORMAT_VERSION = 1


def check_pool(seq_pool: str) -> None:
  if seq_pool not in SEQ_POOLS:
    raise CotsafeError(f"safety RM: seq_pool={seq_pool!r}, expected one of {', '.join(SEQ_POOLS)}")


def token_logits(cfg: models.ModelConfig, params: dict, tokens_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Per-token unsafe log-odds [B, T] in float32; params = {"backbone": ..., "head": ...}."""
  h_btd = models.hidden_states(cfg, params["backbone"], tokens_bt, attention_mask_bt=mask_bt)
  return _HEAD.apply({"params": params["head"]}, h_btd)[..., 0]


def pool_probs(p_bt: jax.Array, mask_bt: jax.Array, seq_pool: str) -> jax.Array:
  """Sequence P(unsafe) [B] from token probabilities over the masked tokens (0 for an empty row)."""
  mask_bt = mask_bt.astype(bool)
  if seq_pool == "max":
    return jnp.max(jnp.where(mask_bt, p_bt, 0.0), axis=-1)
  n_b = jnp.maximum(mask_bt.sum(-1), 1)
  return jnp.where(mask_bt, p_bt, 0.0).sum(-1) / n_b


def pooled_log_probs(z_bt: jax.Array, mask_bt: jax.Array, seq_pool: str) -> tuple[jax.Array, jax.Array]:
  """(log p, log(1 - p)) of the pooled sequence probability, computed from logits without cancellation.

  max:  p = max_t sigmoid(z_t) = sigmoid(max_t z_t).
  mean: p = mean_t sigmoid(z_t): log p = logsumexp_t log sigmoid(z_t) - log n, and likewise for 1 - p.
  """
  mask_bt = mask_bt.astype(bool)
  z_bt = z_bt.astype(jnp.float32)
  if seq_pool == "max":
    z_b = jnp.max(jnp.where(mask_bt, z_bt, -1e9), axis=-1)
    return jax.nn.log_sigmoid(z_b), jax.nn.log_sigmoid(-z_b)
  log_n = jnp.log(jnp.maximum(mask_bt.sum(-1), 1).astype(jnp.float32))
  lse = lambda x: jax.nn.logsumexp(jnp.where(mask_bt, x, -jnp.inf), axis=-1)  # noqa: E731
  return lse(jax.nn.log_sigmoid(z_bt)) - log_n, lse(jax.nn.log_sigmoid(-z_bt)) - log_n


def _round_up(n: int, m: int) -> int:
  return max(m, int(math.ceil(n / m)) * m)


def param_shardings(cfg: models.ModelConfig, mesh: Mesh) -> dict:
  """Shardings of the RM's params {"backbone": decoder, "head": token head}."""
  return {"backbone": models.param_shardings(cfg, mesh),
          "head": head_shardings(_HEAD, embed_dim=cfg.hidden_size, mesh=mesh)}


def param_shapes(cfg: models.ModelConfig) -> dict:
  head = jax.eval_shape(lambda r: init_head(_HEAD, r, embed_dim=cfg.hidden_size), jax.random.key(0))
  return {"backbone": models.param_shapes(cfg), "head": head}


@functools.lru_cache(maxsize=16)  # one compile per (model, mesh, chunk shape), reused across calls
def token_probs_program(cfg: models.ModelConfig, mesh: Mesh | None, *, batch_size: int, length: int):
  """The jitted scoring of one [batch_size, length] chunk: (params, tokens_bt, mask_bt) -> P(unsafe) [B, T].
  What SafetyRM.token_probs calls per chunk, and what the `plan` job compiles."""
  fn = lambda p, t, m: jax.nn.sigmoid(token_logits(cfg, p, t, m))  # noqa: E731
  if mesh is None:
    return jax.jit(fn)
  rows = mesh_lib.batch_sharding(mesh, 2, (batch_size, length))
  return mesh_lib.OnMesh(jax.jit(fn, in_shardings=(param_shardings(cfg, mesh), rows, rows), out_shardings=rows),
                         mesh)


class SafetyRM:
  """A SafetyScorer: per-token P(unsafe) over the completion tokens of a RewardBatch (policy tokenizer ==
  RM tokenizer) and sequence scores per part, pooled by `seq_pool` (max or mean)."""
  token_level = True

  def __init__(self, *, cfg: models.ModelConfig, params: dict, tokenizer: Any, seq_pool: str = "max",
               mesh: Mesh | None = None, batch_size: int = 16, length_bucket: int = 64):
    check_pool(seq_pool)
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.seq_pool, self.mesh, self.length_bucket = seq_pool, mesh, length_bucket
    self.batch_size = _round_up(batch_size, self._batch_multiple())

  def _batch_multiple(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def token_probs(self, tokens_bt: np.ndarray, mask_bt: np.ndarray) -> np.ndarray:
    """P(unsafe) [B, T] for every position, in chunks of batch_size rows with T padded to a multiple of
    length_bucket, so shapes (and compiles) repeat and memory stays bounded."""
    b, t = tokens_bt.shape
    bs, tp = self.batch_size, _round_up(t, self.length_bucket)
    probs = token_probs_program(self.cfg, self.mesh, batch_size=bs, length=tp)
    out = np.zeros((b, t), np.float32)
    for start in range(0, b, bs):
      n = min(bs, b - start)
      tokens = np.zeros((bs, tp), np.int32)
      mask = np.zeros((bs, tp), bool)
      tokens[:n, :t], mask[:n, :t] = tokens_bt[start:start + n], mask_bt[start:start + n]
      if self.mesh is not None:  # every process holds the whole chunk and places its own devices' rows
        shard = mesh_lib.batch_sharding(self.mesh, 2, (bs, tp))
        tokens, mask = distributed.global_array(tokens, shard), distributed.global_array(mask, shard)
      out[start:start + n] = distributed.to_host(probs(self.params, tokens, mask))[:n, :t]
    return out

  def score(self, batch: RewardBatch) -> SafetyScores:
    p_tok, p_mask = np.asarray(batch.prompt_tokens_bp), np.asarray(batch.prompt_mask_bp, bool)
    c_tok, c_mask = np.asarray(batch.completion_tokens_bt), np.asarray(batch.completion_mask_bt, bool)
    # prompt left-padded + completion right-padded: one contiguous run of real tokens per row
    probs = self.token_probs(np.concatenate([p_tok, c_tok], 1), np.concatenate([p_mask, c_mask], 1))
    p_bt = np.where(c_mask, probs[:, p_tok.shape[1]:], 0.0).astype(np.float32)
    reasoning_bt, answer_bt = part_masks(batch)
    pool = lambda m: np.asarray(pool_probs(jnp.asarray(p_bt), jnp.asarray(m), self.seq_pool))  # noqa: E731
    return SafetyScores(token_unsafe_bt=p_bt, sequence_unsafe_b=pool(c_mask),
                        parts={"reasoning": pool(reasoning_bt), "answer": pool(answer_bt)})

  def export(self, out_dir: str) -> str:
    """Write backbone/ (HF dir with the tokenizer), the head's safetensors and its json config (process 0; the
    dir may be a gs:// URL)."""
    models.save_hf(self.cfg, self.params["backbone"], paths.join(out_dir, BACKBONE_DIR),
                   tokenizer=self.tokenizer)
    head = {k: np.asarray(v, np.float32) for k, v in distributed.to_host(self.params["head"]).items()}
    if jax.process_index() == 0:
      paths.write_bytes(paths.join(out_dir, HEAD_FILE), save(head, metadata={"format": "np"}))
      config = {"format_version": _FORMAT_VERSION, "head": "TokenClassificationHead", "num_classes": 1,
                "embed_dim": self.cfg.hidden_size, "seq_pool": self.seq_pool, "backbone_dir": BACKBONE_DIR,
                "label": "P(unsafe) = sigmoid(h_t . kernel + bias), h_t the backbone's final-norm hidden state"}
      paths.write_text(paths.join(out_dir, HEAD_CONFIG), json.dumps(config, indent=2))
    distributed.barrier(f"safety RM export {out_dir}")
    return out_dir


def init_safety_rm(*, backbone: str | models.ModelConfig, tokenizer: Any, seed: int = 0, seq_pool: str = "max",
                   mesh: Mesh | None = None, dtype: Any = jnp.float32) -> SafetyRM:
  """A fresh head on a backbone loaded from an HF dir or initialised from a config."""
  rng_backbone, rng_head = jax.random.split(jax.random.key(seed))
  if isinstance(backbone, models.ModelConfig):
    cfg, backbone_params = backbone, models.init_params(backbone, rng_backbone, mesh=mesh)
  else:
    cfg, backbone_params = models.load_hf(backbone, dtype=dtype, mesh=mesh)
  models.check_vocab(tokenizer, cfg.vocab_size, where="safety RM tokenizer")
  head = init_head(_HEAD, rng_head, embed_dim=cfg.hidden_size, mesh=mesh)
  return SafetyRM(cfg=cfg, params={"backbone": backbone_params, "head": head}, tokenizer=tokenizer,
                  seq_pool=seq_pool, mesh=mesh)


def load_safety_rm(export_dir: str, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                   seq_pool: str | None = None, batch_size: int = 16) -> SafetyRM:
  """Load an export written by SafetyRM.export / train_safety_rm; `seq_pool` overrides the saved one."""
  if not export_dir:
    raise CotsafeError(f"load_safety_rm: export_dir={export_dir!r}, expected a safety RM export dir")
  cfg_path = paths.join(export_dir, HEAD_CONFIG)
  if not paths.exists(cfg_path):
    raise CotsafeError(f"{cfg_path}: not found (expected a safety RM export: {BACKBONE_DIR}/, {HEAD_FILE}, "
                       f"{HEAD_CONFIG})")
  meta = json.loads(paths.read_text(cfg_path))
  if meta.get("format_version") != _FORMAT_VERSION or meta.get("num_classes") != 1:
    raise CotsafeError(f"{cfg_path}: format_version={meta.get('format_version')}, num_classes="
                       f"{meta.get('num_classes')}, expected {_FORMAT_VERSION} and 1")
  backbone_dir = paths.join(export_dir, meta.get("backbone_dir", BACKBONE_DIR))
  cfg, backbone = models.load_hf(backbone_dir, dtype=dtype, mesh=mesh)
  head = load(paths.read_bytes(paths.join(export_dir, HEAD_FILE)))
  want = {"kernel": (cfg.hidden_size, 1), "bias": (1,)}
  got = {k: tuple(v.shape) for k, v in head.items()}
  if got != want:
    raise CotsafeError(f"{paths.join(export_dir, HEAD_FILE)}: tensors {got}, expected {want} "
                       f"for hidden_size {cfg.hidden_size}")
  if mesh is not None:
    shardings = head_shardings(_HEAD, embed_dim=cfg.hidden_size, mesh=mesh)
    head = {k: distributed.global_array(v, shardings[k]) for k, v in head.items()}
  else:
    head = {k: jnp.asarray(v) for k, v in head.items()}
  tokenizer = models.load_tokenizer(backbone_dir, model_vocab_size=cfg.vocab_size)
  return SafetyRM(cfg=cfg, params={"backbone": backbone, "head": head}, tokenizer=tokenizer,
                  seq_pool=seq_pool or meta.get("seq_pool", "max"), mesh=mesh, batch_size=batch_size)

