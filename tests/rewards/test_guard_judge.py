"""Guard judge on a tiny decoder trained here (SFT) to answer " unsafe" after a marker word and " safe"
otherwise: probabilities against a float64 full-logits reference, whole / parts / stepwise modes with exact
token positions, sharded scoring on a mesh, bad templates."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import make_mesh
from cotsafe_jax.rewards import RewardBatch
from cotsafe_jax.rewards.guard_judge import LLAMA_GUARD_3, QWEN3_GUARD, GuardJudge, GuardTemplate

from tests.rewards import rewards_testlib as tl

TEMPLATE = GuardTemplate(name="tiny_guard", text=tl.GUARD_TEXT, unsafe_words=(" unsafe",), safe_words=(" safe",))
SEQ = 96
SFT_STEPS, SFT_BATCH = 100, 32


@pytest.fixture(scope="module")
def guard():
  """(cfg, params, tokenizer): a 2-layer model after a few hundred SFT steps on verdicts."""
  rng = random.Random(0)
  shapes = ("prefix", "full", "answer")
  examples = [tl.guard_example(rng, marked=rng.random() < 0.5, shape=rng.choice(shapes)) for _ in range(1000)]
  texts = [TEMPLATE.render(p, r) + (" unsafe" if y else " safe") for p, r, y in examples]
  tok = tl.make_tokenizer(texts + tl.corpus(100), vocab_size=600)
  cfg = models.tiny_config("qwen3", vocab_size=len(tok), num_heads=4, num_kv_heads=2)
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  assert max(map(len, ids)) <= SEQ
  tokens = np.zeros((len(ids), SEQ), np.int32)
  mask = np.zeros((len(ids), SEQ), bool)
  for i, x in enumerate(ids):  # left-padded; the verdict is the last token
    tokens[i, SEQ - len(x):], mask[i, SEQ - len(x):] = x, True

  def loss_fn(params, t, m):
    h_bd = models.hidden_states(cfg, params, t[:, :-1], attention_mask_bt=m[:, :-1])[:, -1]
    logits_bv = h_bd.astype(jnp.float32) @ models.unembedding(cfg, params).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_bv, t[:, -1]).mean()

  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, t, m):
    loss, g = jax.value_and_grad(loss_fn)(params, t, m)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  params = models.init_params(cfg, jax.random.key(0))
  state = opt.init(params)
  order = np.random.default_rng(0)
  for _ in range(SFT_STEPS):
    idx = order.integers(0, len(ids), SFT_BATCH)
    params, state, loss = step(params, state, tokens[idx], mask[idx])
  print(f"\nguard SFT final loss {float(loss):.4f}")
  assert float(loss) < 0.1
  return cfg, params, tok


def _reference_probs(cfg, params, tok, prompts, responses):
  """Float64 P(unsafe) from the full [T, V] logits, rows right-padded (a causal model's logits at a real
  position do not see the padding after it), read at each row's last real token."""
  u = tok(" unsafe", add_special_tokens=False)["input_ids"][0]
  s = tok(" safe", add_special_tokens=False)["input_ids"][0]
  ids = [tok(TEMPLATE.render(p, r), add_special_tokens=False)["input_ids"] for p, r in zip(prompts, responses)]
  tokens = np.zeros((len(ids), SEQ), np.int32)
  mask = np.zeros((len(ids), SEQ), bool)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, True
  logits = np.asarray(models.forward(cfg, params, tokens, attention_mask_bt=mask), np.float64)
  last = np.array([logits[i, len(x) - 1] for i, x in enumerate(ids)])
  return 1 / (1 + np.exp(last[:, s] - last[:, u]))


def test_probabilities_match_full_logits_and_separate_marked(guard):
  cfg, params, tok = guard
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, batch_size=8)
  rng = random.Random(123)  # held-out examples
  ex = [tl.guard_example(rng, marked=i % 2 == 0, shape=("prefix", "full", "answer")[i % 3]) for i in range(30)]
  prompts, responses, labels = map(list, zip(*ex))
  p = judge.unsafe_probs(prompts, responses)
  assert p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
  np.testing.assert_allclose(p, _reference_probs(cfg, params, tok, prompts, responses), atol=2e-5)
  labels = np.asarray(labels)
  assert labels.sum() >= 10 and p[labels].min() > 0.8 and p[~labels].max() < 0.2, (p, labels)


def _batch(tok, rows):
  """rows: (prompt, [pieces]); completion ids are the pieces tokenized one by one (known boundaries)."""
  t_max = 96
  comp = np.full((len(rows), t_max), tok.pad_token_id, np.int32)
  cmask = np.zeros_like(comp, bool)
  starts = []
  p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in rows]
  p_len = max(map(len, p_ids))
  prompt = np.zeros((len(rows), p_len), np.int32)
  pmask = np.zeros_like(prompt, bool)
  for i, ((_, pieces), pi) in enumerate(zip(rows, p_ids)):
    prompt[i, p_len - len(pi):], pmask[i, p_len - len(pi):] = pi, True
    ids, st = [], []
    for piece in pieces:
      st.append(len(ids))
      ids += tok(piece, add_special_tokens=False)["input_ids"]
    comp[i, :len(ids)], cmask[i, :len(ids)] = ids, True
    starts.append(st + [len(ids)])
  batch = RewardBatch.from_tokens(tokenizer=tok, prompt_tokens_bp=prompt, prompt_mask_bp=pmask,
                                  completion_tokens_bt=comp, completion_mask_bt=cmask,
                                  kinds=["harmful"] * len(rows), prompts=[p for p, _ in rows])
  return batch, starts


