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
from jax.sharding import Mesh, NamedSharding

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
_trace_count = 0  # incremented each time the core is traced: tests assert bucketing avoids recompiles


@flax.struct.dataclass
class GenerateOutput:
  """Generated continuation of each row; column t is the t-th new token.

  tokens_bt:   [B, T] int32; `pad_id` after a row's stop token.
  mask_bt:     [B, T] bool; True for generated tokens, the stop token included.
  logprobs_bt: [B, T] float32; log-prob of each token under the distribution it was drawn from; 0 where masked.
  finished_b:  [B] bool; the row emitted a stop id (False: it ran out of budget).
  entropy_bt:  [B, T] float32 entropy of that distribution (only with return_entropy=True); 0 where masked.
  """
  tokens_bt: jax.Array
  mask_bt: jax.Array
  logprobs_bt: jax.Array
  finished_b: jax.Array
  entropy_bt: jax.Array | None = None


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


def _sample(logits_bv: jax.Array, key: jax.Array, s: _Sampling) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draw one token per row -> (token_b, logprob_b, entropy_b), all in float32 maths.

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
    return _draw(key, z_bv)
  vocab = z_bv.shape[-1]
  if s.top_k or vocab <= _NUCLEUS_CANDIDATES:
    return _top_k_top_p(z_bv, key, min(s.top_k, vocab) if s.top_k else vocab, s.top_p)
  # top-p alone: the nucleus from the _NUCLEUS_CANDIDATES largest logits (a partial top-k, not a sort of the whole
  # vocabulary) when they hold at least top_p of the probability (then every token the nucleus keeps is among them:
  # the next one already has top_p above it); otherwise, for the whole batch, the full sort
  lse_b = jax.nn.logsumexp(z_bv, axis=-1)
  z_bc, _ = jax.lax.top_k(z_bv, _NUCLEUS_CANDIDATES)
  covered = jnp.all(jnp.sum(jnp.exp(z_bc - lse_b[:, None]), axis=-1) >= jnp.float32(s.top_p))
  return jax.lax.cond(covered, lambda z: _top_k_top_p(z, key, _NUCLEUS_CANDIDATES, s.top_p, lse_b=lse_b),
                      lambda z: _top_k_top_p(z, key, vocab, s.top_p, lse_b=lse_b), z_bv)


