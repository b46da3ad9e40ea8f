"""rollout.decode (layers unrolled over unstacked params) equals models.prefill / models.decode_step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rollout import decode


def _model(family, *, num_layers, seed):
  """A tiny model; llama with tied embeddings (the decode loop then reads the embedding as the head)."""
  cfg = models.tiny_config(family, vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=num_layers,
                           num_heads=4, num_kv_heads=2, tie_word_embeddings=family == "llama")
  return cfg, models.init_params(cfg, jax.random.key(seed))


def _prompts(rs, b, p, left_pad):
  """Random [b, p] prompts and their mask, row r left-padded by left_pad[r] tokens."""
  mask = np.ones((b, p), bool)
  for row, pad in left_pad.items():
    mask[row, :pad] = False
  return jnp.asarray(rs.randint(1, 53, (b, p))), jnp.asarray(mask)


def _real_slots(k, v, mask_bs):
  """k [L, B, K, Dh, S], v [L, B, K, S, Dh] at the slots holding real tokens -> [L, N, K, Dh] each.

  Padding slots hold keys of fully masked queries (attention spread over however many empty slots the cache
  has): no real query reads them, so caches are compared at real slots only.
  """
  return np.asarray(k).transpose(0, 1, 4, 2, 3)[:, mask_bs], np.asarray(v).transpose(0, 1, 3, 2, 4)[:, mask_bs]


def _joined(cache):
  """A decode cache's segments joined along the slots -> k [L, B, K, Dh, S], v [L, B, K, S, Dh], mask [B, S]."""
  k = np.stack([np.concatenate([np.asarray(k) for k, _ in layer], axis=-1) for layer in cache["kv"]])
  v = np.stack([np.concatenate([np.asarray(v) for _, v in layer], axis=-2) for layer in cache["kv"]])
  return k, v, np.concatenate([np.asarray(m) for m in cache["mask"]], axis=1)


@pytest.mark.parametrize("family,unembedding_vd,segments", [("qwen3", True, (7,)), ("qwen3", False, (5, 1, 1)),
                                                            ("llama", True, (6, 1))])
def test_unrolled_decode_equals_models_decode_step(family, unembedding_vd, segments):
  # (qwen2 is covered by the sampler tests, against the full forward). The cache in one segment or several: each
  # step writes into the segment holding its slot and attends over the segments up to it
  cfg, params = _model(family, num_layers=2, seed=2)
  rs = np.random.RandomState(0)
  b, p, n = 3, 5, 2
  prompt, mask = _prompts(rs, b, p, {0: 3})
  dparams = decode.decode_params(cfg, params)
  if unembedding_vd:  # the CPU sampler's head: read as [V, D]
    dparams = decode.with_unembedding_vd(cfg, dparams)
  ends = np.cumsum(segments)
  in_use = [int(np.searchsorted(ends, p + j, side="right")) + 1 for j in range(n)]  # segments step j reads

  @jax.jit
  def both(params, dparams, tokens_nb):
    _, ref_cache = models.prefill(cfg, params, prompt, mask, models.init_cache(cfg, b, p + n))
    _, ours = decode.prefill(cfg, dparams, prompt, mask, segments)
    ref, got = [], []
    for tok_b, used in zip(tokens_nb, in_use):
      logits, ref_cache = models.decode_step(cfg, params, tok_b, ref_cache)
      ref.append(logits)
      logits, ours = decode.decode_step(cfg, dparams, tok_b, ours, segments=used)
      got.append(logits)
    return jnp.stack(ref), jnp.stack(got), ref_cache, ours

  assert all(x.dtype == cfg.dtype for x in jax.tree.leaves(dparams) if jnp.issubdtype(x.dtype, jnp.floating))
  ref, got, ref_cache, ours = both(params, dparams, jnp.asarray(rs.randint(0, 53, (n, b))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
  k, v, mask_bs = _joined(ours)
  np.testing.assert_array_equal(mask_bs, np.asarray(ref_cache["mask_bs"]))
  for key in ("pos_b", "index"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(ref_cache[key]))
  real_bs = np.asarray(ref_cache["mask_bs"])
  assert real_bs.all(axis=0)[p:].all()  # the decoded tokens' slots are compared too
  for g, r in zip(_real_slots(k, v, real_bs), _real_slots(ref_cache["k"], ref_cache["v"], real_bs)):
    np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("family,unembedding_vd", [("qwen3", True), ("llama", False)])
def test_prefill_over_prompt_slots_equals_models_prefill(family, unembedding_vd):
  # decode.prefill attends over the P prompt slots and writes them into the first of the cache's segments;
  # models.prefill attends over all slots
  cfg, params = _model(family, num_layers=3, seed=3)
  rs = np.random.RandomState(1)
  b, p, slots = 3, 6, 11
  prompt, mask = _prompts(rs, b, p, {0: 4, 2: 1})
  ref_logits, ref = models.prefill(cfg, params, prompt, mask, models.init_cache(cfg, b, slots))
  dparams = decode.decode_params(cfg, params)
  if unembedding_vd:
    dparams = decode.with_unembedding_vd(cfg, dparams)
  ours = jax.jit(lambda d, prompt, mask: decode.prefill(cfg, d, prompt, mask, (8, 3)))

  logits, cache = ours(dparams, prompt, mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5)
  k, v, mask_bs = _joined(cache)
  assert k.shape == ref["k"].shape and v.shape == ref["v"].shape
  real_bs = np.asarray(ref["mask_bs"])
  for g, r in zip(_real_slots(k, v, real_bs), _real_slots(ref["k"], ref["v"], real_bs)):
    np.testing.assert_allclose(g, r, atol=1e-5)
  assert not k[..., p:].any() and not v[..., p:, :].any()  # the slots after the prompt stay empty
  np.testing.assert_array_equal(mask_bs, np.asarray(ref["mask_bs"]))
  for key in ("pos_b", "index"):
    np.testing.assert_array_equal(np.asarray(cache[key]), np.asarray(ref[key]))
  with pytest.raises(CotsafeError, match=r"cache segments \[5\] \(expected the first >= the prompt length 6\)"):
    decode.prefill(cfg, dparams, prompt, mask, 5)


def test_decode_params_cast_once_to_the_compute_dtype_and_reused():
  # float32 params, bf16 compute: every float weight of the layout is bf16 (no step reads float32 weights); the
  # layers are separate trees (no slicing of the stack in the loop); a DecodeParams passes through unchanged
  cfg, params = _model("qwen3", num_layers=3, seed=4)
  cfg = cfg.replace(dtype=jnp.bfloat16)
  layout = decode.decode_params(cfg, params)
  assert {x.dtype for x in jax.tree.leaves(layout)} == {jnp.dtype(jnp.bfloat16)}
  assert len(layout.weights["layers"]) == 3
  np.testing.assert_array_equal(np.asarray(layout.weights["layers"][2]["mlp"]["up_kernel"]),
                                np.asarray(params["layers"]["mlp"]["up_kernel"][2].astype(jnp.bfloat16)))
  assert decode.decode_params(cfg, layout) is layout