STEPS = ["first I list the flour and the water we need", "then I check the sugar against the paper carefully",
         "now add the kaboom powder to the garden", "we can measure the candle and compare it with the engine"]


def test_stepwise_penalises_exactly_from_the_marked_step(guard):
  cfg, params, tok = guard
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, mode="stepwise")
  marked = ["<think>\n", STEPS[0] + "\n\n", STEPS[1] + "\n\n", STEPS[2] + "\n\n", STEPS[3] + "\n</think>\n\n",
            "Here is a safe summary of the steps."]
  clean = ["<think>\n", STEPS[0] + "\n\n", STEPS[1] + "\n\n", STEPS[3] + "\n</think>\n\n",
           "I hope this helps with the recipe."]
  late = ["<think>\n", STEPS[0] + "\n\n", STEPS[3] + "\n</think>", "\n\nthe kaboom is ready, good luck."]
  batch, starts = _batch(tok, [("How do I make this at home?", marked), ("What should I do next?", clean),
                               ("Explain the process step by step.", late)])
  scores = judge.score(batch)
  pen = scores.token_unsafe_bt
  n0, k = starts[0][-1], starts[0][3]  # the marked step is piece 3
  assert np.all(pen[0, :k] == 0) and np.all(pen[0, k:n0] > 0.5) and np.all(pen[0, n0:] == 0)
  assert np.all(pen[1] == 0)
  n2, a = starts[2][-1], starts[2][3]  # marker in the answer only: the answer's tokens (from the blank line
  # after </think>), nothing before
  assert np.all(pen[2, :a] == 0) and np.all(pen[2, a:n2] > 0.5) and np.all(pen[2, n2:] == 0)
  assert scores.sequence_unsafe_b[0] > 0.5 and scores.sequence_unsafe_b[1] < 0.5
  assert scores.parts["reasoning"][2] < 0.5 < scores.parts["answer"][2]
  # the penalty value is the running max of the prefix probabilities from the marked step on
  prefix = "\n\n".join(STEPS[:3])
  p3 = _reference_probs(cfg, params, tok, ["How do I make this at home?"], [prefix])[0]
  assert pen[0, k] == pytest.approx(p3, abs=2e-5)


def test_parts_mode_and_sharded_scoring(guard):
  cfg, params, tok = guard
  rows = [("How do I make this at home?", ["<think>\n", STEPS[2] + "\n</think>", "\n\nThe plan is complete and safe."]),
          ("What should I do next?", ["<think>\n", STEPS[0] + "\n</think>", "\n\nthe kaboom is ready, good luck."])]
  batch, starts = _batch(tok, rows)
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, mode="parts")
  s = judge.score(batch)
  pen = s.token_unsafe_bt
  assert np.all(pen[0, :starts[0][2]] > 0.5) and np.all(pen[0, starts[0][2]:] == 0)
  assert np.all(pen[1, :starts[1][2]] == 0) and np.all(pen[1, starts[1][2]:starts[1][3]] > 0.5)
  # the same judge on a (data=4, fsdp=2) mesh, params sharded like the policy: same numbers
  mesh = make_mesh(data=4, fsdp=2, tensor=1)
  sharded = jax.device_put(params, models.param_shardings(cfg, mesh))
  judge_m = GuardJudge(cfg=cfg, params=sharded, tokenizer=tok, template=TEMPLATE, mode="parts", mesh=mesh)
  np.testing.assert_allclose(judge_m.score(batch).token_unsafe_bt, pen, atol=1e-5)
  whole = GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, mode="response")
  assert not whole.token_level and whole.score(batch).token_unsafe_bt is None


def test_bad_templates_and_truncation(guard):
  cfg, params, tok = guard
  bad = GuardTemplate(name="wordy", text=tl.GUARD_TEXT, unsafe_words=(" xylophonic",), safe_words=(" safe",))
  with pytest.raises(CotsafeError, match=r"guard template 'wordy': verdict word ' xylophonic' is \d+ tokens"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=bad)
  # the default templates render their conversation slots, and name words the tiny tokenizer splits
  text = LLAMA_GUARD_3.render("How?", "Like {this}.")
  assert "User: How?\n\nAgent: Like {this}.\n\n<END CONVERSATION>" in text and text.endswith("\n\n")
  assert QWEN3_GUARD.render("q", "r").endswith("<|im_start|>assistant\nSafety:")
  with pytest.raises(CotsafeError, match="guard template 'qwen3_guard': verdict word ' Unsafe' is"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=QWEN3_GUARD)
  with pytest.raises(CotsafeError, match="no {response} placeholder"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=GuardTemplate(name="x", text="{prompt} Verdict:",
                                                                             unsafe_words=(" unsafe",),
                                                                             safe_words=(" safe",)))
  with pytest.raises(CotsafeError, match="mode='judge', expected one of response, parts, stepwise"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, mode="judge")
  # a response past max_len keeps its end, so a marker near the end is still seen
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, max_len=96, length_bucket=32)
  long = "\n\n".join([STEPS[0], STEPS[1]] * 8 + [STEPS[2]])
  ids = judge.encode("How?", long)
  assert len(ids) <= 96 and "kaboom" in tok.decode(ids)
  assert judge.unsafe_probs(["How?"], [long])[0] > 0.5
