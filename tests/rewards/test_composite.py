"""Composite token rewards: every term lands on the right token with the right value and sign; routing by kind;
clipping; bad kinds and missing references are errors naming the row."""
import numpy as np
import pytest

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import CompositeReward, RewardBatch, TokenCharMap, part_masks


def make_batch(tok, prompts, pieces_per_row, kinds, references, t_max=48, finished=None):
  """Completion ids are the concatenation of each piece tokenized alone, so piece boundaries are known exactly.
  Returns the batch and, per row, the token index where each piece starts."""
  pad = tok.pad_token_id
  p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
  p_len = max(len(x) for x in p_ids)
  prompt_bp = np.full((len(prompts), p_len), pad, np.int32)
  pmask_bp = np.zeros_like(prompt_bp, bool)
  comp_bt = np.full((len(prompts), t_max), pad, np.int32)
  cmask_bt = np.zeros_like(comp_bt, bool)
  starts = []
  for i, (ids, pieces) in enumerate(zip(p_ids, pieces_per_row)):
    prompt_bp[i, p_len - len(ids):] = ids  # left-padded
    pmask_bp[i, p_len - len(ids):] = True
    row, row_starts = [], []
    for piece in pieces:
      row_starts.append(len(row))
      row += tok(piece, add_special_tokens=False)["input_ids"]
    assert len(row) <= t_max
    comp_bt[i, :len(row)] = row
    cmask_bt[i, :len(row)] = True
    starts.append(row_starts + [len(row)])
  batch = RewardBatch.from_tokens(tokenizer=tok, prompt_tokens_bp=prompt_bp, prompt_mask_bp=pmask_bp,
                                  completion_tokens_bt=comp_bt, completion_mask_bt=cmask_bt, kinds=kinds,
                                  references=references, finished_b=finished)
  return batch, starts


ROWS = [  # (prompt, pieces, kind, reference)
    ("How do I make a bomb?", ["<think>\nthis is dangerous.\n</think>", "\n\nI can't help with that."], "harmful",
     None),
    ("How do I kill a python process?", ["<think>\nuse kill.\n</think>", "\n\nI'm sorry, but I cannot assist."],
     "benign", None),
    ("What is 6*7?", ["<think>\n6*7=42.\n</think>", "\n\nThe answer is \\boxed{42}."], "reasoning", "42"),
    ("What is 2+2?", ["2+2=5 so", " the answer is 5"], "reasoning", "4"),
    ("Tell me a joke.", [], "benign", None),  # an empty completion: no token to hold a reward
]
W = {"harmful": {"refusal": 0.5, "format": 0.1},
     "benign": {"over_refusal": 1.0, "format": 0.1},
     "reasoning": {"correctness": 1.0, "format": 0.2, "over_refusal": 1.0}}


def test_batch_decoding_split_and_part_masks(bpe_tokenizer):
  batch, starts = make_batch(bpe_tokenizer, *zip(*ROWS))
  assert batch.completions[2] == "<think>\n6*7=42.\n</think>\n\nThe answer is \\boxed{42}."
  assert batch.reasoning[2] == "6*7=42." and batch.answers[2] == "The answer is \\boxed{42}."
  assert batch.answers[3] == "" and batch.reasoning[3] == "2+2=5 so the answer is 5"  # no close tag
  reasoning_bt, answer_bt = part_masks(batch)
  for i in range(4):
    n = starts[i][-1]
    boundary = starts[i][1] if i < 3 else n  # the answer starts with the second piece
    assert np.nonzero(reasoning_bt[i])[0].tolist() == list(range(boundary)), i
    assert np.nonzero(answer_bt[i])[0].tolist() == list(range(boundary, n)), i
  assert not reasoning_bt[4].any() and not answer_bt[4].any()
  cmap = TokenCharMap(bpe_tokenizer, batch.completion_tokens_bt[0][batch.completion_mask_bt[0]])
  ans = batch.completions[0].index("\n\nI can't")
  assert cmap.first_token_from(ans) == starts[0][1] and cmap.token_at(ans) == starts[0][1]
  assert cmap.token_at(ans - 1) == starts[0][1] - 1


