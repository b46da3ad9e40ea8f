"""Jitted KV-cache sampler: prefill, a lax.while_loop decode with early exit, temperature / top-k / top-p.

One compile per (batch, prompt bucket, max_new_tokens, sampling config): prompts are left-padded to a bucket.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import mesh as mesh_lib
from cotsafe_jax.rollout import decode as decode_lib

Buckets = str | int | Sequence[int]
_MIN_BUCKET = 16
_BLOCK = 128  # vocab block of the two-level inverse-CDF draw
_NUCLEUS_CANDIDATES = 1024  # top-p alone looks for its nucleus among this many largest logits first
_STEPS_PER_PHASE = 64  # automatic cache phases: one per this many new tokens ...
_MAX_PHASES = 4  # ... and at most this many (benchmarks/cache_phases.py)
_MIN_COMPACT_ROWS = 8  # automatic compaction: a halved batch keeps at least this many rows ...
_MAX_COMPACTIONS = 2  # ... and the batch is halved at most this many times (one loop-body compile per phase each)
_trace_count = 0  # incremented each time the core is traced: tests assert bucketing avoids recompiles


@flax.struct.dataclass
class GenerateOutput:
  """Generated continuation of each row; column t is the t-th new token.

  tokens_bt:   [B, T] int32; `pad_id` after a row's stop token.
  mask_bt:     [B, T] bool; True for generated tokens, the stop token included.
  logprobs_bt: [B, T] float32; log-prob of each token under the distribution it was drawn from; 0 where masked.
  finished_b:  [B] bool; the row emitted a stop id (False: it ran out of budget).
  entropy_bt:  [B, T] float32 entropy of that distribution (only with return_entropy=True); 0 where masked.
  decoded_rows: [] int32: rows the decode loop ran, summed over its steps (live or not): mask_bt.sum() - B over
               it is the share of decode work that produced tokens (compaction raises it).
  """
  tokens_bt: jax.Array
  mask_bt: jax.Array
  logprobs_bt: jax.Array
  finished_b: jax.Array
  entropy_bt: jax.Array | None = None
  decoded_rows: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Sampling:
  temperature: float
  top_k: int
  top_p: float
  eos_ids: tuple[int, ...]
  pad_id: int
  return_entropy: bool


def bucket_length(length: int, *, buckets: Buckets = "pow2") -> int:
  """The padded prompt length for `length` real tokens.

  "pow2": the next power of two (at least 16); an int m: the next multiple of m; a sequence: its smallest
  entry >= length. Few distinct buckets mean few compiles; a tight bucket means less padded prefill work.
  """
  if length < 1:
    raise CotsafeError(f"bucket_length: length={length} (expected >= 1)")
  if isinstance(buckets, str):
    if buckets != "pow2":
      raise CotsafeError(f"bucket_length: buckets={buckets!r} (expected 'pow2', an int, or a list of lengths)")
    return max(_MIN_BUCKET, 1 << (length - 1).bit_length())
  if isinstance(buckets, int):
    if buckets < 1:
      raise CotsafeError(f"bucket_length: buckets={buckets} (expected a positive multiple)")
    return -(-length // buckets) * buckets
  fits = sorted(b for b in buckets if b >= length)
  if not fits:
    raise CotsafeError(f"bucket_length: a prompt of {length} tokens exceeds the largest bucket "
                       f"{max(buckets, default=0)} (buckets={list(buckets)})")
  return fits[0]


def _sample(logits_bv: jax.Array, u_b: jax.Array | None, s: _Sampling) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draw one token per row with its uniform u_b in [0, 1) -> (token_b, logprob_b, entropy_b), float32 maths.

  Greedy (temperature 0) reports the log-prob and entropy of the plain softmax (a point mass carries none).
  Otherwise: z = logits / temperature; keep the top_k largest; of those keep the smallest prefix whose
  probability reaches top_p (the top token always); draw from the renormalised softmax over the kept set.
  """
  z_bv = logits_bv.astype(jnp.float32)
  if s.temperature == 0.0:
    logp_bv = jax.nn.log_softmax(z_bv, axis=-1)
    tok_b = jnp.argmax(z_bv, axis=-1).astype(jnp.int32)
    return tok_b, _take(logp_bv, tok_b), -jnp.sum(jnp.exp(logp_bv) * logp_bv, axis=-1)
  z_bv = z_bv / jnp.float32(s.temperature)
  if not s.top_k and s.top_p >= 1.0:
    return _draw(u_b, z_bv)
  vocab = z_bv.shape[-1]
  if s.top_k or vocab <= _NUCLEUS_CANDIDATES:
    return _top_k_top_p(z_bv, u_b, min(s.top_k, vocab) if s.top_k else vocab, s.top_p)
  # top-p alone: the nucleus from the _NUCLEUS_CANDIDATES largest logits (a partial top-k, not a sort of the whole
  # vocabulary) when they hold at least top_p of the probability (then every token the nucleus keeps is among them:
  # the next one already has top_p above it); otherwise, for the whole batch, the full sort
  lse_b = jax.nn.logsumexp(z_bv, axis=-1)
  z_bc, _ = jax.lax.top_k(z_bv, _NUCLEUS_CANDIDATES)
  covered = jnp.all(jnp.sum(jnp.exp(z_bc - lse_b[:, None]), axis=-1) >= jnp.float32(s.top_p))
  return jax.lax.cond(covered, lambda z: _top_k_top_p(z, u_b, _NUCLEUS_CANDIDATES, s.top_p, lse_b=lse_b),
                      lambda z: _top_k_top_p(z, u_b, vocab, s.top_p, lse_b=lse_b), z_bv)