def _top_k_top_p(z_bv: jax.Array, key: jax.Array, k: int, top_p: float,
                 lse_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keep the k largest of z_bv, then (top_p < 1) the smallest prefix of them whose probability reaches top_p,
  and draw. The prefix's probabilities are the softmax over the k kept (`lse_b` None: top-k renormalises first) or
  over the whole vocabulary (`lse_b`: its log-sum-exp; top-p alone, where the k are a prefilter)."""
  z_bk, idx_bk = jax.lax.top_k(z_bv, k)  # sorted descending
  if top_p < 1.0:
    p_bk = jax.nn.softmax(z_bk, axis=-1) if lse_b is None else jnp.exp(z_bk - lse_b[:, None])
    above_bk = jnp.cumsum(p_bk, axis=-1) - p_bk  # mass of the better candidates; exactly 0 for the top one
    z_bk = jnp.where(above_bk < jnp.float32(top_p), z_bk, -jnp.inf)
  j_b, logp_b, ent_b = _draw(key, z_bk)
  return _take(idx_bk, j_b), logp_b, ent_b


def _draw(key: jax.Array, z_bv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inverse-CDF draw from softmax(z_bv) (-inf entries never drawn) -> (index_b, logprob_b, entropy_b).

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
  x_b = (1.0 - jax.random.uniform(key, (b,), jnp.float32)) * total_b  # in (0, total]
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


def _core(params: Any, prompt_bp: jax.Array, mask_bp: jax.Array, rng: jax.Array, *, cfg: models.ModelConfig,
          max_new_tokens: int, s: _Sampling, cache_phases: int, mesh: Mesh | None) -> GenerateOutput:
  global _trace_count
  _trace_count += 1
  b, p = prompt_bp.shape
  t = max_new_tokens
  ends = phase_ends(t, cache_phases)  # the last phase ends at t: p + t - 1 slots (the last token is never fed)
  eos_v = jnp.asarray(s.eos_ids if s.eos_ids else (-1,), jnp.int32)

  def emit(i, logits_bv, done_b, tokens_bt, logp_bt, ent_bt):
    tok_b, logp_b, ent_b = _sample(logits_bv, jax.random.fold_in(rng, i), s)
    live_b = ~done_b
    tok_b = jnp.where(live_b, tok_b, jnp.int32(s.pad_id))
    tokens_bt = jax.lax.dynamic_update_index_in_dim(tokens_bt, tok_b, i, axis=1)
    logp_bt = jax.lax.dynamic_update_index_in_dim(logp_bt, jnp.where(live_b, logp_b, 0.0), i, axis=1)
    if s.return_entropy:
      ent_bt = jax.lax.dynamic_update_index_in_dim(ent_bt, jnp.where(live_b, ent_b, 0.0), i, axis=1)
    done_b = done_b | (live_b & jnp.isin(tok_b, eos_v))
    return tok_b, done_b, tokens_bt, logp_bt, ent_bt, live_b.astype(jnp.int32)

  on_cpu = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform == "cpu"
  # the layers sliced out of the scan once, for the prefill and every decode step
  dparams = decode_lib.decode_params(cfg, params, unembedding_vd=on_cpu)
  logits_bv, cache = decode_lib.prefill(cfg, dparams, prompt_bp, mask_bp, p + ends[0] - 1, mesh)
  tokens_bt = jnp.full((b, t), s.pad_id, jnp.int32)
  logp_bt = jnp.zeros((b, t), jnp.float32)
  ent_bt = jnp.zeros((b, t) if s.return_entropy else (b, 0), jnp.float32)
  tok_b, done_b, tokens_bt, logp_bt, ent_bt, len_b = emit(0, logits_bv, jnp.zeros((b,), bool), tokens_bt,
                                                          logp_bt, ent_bt)

  def cond(state, end):
    i, _, done_b, *_ = state
    return (i < end) & ~jnp.all(done_b)

  def body(state):
    i, tok_b, done_b, cache, tokens_bt, logp_bt, ent_bt, len_b = state
    logits_bv, cache = decode_lib.decode_step(cfg, dparams, tok_b, cache)
    tok_b, done_b, tokens_bt, logp_bt, ent_bt, live_b = emit(i, logits_bv, done_b, tokens_bt, logp_bt, ent_bt)
    return i + 1, tok_b, done_b, cache, tokens_bt, logp_bt, ent_bt, len_b + live_b

  # one while loop per phase, each over a cache just long enough for its steps: attention reads the filled
  # part of the cache (rounded up to the phase's end), not every slot of the longest generation
  state = (jnp.int32(1), tok_b, done_b, cache, tokens_bt, logp_bt, ent_bt, len_b)
  for k, end in enumerate(ends):
    if k:
      state = (*state[:3], decode_lib.grow_cache(cfg, state[3], p + end - 1, mesh), *state[4:])
    state = jax.lax.while_loop(functools.partial(cond, end=end), body, state)
  _, _, done_b, _, tokens_bt, logp_bt, ent_bt, len_b = state
  mask_bt = jnp.arange(t)[None, :] < len_b[:, None]
  return GenerateOutput(tokens_bt=tokens_bt, mask_bt=mask_bt, logprobs_bt=logp_bt, finished_b=done_b,
                        entropy_bt=ent_bt if s.return_entropy else None)


@functools.lru_cache(maxsize=64)
def _compiled(cfg: models.ModelConfig, mesh: Mesh | None, batch: int, prompt_len: int, max_new_tokens: int,
              s: _Sampling, cache_phases: int):
  core = functools.partial(_core, cfg=cfg, max_new_tokens=max_new_tokens, s=s, cache_phases=cache_phases,
                           mesh=mesh)
  if mesh is None:
    return jax.jit(core)
  rows = mesh_lib.batch_sharding(mesh, 2, (batch, prompt_len))
  out_rows = mesh_lib.batch_sharding(mesh, 1, (batch,))  # prefix for every [B, ...] output
  # traced under the mesh: the model's per-layer weight gathers and activation constraints apply
  return mesh_lib.OnMesh(jax.jit(core, in_shardings=(models.param_shardings(cfg, mesh), rows, rows,
                                                     mesh_lib.replicated(mesh)), out_shardings=out_rows), mesh)


def generate_program(cfg: models.ModelConfig, mesh: Mesh | None, *, batch: int, prompt_len: int,
                     max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     eos_ids: Sequence[int] = (), pad_id: int = 0, return_entropy: bool = False,
                     cache_phases: int | None = None) -> Any:
  """The jitted sampler `generate` runs for a [batch, prompt_len] bucket: call it as (params, prompt_bp,
  mask_bp, rng) or `.lower(...)` it over abstract arguments (the `plan` job compiles it for a target)."""
  phases = auto_cache_phases(max_new_tokens) if cache_phases is None else cache_phases
  s = _Sampling(float(temperature), int(top_k), float(top_p), tuple(int(e) for e in eos_ids), int(pad_id),
                bool(return_entropy))
  return _compiled(cfg, mesh, batch, prompt_len, int(max_new_tokens), s,
                   len(phase_ends(int(max_new_tokens), phases)))


def _mesh_of(params: Any) -> Mesh | None:
  leaf = jax.tree.leaves(params)[0]
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


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
             buckets: Buckets = "pow2", cache_phases: int | None = None,
             mesh: Mesh | None = None) -> GenerateOutput:
  """Sample up to `max_new_tokens` per left-padded prompt row with a KV cache; deterministic for a given `rng`.

  Prefill the prompt, then a `lax.while_loop` decodes one token per row per step and exits once every row
  has emitted one of `eos_ids` (or the budget is spent). Tokens after a row's stop are `pad_id`, masked out.
  temperature=0 is greedy; top_k=0 and top_p=1 disable those filters (top-k is applied before top-p).

  Prompts are trimmed of all-padding columns and left-padded to `bucket_length(longest, buckets=buckets)`,
  so varying prompt lengths reuse one compiled program. Under a mesh (given, or read from the params'
  shardings) the batch is sharded over data x fsdp and the params follow the logical-axis rules.

  The decode runs in `cache_phases` consecutive loops (default `auto_cache_phases(max_new_tokens)`: one per
  64 new tokens, at most 4), each over a KV cache that ends at its own last step, grown between phases,
  so a step's attention reads about the filled part of the cache instead of all prompt + max_new_tokens
  slots (4 phases: 5/8 of the cache reads of one loop when the prompt is short). The slots a phase leaves
  out are the empty ones every step masks anyway, so the draws are the same (tests hold them equal); each
  phase compiles its own loop body.

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
  mesh = _mesh_of(params) if mesh is None else mesh
  s = _Sampling(float(temperature), int(top_k), float(top_p), eos, int(pad_id), bool(return_entropy))
  phases = len(phase_ends(int(max_new_tokens), cache_phases))  # more phases than steps: one per step
  fn = _compiled(cfg, mesh, prompt_bp.shape[0], prompt_bp.shape[1], int(max_new_tokens), s, phases)
  return fn(params, prompt_bp, prompt_mask_bp, rng)
