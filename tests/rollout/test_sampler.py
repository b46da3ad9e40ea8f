"""rollout.generate against the full forward: greedy, padding, log-probs, filters, stops, sharding, bucketing."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from cotsafe_jax import models, parallel, rollout
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rollout import decode, sampler

CFG = models.tiny_config("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2)
LM_SCALE = 40.0  # peaked next-token distributions: greedy has clear winners, filters cut real mass


def _scaled(params):
  return {**params, "lm_head": params["lm_head"] * LM_SCALE}


@pytest.fixture(scope="module")
def raw_params():
  return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def params(raw_params):
  return _scaled(raw_params)


def _prompts(lengths, width, seed=0):
  rs = np.random.RandomState(seed)
  mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
  return np.where(mask, rs.randint(1, CFG.vocab_size, (len(lengths), width)), 0).astype(np.int32), mask


def _teacher_logits(params, prompt_bp, mask_bp, out):
  """Logits [B, T, V] of the full forward predicting each generated token (float64)."""
  tokens = np.concatenate([prompt_bp, np.asarray(out.tokens_bt)], 1)
  mask = np.concatenate([mask_bp, np.asarray(out.mask_bt)], 1)
  logits = models.forward(CFG, params, jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask))
  p, t = prompt_bp.shape[1], out.tokens_bt.shape[1]
  return np.asarray(logits, np.float64)[:, p - 1:p + t - 1]


def _filtered_logp(z_v, top_k, top_p):
  """float64 log-probs of the top-k then top-p filtered softmax; -inf outside the kept set."""
  order = np.argsort(-z_v, kind="stable")
  keep = np.zeros(z_v.shape, bool)
  keep[order[:top_k or len(z_v)]] = True
  if top_p < 1.0:
    zk = z_v[order[:keep.sum()]]
    pk = np.exp(zk - zk.max())
    pk /= pk.sum()
    above = np.cumsum(pk) - pk
    keep[:] = False
    keep[order[:len(zk)][above < top_p]] = True
  z = np.where(keep, z_v, -np.inf)
  return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def test_greedy_equals_stepwise_argmax_of_full_forward(params):
  prompt, mask = _prompts([5, 9, 2], 9)
  t = 8
  out = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(0), max_new_tokens=t, temperature=0.0)
  buf = np.concatenate([prompt, np.zeros((3, t), np.int32)], 1)
  buf_mask = np.concatenate([mask, np.zeros((3, t), bool)], 1)  # right padding: causal, so never attended
  expected = []
  for i in range(t):
    logits = np.asarray(models.forward(CFG, params, jnp.asarray(buf), attention_mask_bt=jnp.asarray(buf_mask)))
    tok = logits[:, 9 + i - 1].argmax(-1)
    expected.append(tok)
    buf[:, 9 + i], buf_mask[:, 9 + i] = tok, True
    logp = special.log_softmax(logits[:, 9 + i - 1].astype(np.float64), axis=-1)
    np.testing.assert_allclose(np.asarray(out.logprobs_bt[:, i]), logp[np.arange(3), tok], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out.tokens_bt), np.stack(expected, 1))
  assert np.asarray(out.mask_bt).all() and not np.asarray(out.finished_b).any()


def test_prompt_alone_equals_prompt_in_left_padded_batch(params):
  batch, mask = _prompts([4, 11, 7], 11, seed=3)
  alone = rollout.generate(CFG, params, batch[2:, -7:], mask[2:, -7:], rng=jax.random.key(0),
                           max_new_tokens=8, temperature=0.0)
  together = rollout.generate(CFG, params, batch, mask, rng=jax.random.key(0), max_new_tokens=8,
                              temperature=0.0)
  np.testing.assert_array_equal(np.asarray(alone.tokens_bt[0]), np.asarray(together.tokens_bt[2]))
  np.testing.assert_allclose(np.asarray(alone.logprobs_bt[0]), np.asarray(together.logprobs_bt[2]), atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.8),
                                                     (1.5, 10, 0.85)])
def test_sampled_logprobs_support_and_frequencies_match_filtered_softmax(raw_params, temperature, top_k, top_p):
  """Rows 0-3: varied left-padded prompts, every step checked against the teacher-forced full forward.
  Rows 4+: one prompt repeated; the first-token frequencies follow the filtered distribution (chi-square)."""
  params = {**raw_params, "lm_head": raw_params["lm_head"] * 10.0}  # spread out: many tokens carry mass
  n, t = 2048, 4
  varied, varied_mask = _prompts([6, 3, 8, 8], 8, seed=1)
  same, same_mask = _prompts([8] * (n - 4), 8, seed=7)
  same[:] = same[0]
  prompt, mask = np.concatenate([varied, same]), np.concatenate([varied_mask, same_mask])
  kw = dict(max_new_tokens=t, temperature=temperature, top_k=top_k, top_p=top_p, return_entropy=True)
  out = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(1), **kw)

  head = jax.tree.map(lambda x: x[:5] if np.ndim(x) else x, out)
  z_btv = _teacher_logits(params, prompt[:5], mask[:5], head) / temperature
  tokens = np.asarray(head.tokens_bt)
  for b in range(5):
    for i in range(t):
      logp_v = _filtered_logp(z_btv[b, i], top_k, top_p)
      assert np.isfinite(logp_v[tokens[b, i]]), f"row {b} step {i}: token outside the allowed set"
      np.testing.assert_allclose(float(head.logprobs_bt[b, i]), logp_v[tokens[b, i]], atol=1e-4)
      kept = np.isfinite(logp_v)
      ent = -np.sum(np.exp(logp_v[kept]) * logp_v[kept])
      np.testing.assert_allclose(float(head.entropy_bt[b, i]), ent, atol=1e-4)
      if top_k or top_p < 1:
        assert not kept.all(), "the filter must cut something on this model"

  p_v = np.exp(_filtered_logp(z_btv[4, 0], top_k, top_p))
  counts = np.bincount(np.asarray(out.tokens_bt[4:, 0]), minlength=CFG.vocab_size)
  assert counts[p_v == 0].sum() == 0, "a filtered-out token was drawn"
  m = n - 4
  big = m * p_v >= 5  # pool the rare tokens so the chi-square approximation holds
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(m * p_v[big], m * p_v[~big].sum())
  obs, exp = obs[exp > 0], exp[exp > 0]
  assert len(obs) >= 4, "distribution too peaked to test"
  assert stats.chisquare(obs, exp).pvalue > 1e-3, (obs, exp.round(1))

  if (temperature, top_k, top_p) == (1.0, 0, 1.0):  # determinism, without another compile
    again = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(1), **kw)
    other = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(again.tokens_bt), np.asarray(out.tokens_bt))
    np.testing.assert_array_equal(np.asarray(again.logprobs_bt), np.asarray(out.logprobs_bt))
    assert (np.asarray(other.tokens_bt) != np.asarray(out.tokens_bt)).mean() > 0.5


def test_two_level_draw_matches_distribution_across_blocks():
  # 300 entries: 3 blocks of 128, the last padded; -inf entries in every block; mass spread over blocks
  rs = np.random.RandomState(0)
  z_v = rs.normal(0, 1.5, 300).astype(np.float32)
  z_v[rs.rand(300) < 0.3] = -np.inf
  z_v[[0, 127, 128, 255, 256, 299]] = [2.0, 2.5, 2.2, -np.inf, 2.4, 2.6]  # block edges
  n = 50_000
  draw = jax.jit(lambda k: sampler._draw(jax.random.uniform(k, (n,)), jnp.broadcast_to(jnp.asarray(z_v), (n, 300))))
  idx_b, logp_b, ent_b = (np.asarray(x) for x in draw(jax.random.key(3)))
  p_v = np.exp(z_v.astype(np.float64) - np.log(np.exp(z_v.astype(np.float64)).sum()))
  counts = np.bincount(idx_b, minlength=300)
  assert counts[p_v == 0].sum() == 0
  np.testing.assert_allclose(logp_b, np.log(p_v[idx_b]), atol=1e-5)
  np.testing.assert_allclose(ent_b[0], -np.sum(p_v[p_v > 0] * np.log(p_v[p_v > 0])), atol=1e-5)
  big = n * p_v >= 5
  obs, exp = np.append(counts[big], counts[~big].sum()), np.append(n * p_v[big], n * p_v[~big].sum())
  assert stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue > 1e-3


def test_stop_ids_mask_and_pad_after_stop(params):
  prompt, mask = _prompts([6, 4, 9], 9, seed=5)
  free = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(2), max_new_tokens=8, temperature=0.0)
  free_t = np.asarray(free.tokens_bt)
  stop = next(int(x) for x in free_t[0, 1:] if x not in free_t[1])  # row 0 stops, row 1 never does
  out = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(2), max_new_tokens=8, temperature=0.0,
                         eos_ids=(stop,), pad_id=63)
  for b in range(3):
    hits = np.flatnonzero(free_t[b] == stop)
    n = hits[0] + 1 if hits.size else 8
    np.testing.assert_array_equal(np.asarray(out.tokens_bt[b, :n]), free_t[b, :n])
    assert (np.asarray(out.tokens_bt[b, n:]) == 63).all()
    np.testing.assert_array_equal(np.asarray(out.mask_bt[b]), np.arange(8) < n)
    assert bool(out.finished_b[b]) == bool(hits.size)
    np.testing.assert_allclose(np.asarray(out.logprobs_bt[b, :n]), np.asarray(free.logprobs_bt[b, :n]),
                               atol=1e-6)
    assert (np.asarray(out.logprobs_bt[b, n:]) == 0).all()
  assert bool(out.finished_b[0]) and not bool(out.finished_b[1])
  # every id a stop id: every row stops at its first token and the loop exits
  every = rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(2), max_new_tokens=8,
                           temperature=0.0, eos_ids=tuple(range(64)), pad_id=63)
  np.testing.assert_array_equal(np.asarray(every.mask_bt), np.arange(8)[None, :].repeat(3, 0) < 1)
  np.testing.assert_array_equal(np.asarray(every.tokens_bt[:, 0]), free_t[:, 0])
  assert np.asarray(every.finished_b).all()


def test_sharded_on_8_devices_equals_single_device(params):
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = _scaled(models.init_params(CFG, jax.random.key(0), mesh=mesh))
  np.testing.assert_array_equal(np.asarray(sharded["lm_head"]), np.asarray(params["lm_head"]))
  prompt, mask = _prompts([6, 2, 9, 4, 9, 1, 7, 3], 9, seed=4)
  kw = dict(rng=jax.random.key(9), max_new_tokens=8, temperature=0.9, top_p=0.95, eos_ids=(5,),
            return_entropy=True)
  one = rollout.generate(CFG, params, prompt, mask, **kw)
  many = rollout.generate(CFG, sharded, prompt, mask, **kw)  # mesh read from the params' shardings
  assert many.tokens_bt.sharding.is_equivalent_to(parallel.batch_sharding(mesh, 2, (8, 8)), 2)
  assert len(many.tokens_bt.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(many.tokens_bt), np.asarray(one.tokens_bt))
  np.testing.assert_array_equal(np.asarray(many.mask_bt), np.asarray(one.mask_bt))
  np.testing.assert_array_equal(np.asarray(many.finished_b), np.asarray(one.finished_b))
  np.testing.assert_allclose(np.asarray(many.logprobs_bt), np.asarray(one.logprobs_bt), atol=1e-5)
  np.testing.assert_allclose(np.asarray(many.entropy_bt), np.asarray(one.entropy_bt), atol=1e-5)
  # the decode layout: whole on data x fsdp (split over tensor only), or split like the params; same draws
  for gathered in (True, False):
    layout = rollout.decode_params(CFG, sharded, gathered=gathered)
    specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(layout.weights["layers"])}
    assert any("tensor" in sp for sp in specs)
    assert any("fsdp" in str(sp) for sp in specs) != gathered
    again = rollout.generate(CFG, layout, prompt, mask, **kw)
    np.testing.assert_array_equal(np.asarray(again.tokens_bt), np.asarray(one.tokens_bt))
    np.testing.assert_allclose(np.asarray(again.logprobs_bt), np.asarray(one.logprobs_bt), atol=1e-5)


def test_cache_phases_decode_the_same_tokens(params):
  # the loop split into phases over growing caches: same draws as one loop over the full cache (and the
  # log-probs still those of the full forward), on one device and on 8
  assert sampler.phase_ends(10, 3) == [4, 7, 10] and sampler.phase_ends(10, 20) == list(range(2, 11))
  assert sampler.phase_ends(1, 4) == [1]
  assert [sampler.auto_cache_phases(t) for t in (1, 64, 127, 128, 255, 256, 10**5)] == [1, 1, 1, 2, 3, 4, 4]
  prompt, mask = _prompts([6, 2, 9, 4, 9, 1, 7, 3], 9, seed=7)
  kw = dict(rng=jax.random.key(3), max_new_tokens=10, temperature=1.0, eos_ids=(5,), return_entropy=True)
  one = rollout.generate(CFG, params, prompt, mask, cache_phases=1, **kw)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = _scaled(models.init_params(CFG, jax.random.key(0), mesh=mesh))
  for p in (params, sharded):
    many = rollout.generate(CFG, p, prompt, mask, cache_phases=3, **kw)
    np.testing.assert_array_equal(np.asarray(many.tokens_bt), np.asarray(one.tokens_bt))
    np.testing.assert_array_equal(np.asarray(many.mask_bt), np.asarray(one.mask_bt))
    np.testing.assert_array_equal(np.asarray(many.finished_b), np.asarray(one.finished_b))
    np.testing.assert_allclose(np.asarray(many.logprobs_bt), np.asarray(one.logprobs_bt), atol=1e-5)
    np.testing.assert_allclose(np.asarray(many.entropy_bt), np.asarray(one.entropy_bt), atol=1e-5)
  assert np.asarray(one.finished_b).any() and not np.asarray(one.finished_b).all()
  logp = special.log_softmax(_teacher_logits(params, prompt, mask, many), axis=-1)
  want = np.take_along_axis(logp, np.asarray(many.tokens_bt)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(many.logprobs_bt), np.where(np.asarray(many.mask_bt), want, 0), atol=1e-4)
  # every row stops at its first token: the later phases' loops do not run
  every = rollout.generate(CFG, params, prompt, mask, cache_phases=3, eos_ids=tuple(range(64)),
                           **{k: v for k, v in kw.items() if k != "eos_ids"})
  np.testing.assert_array_equal(np.asarray(every.mask_bt), np.arange(10)[None, :].repeat(8, 0) < 1)
  np.testing.assert_array_equal(np.asarray(every.tokens_bt[:, 0]), np.asarray(one.tokens_bt[:, 0]))


def _decoded_rows(out, compactions, shards=1):
  """Plain-Python twin of the decode loop's work: step i runs while a row is live; the batch halves (up to
  `compactions` times) once every one of its `shards` (contiguous blocks of the original rows: a row never leaves
  its shard) has at most half its rows live."""
  lengths = np.asarray(out.mask_bt).sum(axis=1)
  finished = np.asarray(out.finished_b)
  b, t = out.mask_bt.shape
  rows, level, total = b, 0, 0
  for i in range(1, t):
    live_b = ~finished | (lengths > i)  # rows that have not emitted their stop token before step i
    if not live_b.any():
      break
    while level < compactions and live_b.reshape(shards, -1).sum(axis=1).max() <= rows // shards // 2:
      rows, level = rows // 2, level + 1
    total += rows
  return total


def test_compaction_decodes_the_same_tokens_with_less_work(params):
  # the batch halves once every shard has at most half its rows live (their caches move along, within the shard):
  # same draws, row by row, as the full batch (every row keeps its own uniforms), on one device and on 8 (4 batch
  # shards); the work is what the loop's twin counts
  prompt, mask = _prompts([6, 2, 9, 4, 9, 1, 7, 3], 9, seed=11)
  kw = dict(rng=jax.random.key(5), max_new_tokens=24, temperature=1.0, eos_ids=tuple(range(0, 64, 5)),
            cache_phases=2, return_entropy=True)
  full = rollout.generate(CFG, params, prompt, mask, compactions=0, **kw)
  lengths = np.asarray(full.mask_bt).sum(axis=1)
  assert np.asarray(full.finished_b).any() and len(set(lengths)) > 3  # rows stop at different steps
  assert int(full.decoded_rows) == _decoded_rows(full, 0)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = _scaled(models.init_params(CFG, jax.random.key(0), mesh=mesh))
  for p, n, shards in ((params, 2, 1), (sharded, 1, 4)):
    out = rollout.generate(CFG, p, prompt, mask, compactions=n, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens_bt), np.asarray(full.tokens_bt))
    np.testing.assert_array_equal(np.asarray(out.mask_bt), np.asarray(full.mask_bt))
    np.testing.assert_array_equal(np.asarray(out.finished_b), np.asarray(full.finished_b))
    np.testing.assert_allclose(np.asarray(out.logprobs_bt), np.asarray(full.logprobs_bt), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.entropy_bt), np.asarray(full.entropy_bt), atol=1e-5)
    assert int(out.decoded_rows) == _decoded_rows(full, n, shards) < int(full.decoded_rows)
  with pytest.raises(CotsafeError, match="compactions=2 halves the batch of 8 rows 2 times, which needs a multiple "
                                         "of 16 rows"):
    rollout.generate(CFG, sharded, prompt, mask, compactions=2, **kw)
  # the halving moves rows within each chip: no collective in the compiled program carries a KV-cache segment (a
  # global selection gathers the halved batch's whole cache onto every chip: all-reduces of [4, 1, 8, 27] here)
  program = sampler.generate_program(CFG, mesh, batch=8, prompt_len=16, max_new_tokens=24, temperature=1.0,
                                     eos_ids=kw["eos_ids"], return_entropy=True, cache_phases=2, compactions=1)
  rows = parallel.batch_sharding(mesh, 2, (8, 16))
  text = program.lower(decode.abstract_decode_params(CFG, mesh), jax.ShapeDtypeStruct((8, 16), jnp.int32,
                                                                                       sharding=rows),
                       jax.ShapeDtypeStruct((8, 16), bool, sharding=rows),
                       jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))).compile().as_text()
  collective = r"= (.*?) (?:all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
  shapes = [d for result in re.findall(collective, text) for d in re.findall(r"\w+\[([\d,]*)\]", result)]
  assert shapes  # the live counts are compared across chips
  segments = (27, 12)  # prompt bucket 16 + phase 0's 11 slots, then phase 1's 12
  cache_like = [d for d in shapes if len(d.split(",")) == 4
                and {int(x) for x in d.split(",")[-2:]} in ({CFG.head_dim, n} for n in segments)]
  assert not cache_like, cache_like


def test_prompt_lengths_in_one_bucket_compile_once(params):
  kw = dict(rng=jax.random.key(0), max_new_tokens=3, temperature=0.55)  # a config no other test compiles
  before = sampler._trace_count
  outs = []
  for lengths, width in (([5, 3], 5), ([9, 2], 9), ([12, 16], 16), ([10, 4], 40)):  # width 40: all-pad columns
    prompt, mask = _prompts(lengths, width, seed=width)
    outs.append(rollout.generate(CFG, params, prompt, mask, **kw))
  assert sampler._trace_count - before == 1
  prompt, mask = _prompts([17, 3], 17)
  rollout.generate(CFG, params, prompt, mask, **kw)
  assert sampler._trace_count - before == 2  # 17 tokens: the next bucket (32)
  # trimming all-padding columns changes nothing: same tokens as the untrimmed prompt in its own bucket
  prompt, mask = _prompts([10, 4], 40, seed=40)
  exact = rollout.generate(CFG, params, prompt, mask, buckets=(40,), **kw)
  np.testing.assert_array_equal(np.asarray(exact.tokens_bt), np.asarray(outs[-1].tokens_bt))


def test_bucket_length():
  assert [rollout.bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  assert [rollout.bucket_length(n, buckets=24) for n in (1, 24, 25)] == [24, 24, 48]
  assert rollout.bucket_length(33, buckets=(64, 32, 128)) == 64
  with pytest.raises(CotsafeError, match="a prompt of 129 tokens exceeds the largest bucket 128"):
    rollout.bucket_length(129, buckets=(64, 128))
  with pytest.raises(CotsafeError, match="buckets='p2'"):
    rollout.bucket_length(3, buckets="p2")


@pytest.mark.parametrize("change,message", [
    (dict(mask=np.array([[1, 1, 0], [0, 1, 1]], bool)), "prompt_mask_bp row 0 is not left-padded"),
    (dict(mask=np.array([[0, 1, 1], [0, 0, 0]], bool)), "prompt_mask_bp row 1 has no real token"),
    (dict(top_p=0.0), "top_p=0.0 \\(expected 0 < top_p <= 1"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(cache_phases=0), "cache_phases=0 \\(expected a positive int, or None for automatic\\)"),
    (dict(compactions=-1), "compactions=-1 \\(expected an int >= 0, or None for automatic\\)"),
    (dict(compactions=2), "compactions=2 halves the batch of 2 rows 2 times, which needs a multiple of 4 rows"),
    (dict(eos_ids=(64,)), "eos_ids/pad_id \\[64\\] outside the vocabulary \\[0, 64\\)"),
    (dict(prompt=np.zeros((2, 4), np.int32)), "prompt_bp \\(2, 4\\) and prompt_mask_bp \\(2, 3\\)"),
    (dict(prompt=np.zeros((2, 3), np.float32)), "prompt_bp has dtype float32"),
])
def test_bad_input_raises(params, change, message):
  kw = dict(prompt=np.ones((2, 3), np.int32), mask=np.ones((2, 3), bool), max_new_tokens=2)
  kw.update(change)
  prompt, mask = kw.pop("prompt"), kw.pop("mask")
  with pytest.raises(CotsafeError, match="cotsafe_jax: generate: " + message):
    rollout.generate(CFG, params, prompt, mask, rng=jax.random.key(0), **kw)


@pytest.mark.parametrize("spread", [4.0, 0.3])  # a nucleus inside the candidates; one larger (the full sort)
def test_top_p_prefilter_draws_what_the_full_sort_draws(monkeypatch, spread):
  """top-p alone looks for the nucleus among the largest logits first (no sort of the whole vocabulary) and falls
  back to the full sort when they hold less than top_p: the same tokens, log-probs and entropies as the full sort,
  and log-probs equal to the float64 filtered softmax."""
  monkeypatch.setattr(sampler, "_NUCLEUS_CANDIDATES", 16)
  v, top_p = 300, 0.9
  z_bv = jax.random.normal(jax.random.key(3), (8, v), jnp.float32) * spread
  s = sampler._Sampling(1.0, 0, top_p, (), 0, True)
  nucleus = [int(np.isfinite(_filtered_logp(np.asarray(z, np.float64), 0, top_p)).sum()) for z in z_bv]
  assert (max(nucleus) <= 16) == (spread > 1), nucleus  # the two cases are what they claim
  fast = jax.jit(lambda z, u: sampler._sample(z, u, s))
  full = jax.jit(lambda z, u: sampler._top_k_top_p(z, u, v, top_p, lse_b=jax.nn.logsumexp(z, axis=-1)))
  for i in range(32):
    u_b = jax.random.uniform(jax.random.key(i), (8,))
    (tok, logp, ent), (tok_full, logp_full, ent_full) = fast(z_bv, u_b), full(z_bv, u_b)
    np.testing.assert_array_equal(tok, tok_full)
    np.testing.assert_allclose(logp, logp_full, atol=1e-6)
    np.testing.assert_allclose(ent, ent_full, atol=1e-6)
    for b in range(8):
      ref = _filtered_logp(np.asarray(z_bv[b], np.float64), 0, top_p)
      np.testing.assert_allclose(float(logp[b]), ref[int(tok[b])], atol=1e-5)