def _top_k_top_p(z_bv: jax.Array, u_b: jax.Array, k: int, top_p: float,
                 lse_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keep the k largest of z_bv, then (top_p < 1) the smallest prefix of them whose probability reaches top_p,
  and draw. The prefix's probabilities are the softmax over the k kept (`lse_b` None: top-k renormalises first) or
  over the whole vocabulary (`lse_b`: its log-sum-exp; top-p alone, where the k are a prefilter)."""
  z_bk, idx_bk = jax.lax.top_k(z_bv, k)  # sorted descending
  if top_p < 1.0:
    p_bk = jax.nn.softmax(z_bk, axis=-1) if lse_b is None else jnp.exp(z_bk - lse_b[:, None])
    above_bk = jnp.cumsum(p_bk, axis=-1) - p_bk  # mass of the better candidates; exactly 0 for the top one
    z_bk = jnp.where(above_bk < jnp.float32(top_p), z_bk, -jnp.inf)
  j_b, logp_b, ent_b = _draw(u_b, z_bk)
  return _take(idx_bk, j_b), logp_b, ent_b


def _draw(u_b: jax.Array, z_bv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inverse-CDF draw from softmax(z_bv) (-inf entries never drawn) with uniforms u_b in [0, 1) -> (index_b,
  logprob_b, entropy_b).

  One uniform per row, located in two levels (blocks of _BLOCK, then within the block) so the cost is a
  few passes over the logits: on CPU a Gumbel-max draw (random bits for all B x V) costs 10x more.
  """
  b, v = z_bv.shape
  nb = -(-v // _BLOCK)
  m_b1 = jnp.max(z_bv, axis=-1, keepdims=True)
  e_bv = jnp.exp(z_bv - m_b1)  # unnormalised probabilities, max entry 1
  e_bnk = jnp.pad(e_bv, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
  mass_bn = jnp.sum(e_bnk, axis=-1)
  cum_bn = jnp.cumsum(mass_bn, axis=-1)
  total_b = cum_bn[:, -1]
  x_b = (1.0 - u_b) * total_b  # in (0, total]
  blk_b = jnp.minimum(jnp.sum(cum_bn < x_b[:, None], axis=-1), nb - 1)
  e_bk = jnp.take_along_axis(e_bnk, blk_b[:, None, None], axis=1)[:, 0]
  cum_bk = (_take(cum_bn, blk_b) - _take(mass_bn, blk_b))[:, None] + jnp.cumsum(e_bk, axis=-1)
  j_b = jnp.sum(cum_bk < x_b[:, None], axis=-1)
  pos_bk = e_bk > 0  # rounding between the two levels must never land on a zero-probability entry
  first_b = jnp.argmax(pos_bk, axis=-1)
  last_b = _BLOCK - 1 - jnp.argmax(pos_bk[:, ::-1], axis=-1)
  idx_b = (blk_b * _BLOCK + jnp.clip(j_b, first_b, last_b)).astype(jnp.int32)
  lse_b = m_b1[:, 0] + jnp.log(total_b)
  logp_bv = z_bv - lse_b[:, None]
  p_bv = e_bv / total_b[:, None]
  ent_b = -jnp.sum(jnp.where(p_bv > 0, p_bv * logp_bv, 0.0), axis=-1)  # filtered: 0 * -inf -> 0
  return idx_b, _take(z_bv, idx_b) - lse_b, ent_b


def _take(x_bv: jax.Array, i_b: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_bv, i_b[:, None], axis=-1)[:, 0]


def phase_ends(max_new_tokens: int, cache_phases: int) -> list[int]:
  """The step each decode phase ends before: steps 1 .. max_new_tokens - 1 in `cache_phases` near-equal runs.

  Step i feeds the token drawn at step i - 1 into cache slot prompt_len + i - 1 and attends over slots
  0 .. prompt_len + i - 1, so a phase ending before step e needs a cache of prompt_len + e - 1 slots.
  """
  steps = max_new_tokens - 1
  phases = max(1, min(cache_phases, steps))
  return [1 + steps * (k + 1) // phases for k in range(phases)]


def auto_cache_phases(max_new_tokens: int) -> int:
  """One decode phase per _STEPS_PER_PHASE new tokens, at most _MAX_PHASES (one loop-body compile each)."""
  return max(1, min(_MAX_PHASES, max_new_tokens // _STEPS_PER_PHASE))


def auto_compactions(batch: int, shards: int, platform: str) -> int:
  """How many times the decode loop may halve its batch (drop finished rows): on an accelerator as many as keep
  >= _MIN_COMPACT_ROWS rows split evenly over the batch's `shards`, at most _MAX_COMPACTIONS; 0 on CPU (each
  halving compiles another copy of the loop; the committed CPU study and demo ran without it)."""
  if platform == "cpu":
    return 0
  n, rows = 0, batch
  while n < _MAX_COMPACTIONS and rows % 2 == 0 and rows // 2 >= _MIN_COMPACT_ROWS and (rows // 2) % shards == 0:
    n, rows = n + 1, rows // 2
  return n


def _shards(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def _core(dparams: decode_lib.DecodeParams, prompt_bp: jax.Array, mask_bp: jax.Array, rng: jax.Array, *,
          cfg: models.ModelConfig, max_new_tokens: int, s: _Sampling, cache_phases: int, compactions: int,
          unembedding_vd: bool, mesh: Mesh | None) -> GenerateOutput:
  global _trace_count
  _trace_count += 1
  if unembedding_vd:  # CPU: the head read as [V, D] by every step (one transposed copy per call when untied)
    dparams = decode_lib.with_unembedding_vd(cfg, dparams)
  b, p = prompt_bp.shape
  t = max_new_tokens
  ends = phase_ends(t, cache_phases)  # the last phase ends at t: p + t - 1 slots (the last token is never fed)
  starts = [1] + ends[:-1]
  eos_v = jnp.asarray(s.eos_ids if s.eos_ids else (-1,), jnp.int32)

  def emit(i, logits_rv, rows_r, done_r, out):
    """Draw step i's token for the rows in the batch (original rows `rows_r`; None: all, in order) and record it
    in the [B, ...] outputs. Each original row has its own uniform, whichever rows share its batch."""
    tokens_bt, logp_bt, ent_bt, len_b, done_b = out
    u_r = None
    if s.temperature != 0.0:
      u_r = jax.random.uniform(jax.random.fold_in(rng, i), (b,), jnp.float32)
      u_r = u_r if rows_r is None else u_r[rows_r]
    tok_r, logp_r, ent_r = _sample(logits_rv, u_r, s)
    live_r = ~done_r
    tok_r = jnp.where(live_r, tok_r, jnp.int32(s.pad_id))
    done_r = done_r | (live_r & jnp.isin(tok_r, eos_v))
    logp_r, ent_r = jnp.where(live_r, logp_r, 0.0), jnp.where(live_r, ent_r, 0.0)
    if rows_r is None:
      tokens_bt = jax.lax.dynamic_update_index_in_dim(tokens_bt, tok_r, i, axis=1)
      logp_bt = jax.lax.dynamic_update_index_in_dim(logp_bt, logp_r, i, axis=1)
      if s.return_entropy:
        ent_bt = jax.lax.dynamic_update_index_in_dim(ent_bt, ent_r, i, axis=1)
      len_b, done_b = len_b + live_r.astype(jnp.int32), done_r
    else:  # a compacted batch: distinct original rows, so scatters never collide
      tokens_bt, logp_bt = tokens_bt.at[rows_r, i].set(tok_r), logp_bt.at[rows_r, i].set(logp_r)
      if s.return_entropy:
        ent_bt = ent_bt.at[rows_r, i].set(ent_r)
      len_b, done_b = len_b.at[rows_r].add(live_r.astype(jnp.int32)), done_b.at[rows_r].set(done_r)
    return tok_r, done_r, (tokens_bt, logp_bt, ent_bt, len_b, done_b)

  # every cache segment allocated here: segment 0 the prompt and phase 0's slots, segment k phase k's
  sizes = [p + ends[0] - 1] + [e - a for a, e in zip(starts[1:], ends[1:])]
  logits_bv, cache = decode_lib.prefill(cfg, dparams, prompt_bp, mask_bp, sizes, mesh)
  out = (jnp.full((b, t), s.pad_id, jnp.int32), jnp.zeros((b, t), jnp.float32),
         jnp.zeros((b, t) if s.return_entropy else (b, 0), jnp.float32), jnp.zeros((b,), jnp.int32),
         jnp.zeros((b,), bool))
  tok_r, done_r, out = emit(0, logits_bv, None, out[4], out)

  shards = _shards(mesh)

  def cond(state, end, keep_above):
    i, _, _, done_r, *_ = state
    go = (i < end) & ~jnp.all(done_r)
    if keep_above is not None:  # leave the loop once every shard has at most half its rows live: it is halved
      live_s = jnp.sum(~done_r.reshape(shards, -1), axis=1)  # the batch's shards are contiguous blocks of rows
      go &= jnp.max(live_s) > keep_above // shards
    return go

  def body(state, segments):
    i, rows_r, tok_r, done_r, cache, out, decoded = state
    logits_rv, cache = decode_lib.decode_step(cfg, dparams, tok_r, cache, segments=segments)
    tok_r, done_r, out = emit(i, logits_rv, rows_r, done_r, out)
    return i + 1, rows_r, tok_r, done_r, cache, out, decoded + tok_r.shape[0]

  # one while loop per (batch size, phase): a phase's loop reads the cache segments filled up to its end, not every
  # slot of the longest generation; a batch size's loops end early once most of its rows have stopped, and the
  # live rows (with their caches) move into a batch half as large. Each loop is its own compiled body.
  state = (jnp.int32(1), None, tok_r, done_r, cache, out, jnp.int32(0))
  rows = b
  for level in range(compactions + 1 if t > 1 else 1):
    keep_above = rows // 2 if level < compactions else None
    if t > 1:
      for k, end in enumerate(ends):
        state = jax.lax.while_loop(functools.partial(cond, end=end, keep_above=keep_above),
                                   functools.partial(body, segments=k + 1), state)
    if keep_above is not None:
      state, rows = _compact(cfg, state, mesh), keep_above
  tokens_bt, logp_bt, ent_bt, len_b, done_b = state[5]
  mask_bt = jnp.arange(t)[None, :] < len_b[:, None]
  return GenerateOutput(tokens_bt=tokens_bt, mask_bt=mask_bt, logprobs_bt=logp_bt, finished_b=done_b,
                        entropy_bt=ent_bt if s.return_entropy else None, decoded_rows=state[6])


def _compact(cfg: models.ModelConfig, state: tuple, mesh: Mesh | None) -> tuple:
  """The decode state with its batch halved, each shard of the batch (data x fsdp) halved on its own chip:
  a shard's live rows first (all of them: the loop left only once every shard had at most half its rows live),
  then finished ones to fill; their caches, tokens and original row ids move along. No row crosses chips (a
  global selection would gather the whole halved batch's KV cache onto every chip)."""
  i, rows_r, tok_r, done_r, cache, out, decoded = state
  if rows_r is None:
    rows_r = jnp.arange(done_r.shape[0], dtype=jnp.int32)
  per_row = (rows_r, tok_r, done_r, cache["kv"], cache["mask"], cache["pos_b"])

  def halve(rows_r, tok_r, done_r, kv, masks, pos_b):
    keep = jnp.argsort(done_r, stable=True)[:done_r.shape[0] // 2]  # live (False) before finished, in row order
    return jax.tree.map(lambda x: jnp.take(x, keep, axis=0), (rows_r, tok_r, done_r, kv, masks, pos_b))

  if mesh is None:
    rows_r, tok_r, done_r, kv, masks, pos_b = halve(*per_row)
  else:
    b = done_r.shape[0]
    batch = mesh_lib.logical_to_spec(("batch",), (b,), mesh)[0]
    kv_specs = [[decode_lib.segment_specs(cfg, b, k.shape[-1], mesh) for k, _ in layer] for layer in cache["kv"]]
    specs = (P(batch), P(batch), P(batch), kv_specs, [P(batch, None) for _ in cache["mask"]], P(batch))
    rows_r, tok_r, done_r, kv, masks, pos_b = jax.shard_map(halve, mesh=mesh, in_specs=specs, out_specs=specs,
                                                            check_vma=False)(*per_row)
  return i, rows_r, tok_r, done_r, {**cache, "kv": kv, "mask": masks, "pos_b": pos_b}, out, decoded


@functools.lru_cache(maxsize=64)
def _compiled(cfg: models.ModelConfig, mesh: Mesh | None, batch: int, prompt_len: int, max_new_tokens: int,
              s: _Sampling, cache_phases: int, compactions: int, unembedding_vd: bool, gathered: bool):
  core = functools.partial(_core, cfg=cfg, max_new_tokens=max_new_tokens, s=s, cache_phases=cache_phases,
                           compactions=compactions, unembedding_vd=unembedding_vd, mesh=mesh)
  if mesh is None:
    return jax.jit(core)
  rows = mesh_lib.batch_sharding(mesh, 2, (batch, prompt_len))
  out_rows = mesh_lib.batch_sharding(mesh, 1, (batch,))  # prefix for every [B, ...] output
  rep = mesh_lib.replicated(mesh)
  outs = GenerateOutput(tokens_bt=out_rows, mask_bt=out_rows, logprobs_bt=out_rows, finished_b=out_rows,
                        entropy_bt=out_rows if s.return_entropy else None, decoded_rows=rep)
  weights = decode_lib.decode_shardings(cfg, mesh, gathered=gathered)
  # traced under the mesh: the model's activation constraints apply (its weight gathers are no-ops: the layout is
  # already whole on data x fsdp)
  return mesh_lib.OnMesh(jax.jit(core, in_shardings=(weights, rows, rows, rep), out_shardings=outs), mesh)


def _settings(mesh: Mesh | None, batch: int, max_new_tokens: int, cache_phases: int | None,
              compactions: int | None) -> tuple[int, int]:
  """(phases, compactions) as compiled: automatic values resolved, more phases than steps cut to one per step."""
  phases = auto_cache_phases(max_new_tokens) if cache_phases is None else cache_phases
  if compactions is None:
    compactions = auto_compactions(batch, _shards(mesh), mesh_lib.target_platform(mesh))
  return len(phase_ends(max_new_tokens, phases)), compactions


def generate_program(cfg: models.ModelConfig, mesh: Mesh | None, *, batch: int, prompt_len: int,
                     max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     eos_ids: Sequence[int] = (), pad_id: int = 0, return_entropy: bool = False,
                     cache_phases: int | None = None, compactions: int | None = None,
                     gathered_weights: bool = True) -> Any:
  """The jitted sampler `generate` runs for a [batch, prompt_len] bucket: call it as (decode_params, prompt_bp,
  mask_bp, rng) or `.lower(...)` it over abstract arguments (the `plan` job compiles it for a target; the
  DecodeParams come from `decode.decode_params_program`, with the same `gathered_weights`)."""
  s = _Sampling(float(temperature), int(top_k), float(top_p), tuple(int(e) for e in eos_ids), int(pad_id),
                bool(return_entropy))
  phases, compactions = _settings(mesh, batch, int(max_new_tokens), cache_phases, compactions)
  vd = mesh_lib.target_platform(mesh) == "cpu"
  return _compiled(cfg, mesh, batch, prompt_len, int(max_new_tokens), s, phases, compactions, vd,
                   bool(gathered_weights))


def _check_prompts(prompt_bp: Any, prompt_mask_bp: Any) -> int | None:
  """Validates shapes and left padding; returns the longest real prompt (None if the mask is not on this host)."""
  if not hasattr(prompt_bp, "ndim") or not hasattr(prompt_mask_bp, "ndim"):
    raise CotsafeError("generate: prompt_bp and prompt_mask_bp must be arrays (numpy or jax), [batch, prompt_len]")
  if prompt_bp.ndim != 2 or prompt_bp.shape != prompt_mask_bp.shape:
    raise CotsafeError(f"generate: prompt_bp {tuple(prompt_bp.shape)} and prompt_mask_bp "
                       f"{tuple(prompt_mask_bp.shape)} must both be [batch, prompt_len]")
  if not jnp.issubdtype(prompt_bp.dtype, jnp.integer):
    raise CotsafeError(f"generate: prompt_bp has dtype {prompt_bp.dtype} (expected integer token ids)")
  if isinstance(prompt_mask_bp, jax.Array) and not prompt_mask_bp.is_fully_addressable:
    return None  # multi-process: each host holds a slice; it was checked where it was built
  mask_bp = np.asarray(prompt_mask_bp).astype(bool)
  lengths_b = mask_bp.sum(axis=1)
  empty = np.flatnonzero(lengths_b == 0)
  if empty.size:
    raise CotsafeError(f"generate: prompt_mask_bp row {empty[0]} has no real token (expected >= 1 per row)")
  p = mask_bp.shape[1]
  left_padded_b = (mask_bp == (np.arange(p)[None, :] >= (p - lengths_b)[:, None])).all(axis=1)
  bad = np.flatnonzero(~left_padded_b)
  if bad.size:
    raise CotsafeError(f"generate: prompt_mask_bp row {bad[0]} is not left-padded "
                       f"(expected padding only before the first real token)")
  return int(lengths_b.max())


def generate(cfg: models.ModelConfig, params: Any, prompt_bp: Any, prompt_mask_bp: Any, *, rng: jax.Array,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, return_entropy: bool = False,
             buckets: Buckets = "pow2", cache_phases: int | None = None, compactions: int | None = None,
             gathered_weights: bool = True, mesh: Mesh | None = None) -> GenerateOutput:
  """Sample up to `max_new_tokens` per left-padded prompt row with a KV cache; deterministic for a given `rng`.

  Prefill the prompt, then a `lax.while_loop` decodes one token per row per step and exits once every row
  has emitted one of `eos_ids` (or the budget is spent). Tokens after a row's stop are `pad_id`, masked out.
  temperature=0 is greedy; top_k=0 and top_p=1 disable those filters (top-k is applied before top-p).

  Prompts are trimmed of all-padding columns and left-padded to `bucket_length(longest, buckets=buckets)`,
  so varying prompt lengths reuse one compiled program. Under a mesh (given, or read from the params'
  shardings) the batch is sharded over data x fsdp.

  `params`: the training params, or a `decode.DecodeParams` made from them once (`decode.decode_params`) and
  reused across calls. The training params are laid out anew on each call: per-layer weights in the compute
  dtype, split over tensor only (whole on data x fsdp, so no decode step gathers weights), or with
  gathered_weights=False split like the params (each step gathers each layer: for chips that cannot hold a
  whole copy).

  The decode runs in `cache_phases` consecutive loops (default `auto_cache_phases(max_new_tokens)`: one per
  64 new tokens, at most 4), each over the KV cache segments that end at its own last step (all allocated at
  prefill, none copied), so a step's attention reads about the filled part of the cache instead of all
  prompt + max_new_tokens slots (4 phases: 5/8 of the cache reads of one loop when the prompt is short). The
  slots a phase leaves out are the empty ones every step masks anyway, so the draws are the same (tests hold
  them equal); each phase compiles its own loop body.

  Finished rows: the loop ends once every row has stopped, and with `compactions` = n > 0 it may halve its
  batch up to n times: once every shard of the batch (data x fsdp) has at most half its rows live, each shard's
  live rows (and their caches) move into a shard half as large on the same chip, so the long tail of a few long
  chains of thought does not pay for the whole batch and no KV cache crosses chips. Every row keeps its own random
  stream, so compaction does not change the draws. Default `auto_compactions`: up to 2 on TPU / GPU
  while a halved batch keeps >= 8 rows split evenly over data x fsdp; none on CPU. Each halving compiles the
  phase loops again.

  `logprobs_bt` are the sampler's log-probs under the tempered, filtered distribution each token was drawn
  from (greedy: the plain softmax). The trainer does not use them for the PPO ratio: it recomputes the old
  policy's log-probs with the fused `kernels.logprob_entropy` op on the generated tokens (temperature-scaled,
  unfiltered), so sampler and trainer numerics never have to agree bit for bit; these are for diagnostics
  and for checking that agreement.
  """
  if max_new_tokens < 1:
    raise CotsafeError(f"generate: max_new_tokens={max_new_tokens} (expected >= 1)")
  if temperature < 0:
    raise CotsafeError(f"generate: temperature={temperature} (expected >= 0; 0 is greedy)")
  if top_k < 0:
    raise CotsafeError(f"generate: top_k={top_k} (expected >= 0; 0 disables it)")
  if not 0.0 < top_p <= 1.0:
    raise CotsafeError(f"generate: top_p={top_p} (expected 0 < top_p <= 1; 1 disables it)")
  if cache_phases is None:
    cache_phases = auto_cache_phases(max_new_tokens)
  if isinstance(cache_phases, bool) or not isinstance(cache_phases, int) or cache_phases < 1:
    raise CotsafeError(f"generate: cache_phases={cache_phases!r} (expected a positive int, or None for automatic)")
  if compactions is not None and (isinstance(compactions, bool) or not isinstance(compactions, int)
                                  or compactions < 0):
    raise CotsafeError(f"generate: compactions={compactions!r} (expected an int >= 0, or None for automatic)")
  eos = tuple(int(e) for e in eos_ids)
  bad_ids = [i for i in eos + (int(pad_id),) if not 0 <= i < cfg.vocab_size]
  if bad_ids:
    raise CotsafeError(f"generate: eos_ids/pad_id {bad_ids} outside the vocabulary [0, {cfg.vocab_size})")
  longest = _check_prompts(prompt_bp, prompt_mask_bp)
  p = prompt_bp.shape[1]
  if longest is not None:
    target = bucket_length(longest, buckets=buckets)
    if target < p:  # drop leading columns that are padding in every row
      prompt_bp, prompt_mask_bp = prompt_bp[:, p - target:], prompt_mask_bp[:, p - target:]
  else:
    target = bucket_length(p, buckets=buckets)
  width = prompt_bp.shape[1]
  prompt_bp = jnp.asarray(prompt_bp, jnp.int32)
  prompt_mask_bp = jnp.asarray(prompt_mask_bp, bool)
  if target > width:
    prompt_bp = jnp.pad(prompt_bp, ((0, 0), (target - width, 0)), constant_values=pad_id)
    prompt_mask_bp = jnp.pad(prompt_mask_bp, ((0, 0), (target - width, 0)))
  mesh = decode_lib.mesh_of(params) if mesh is None else mesh
  # a DecodeParams passes through as it is
  dparams = decode_lib.decode_params(cfg, params, mesh=mesh, gathered=gathered_weights)
  s = _Sampling(float(temperature), int(top_k), float(top_p), eos, int(pad_id), bool(return_entropy))
  batch = prompt_bp.shape[0]
  phases, compactions = _settings(mesh, batch, int(max_new_tokens), cache_phases, compactions)
  if compactions and batch % (2 ** compactions * _shards(mesh)):
    raise CotsafeError(f"generate: compactions={compactions} halves the batch of {batch} rows {compactions} times, "
                       f"which needs a multiple of {2 ** compactions * _shards(mesh)} rows (data x fsdp = "
                       f"{_shards(mesh)})")
  fn = _compiled(cfg, mesh, batch, prompt_bp.shape[1], int(max_new_tokens), s, phases, compactions,
                 mesh_lib.target_platform(mesh) == "cpu", dparams.gathered)
  return fn(dparams, prompt_bp, prompt_mask_bp, rng)