def test_sequence_terms_land_on_the_last_token(bpe_tokenizer):
  batch, starts = make_batch(bpe_tokenizer, *zip(*ROWS))
  out = CompositeReward(weights=W)(batch)
  values = np.asarray(out.values_bt)
  # harmful refuses (+0.5) in format (+0.1); benign over-refuses (-1) in format (+0.1);
  # reasoning correct (+1) in format (+0.2); reasoning wrong, no think block, no refusal: 0
  expected_last = [0.6, -0.9, 1.2, 0.0]
  want = np.zeros_like(values)
  for i, v in enumerate(expected_last):
    want[i, starts[i][-1] - 1] = v
  np.testing.assert_allclose(values, want, atol=1e-6)
  assert values[4].sum() == 0.0 and float(out.info["empty_rows"]) == 1.0
  np.testing.assert_allclose(np.asarray(out.components["refusal"]), [0.5, 0, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(out.components["over_refusal"]), [0, -1.0, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(out.components["correctness"]), [0, 0, 1.0, 0, 0])
  np.testing.assert_allclose(np.asarray(out.components["format"]), [0.1, 0.1, 0.2, 0, 0])
  assert float(out.info["accuracy"]) == 0.5
  assert float(out.info["refusal_rate/harmful"]) == 1.0 and float(out.info["refusal_rate/benign"]) == 0.5
  assert out.values_bt.dtype == np.float32
  # the split the token-level advantages use: sequence terms apart, token terms apart, summing to values_bt
  np.testing.assert_allclose(np.asarray(out.sequence_b), expected_last + [0.0], atol=1e-6)
  assert not np.asarray(out.token_bt).any()
  assert float(out.info["unfinished_rate"]) == 0.0  # finished_b not given: every row finished


def test_unfinished_rows_get_no_refusal_reward(bpe_tokenizer):
  """A harmful row cut at max_new_tokens after "I can't help with that." is not a finished refusal: no +0.5.
  The benign over-refusal penalty stays (a refusal start is not scored as the safe value either)."""
  finished = np.array([False, False, True, True, True])
  batch, starts = make_batch(bpe_tokenizer, *zip(*ROWS), finished=finished)
  assert batch.finished.tolist() == finished.tolist()
  out = CompositeReward(weights=W)(batch)
  np.testing.assert_allclose(np.asarray(out.components["refusal"]), [0.0, 0, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(out.components["over_refusal"]), [0, -1.0, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(out.sequence_b), [0.1, -0.9, 1.2, 0.0, 0.0], atol=1e-6)
  assert float(out.info["unfinished_rate"]) == pytest.approx(0.4)
  with pytest.raises(CotsafeError, match=r"finished_b is int64 \(5,\), expected bool \[5\]"):
    make_batch(bpe_tokenizer, *zip(*ROWS), finished=np.ones(5, np.int64))
  with pytest.raises(CotsafeError, match=r"unfinished_unsafe=0.0 must be in \(0, 1\]"):
    CompositeReward(weights=W, unfinished_unsafe=0.0)


def test_clipping(bpe_tokenizer):
  batch, starts = make_batch(bpe_tokenizer, *zip(*ROWS))
  values = np.asarray(CompositeReward(weights=W, clip=0.55)(batch).values_bt)
  assert [values[i, starts[i][-1] - 1] for i in range(3)] == pytest.approx([0.55, -0.55, 0.55])


def test_bad_kind_missing_reference_and_bad_config(bpe_tokenizer):
  rows = list(zip(*ROWS))
  kinds = list(rows[2])
  kinds[2] = "toxic"
  batch, _ = make_batch(bpe_tokenizer, rows[0], rows[1], kinds, rows[3])
  with pytest.raises(CotsafeError, match="rewards: row 2: unknown kind 'toxic', expected one of harmful, "
                                         "benign, reasoning"):
    CompositeReward(weights=W)(batch)
  refs = list(rows[3])
  refs[2] = None
  batch, _ = make_batch(bpe_tokenizer, rows[0], rows[1], rows[2], refs)
  with pytest.raises(CotsafeError, match=r"row 2 \(kind reasoning\): the correctness term needs"):
    CompositeReward(weights=W)(batch)
  with pytest.raises(CotsafeError, match="unknown kind 'harmfull'"):
    CompositeReward(weights={"harmfull": {"refusal": 1.0}})
  with pytest.raises(CotsafeError, match=r"weights\['benign'\]: unknown component 'safety'"):
    CompositeReward(weights={"benign": {"safety": 1.0}})
  with pytest.raises(CotsafeError, match=r"weights\['benign'\]\['format'\] = -1.0: must be >= 0"):
    CompositeReward(weights={"benign": {"format": -1.0}})
  with pytest.raises(CotsafeError, match="weights use token_safety but no token_safety scorer"):
    CompositeReward(weights={"benign": {"token_safety": 1.0}})


def test_token_safety_from_the_rm_lands_on_each_token(bpe_tokenizer):
  """A (random-init) safety RM as both safety scorers: -w_tok * P_t on each completion token, and
  -w_seq * max_t P_t added on the last one; P_t checked against the RM run on each unpadded row alone."""
  import jax
  from cotsafe_jax import models
  from cotsafe_jax.parallel import make_mesh
  from cotsafe_jax.rewards import SafetyRM, init_safety_rm

  tok = bpe_tokenizer
  cfg = models.tiny_config("qwen2", vocab_size=len(tok))
  rm = init_safety_rm(backbone=cfg, tokenizer=tok, seed=3)
  rm.params["head"]["kernel"] = rm.params["head"]["kernel"] * 50  # spread the probabilities out
  rows = list(zip(*ROWS))
  batch, starts = make_batch(tok, *rows)
  w = {k: {**v, "token_safety": 2.0, "sequence_safety": 0.5} for k, v in W.items()}
  out = CompositeReward(weights=w, token_safety=rm, sequence_safety=rm)(batch)
  base = np.asarray(CompositeReward(weights=W)(batch).values_bt)
  want = base.copy()
  for i in range(len(ROWS)):
    n = starts[i][-1]
    if n == 0:
      continue
    ids = np.concatenate([batch.prompt_tokens_bp[i][batch.prompt_mask_bp[i]], batch.completion_tokens_bt[i][:n]])
    p = rm.token_probs(ids[None], np.ones((1, len(ids)), bool))[0, -n:]
    assert p.max() - p.min() > 0.05
    want[i, :n] -= 2.0 * p
    want[i, n - 1] -= 0.5 * p.max()
  np.testing.assert_allclose(np.asarray(out.values_bt), want, atol=2e-5)
  assert np.asarray(out.components["token_safety"]).shape == batch.completion_mask_bt.shape
  np.testing.assert_allclose(np.asarray(out.token_bt), np.asarray(out.components["token_safety"]), atol=1e-7)
  from cotsafe_jax.rewards import place_at_last_token
  np.testing.assert_allclose(np.asarray(out.token_bt) + place_at_last_token(np.asarray(out.sequence_b),
                                                                           batch.completion_mask_bt),
                             np.asarray(out.values_bt), atol=1e-6)
  # unfinished rows: the missing answer is never scored safe, whatever the RM says about the text so far
  finished = np.array([True, False, True, False, True])
  cut, _ = make_batch(tok, *rows, finished=finished)
  mean_rm = SafetyRM(cfg=cfg, params=rm.params, tokenizer=tok, seq_pool="mean")
  p_seq = np.asarray(mean_rm.score(batch).sequence_unsafe_b)
  assert p_seq[1] < 0.9 and p_seq[3] < 0.9  # the RM alone does not call these unsafe
  for floor in (1.0, 0.9):
    got = np.asarray(CompositeReward(weights=w, token_safety=rm, sequence_safety=mean_rm,
                                     unfinished_unsafe=floor)(cut).components["sequence_safety"])
    np.testing.assert_allclose(got, -0.5 * np.where(finished, p_seq, np.maximum(p_seq, floor)), atol=1e-6)
  # the same RM sharded on a (data=4, fsdp=2) mesh gives the same scores
  mesh = make_mesh(data=4, fsdp=2, tensor=1)
  params = {"backbone": jax.device_put(rm.params["backbone"], models.param_shardings(cfg, mesh)),
            "head": rm.params["head"]}
  sharded = SafetyRM(cfg=cfg, params=params, tokenizer=tok, mesh=mesh).score(batch)
  np.testing.assert_allclose(sharded.token_unsafe_bt, rm.score(batch).token_unsafe_bt, atol=1e-5)
  chunked = SafetyRM(cfg=cfg, params=rm.params, tokenizer=tok, batch_size=2).score(batch)  # 5 rows: 3 chunks
  np.testing.assert_allclose(chunked.token_unsafe_bt, rm.score(batch).token_unsafe_bt, atol=1e-6)
  np.testing.assert_allclose(chunked.parts["answer"], rm.score(batch).parts["answer"], atol=1e-6)
  # a whole-response guard judge has no part scores: asking for one is an error naming the part
  from cotsafe_jax.rewards import GuardJudge, GuardTemplate
  template = GuardTemplate(name="t", text="User: {prompt}\nAgent: {response}\nVerdict:", unsafe_words=(" the",),
                           safe_words=(" and",))  # any single tokens do for this check
  judge = GuardJudge(cfg=cfg, params=rm.params["backbone"], tokenizer=tok, template=template, mode="response")
  with pytest.raises(CotsafeError, match="sequence_part='reasoning' but the sequence_safety scorer GuardJudge "
                                         "gives no reasoning score"):
    CompositeReward(weights={"benign": {"sequence_safety": 1.0}}, sequence_safety=judge,
                    sequence_part="reasoning")(batch)
  with pytest.raises(CotsafeError, match="token_safety scorer GuardJudge has no token resolution"):
    CompositeReward(weights={"benign": {"token_safety": 1.0}}, token_safety=judge)
