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


@pytest.mark.parametrize("family,unembedding_vd", [("qwen3", True), ("qwen3", False), ("llama", True)])
def test_unrolled_decode_equals_models_decode_step(family, unembedding_vd):
  # (qwen2 is covered by the sampler tests, against the full forward)
  cfg, params = _model(family, num_layers=2, seed=2)
  rs = np.random.RandomState(0)
  b, p, n = 3, 5, 2
  prompt, mask = _prompts(rs, b, p, {0: 3})

  @jax.jit
  def both(params, tokens_nb):
    _, ref_cache = models.prefill(cfg, params, prompt, mask, models.init_cache(cfg, b, p + n))
    dparams = decode.decode_params(cfg, params, unembedding_vd=unembedding_vd)
    _, ours = decode.prefill(cfg, dparams, prompt, mask, p + n)
    ref, got = [], []
    for tok_b in tokens_nb:
      logits, ref_cache = models.decode_step(cfg, params, tok_b, ref_cache)
      ref.append(logits)
      logits, ours = decode.decode_step(cfg, dparams, tok_b, ours)
      got.append(logits)
    return jnp.stack(ref), jnp.stack(got), ref_cache, ours

  ref, got, ref_cache, ours = both(params, jnp.asarray(rs.randint(0, 53, (n, b))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
  for key in ("mask_bs", "pos_b", "index"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(ref_cache[key]))
  real_bs = np.asarray(ref_cache["mask_bs"])
  assert real_bs.all(axis=0)[p:].all()  # the decoded tokens' slots are compared too
  got_kv = _real_slots(np.stack([k for k, _ in ours["kv"]]), np.stack([v for _, v in ours["kv"]]), real_bs)
  for g, r in zip(got_kv, _real_slots(ref_cache["k"], ref_cache["v"], real_bs)):
    np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("family,unembedding_vd", [("qwen3", True), ("llama", False)])
def test_prefill_over_prompt_slots_equals_models_prefill(family, unembedding_vd):
  # decode.prefill attends over the P prompt slots and pads the cache; models.prefill attends over all slots
  cfg, params = _model(family, num_layers=3, seed=3)
  rs = np.random.RandomState(1)
  b, p, slots = 3, 6, 11
  prompt, mask = _prompts(rs, b, p, {0: 4, 2: 1})
  ref_logits, ref = models.prefill(cfg, params, prompt, mask, models.init_cache(cfg, b, slots))

  @jax.jit
  def ours(params, prompt, mask):
    return decode.prefill(cfg, decode.decode_params(cfg, params, unembedding_vd=unembedding_vd), prompt, mask,
                          slots)

  logits, cache = ours(params, prompt, mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5)
  k = np.stack([np.asarray(k) for k, _ in cache["kv"]])
  v = np.stack([np.asarray(v) for _, v in cache["kv"]])
  assert k.shape == ref["k"].shape and v.shape == ref["v"].shape
  real_bs = np.asarray(ref["mask_bs"])
  for g, r in zip(_real_slots(k, v, real_bs), _real_slots(ref["k"], ref["v"], real_bs)):
    np.testing.assert_allclose(g, r, atol=1e-5)
  assert not k[..., p:].any() and not v[..., p:, :].any()  # the slots after the prompt stay empty
  for key in ("mask_bs", "pos_b", "index"):
    np.testing.assert_array_equal(np.asarray(cache[key]), np.asarray(ref[key]))
  with pytest.raises(CotsafeError, match="slots=5 is less than the prompt length 6"):
    decode.prefill(cfg, decode.decode_params(cfg, params), prompt, mask, 5)
