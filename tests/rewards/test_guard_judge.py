"""Guard judge on a tiny decoder trained here (SFT) to answer " unsafe" when a marker word is in the last agent
turn and " safe" otherwise (a marker in an earlier turn, the context, does not count): probabilities against a
float64 full-logits reference; stepwise penalties on the flagged step only (not on a later self-correction);
overlapping windows catch an early unsafe step of a long trace; parts mode and sharded scoring; the guard
checkpoint's own chat template (a tiny random Llama guard saved with save_pretrained); bad configurations."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cotsafe_jax import eval as ev, models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import make_mesh
from cotsafe_jax.rewards import RewardBatch
from cotsafe_jax.rewards.guard_judge import LLAMA_GUARD_3, QWEN3_GUARD, GuardJudge, GuardTemplate, load_guard_judge

from tests.eval import fixtures
from tests.rewards import rewards_testlib as tl

TEMPLATE = GuardTemplate(name="tiny_guard", text=tl.GUARD_TEXT, unsafe_words=(" unsafe",), safe_words=(" safe",),
                         next_turn="\nUser: {continue}\nAgent: ")
SFT_STEPS, SFT_BATCH = 200, 16
# small windows so that short test traces already span several
JUDGE_KW = dict(template=TEMPLATE, max_len=256, window_tokens=48, window_overlap=16, context_tokens=64)
# safe steps a reasoning model writes after an unsafe one: the guard must not flag them
REFLECT_STEPS = ("wait, that last step is not safe, so I will not do it", "hmm, let me check the {a} and the {b} again",
                 "wait, I should not explain the {a}, I will stop here")


def _step(rng, marked):
  return tl._fill(rng, tl.MARKER_STEP if marked else rng.choice(tl.SAFE_STEPS + REFLECT_STEPS))


def _text(rng, marked, shape):
  """A guard response text: reasoning steps, a thinking-format completion, an answer alone, or a cut of a long
  trace mid-step (what a window of a long trace looks like); marked: one step is the marker."""
  n = rng.randint(6, 8) if shape == "cut" else rng.randint(1, 4)
  steps = [_step(rng, False) for _ in range(n)]
  answer = rng.choice(tl.ANSWERS_SAFE)
  if marked:
    where = rng.randrange(n + (shape in ("full", "answer")))
    if where < n:
      steps[where] = _step(rng, True)
    else:
      answer = "the kaboom is ready, " + answer
  if shape == "answer":
    return answer
  if shape == "full":
    return "<think>\n" + "\n\n".join(steps) + "\n</think>\n\n" + answer
  text = "\n\n".join(steps)
  if shape == "cut":  # at spaces: the marker word is in or out, never split
    words = text.split(" ")
    text = " ".join(words[rng.randrange(len(words) // 3):len(words) - rng.randrange(len(words) // 3)])
  return text


def _example(rng):
  """(prompt, context or None, response, unsafe): unsafe iff the marker is in the response, the last turn."""
  context = None
  if rng.random() < 0.6:
    context = "\n\n".join(_step(rng, rng.random() < 0.4) for _ in range(rng.randint(1, 3)))
  text = _text(rng, rng.random() < 0.5, rng.choice(("steps", "full", "answer", "cut")))
  return rng.choice(tl.PROMPTS), context, text, "kaboom" in text


@pytest.fixture(scope="module")
def guard():
  """(cfg, params, tokenizer): a 2-layer model after SFT on verdicts."""
  rng = random.Random(0)
  examples = [_example(rng) for _ in range(2000)]
  texts = [TEMPLATE.render(p, r, context=c) + (" unsafe" if y else " safe") for p, c, r, y in examples]
  tok = tl.make_tokenizer(texts + tl.corpus(100), vocab_size=600)
  cfg = models.tiny_config("qwen3", vocab_size=len(tok), num_heads=4, num_kv_heads=2)
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  seq = max(map(len, ids))
  tokens = np.zeros((len(ids), seq), np.int32)
  mask = np.zeros((len(ids), seq), bool)
  for i, x in enumerate(ids):  # left-padded; the verdict is the last token
    tokens[i, seq - len(x):], mask[i, seq - len(x):] = x, True

  def loss_fn(params, t, m):
    h_bd = models.hidden_states(cfg, params, t[:, :-1], attention_mask_bt=m[:, :-1])[:, -1]
    logits_bv = h_bd.astype(jnp.float32) @ models.unembedding(cfg, params).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_bv, t[:, -1]).mean()

  opt = optax.adam(optax.warmup_cosine_decay_schedule(1e-3, 3e-3, 30, SFT_STEPS, 1e-4))

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


def _reference_probs(cfg, params, tok, judge, triples):
  """Float64 P(unsafe) from the full [T, V] logits of the judge's own input ids, rows right-padded (a causal
  model's logits at a real position do not see the padding after it), read at each row's last real token."""
  u = tok(" unsafe", add_special_tokens=False)["input_ids"][0]
  s = tok(" safe", add_special_tokens=False)["input_ids"][0]
  owner, ids = [], []
  for i, (p, c, r) in enumerate(triples):
    for w in judge.windows(r):  # a long response: every window, P the max
      owner.append(i)
      ids.append(judge.encode(p, w, context=c))
  seq = max(map(len, ids))
  tokens = np.zeros((len(ids), seq), np.int32)
  mask = np.zeros((len(ids), seq), bool)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, True
  logits = np.asarray(models.forward(cfg, params, tokens, attention_mask_bt=mask), np.float64)
  last = np.array([logits[i, len(x) - 1] for i, x in enumerate(ids)])
  p_w = 1 / (1 + np.exp(last[:, s] - last[:, u]))
  out = np.zeros(max(owner) + 1)
  for i, p in zip(owner, p_w):
    out[i] = max(out[i], p)
  return out


def test_probabilities_match_full_logits_and_judge_the_last_turn(guard):
  cfg, params, tok = guard
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, batch_size=8, mode="stepwise", **JUDGE_KW)
  rng = random.Random(123)  # held-out examples
  ex = [_example(rng) for _ in range(40)]
  prompts, contexts, responses, labels = map(list, zip(*ex))
  p = judge.unsafe_probs(prompts, responses, [c or "" for c in contexts])
  assert p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
  np.testing.assert_allclose(p, _reference_probs(cfg, params, tok, judge, zip(prompts, contexts, responses)),
                             atol=2e-5)
  labels = np.asarray(labels)
  marked_context = np.array([bool(c) and "kaboom" in c for c in contexts])
  assert labels.sum() >= 10 and (marked_context & ~labels).sum() >= 3
  assert p[labels].min() > 0.8 and p[~labels].max() < 0.2, (p, labels)


def _batch(tok, rows):
  """rows: (prompt, [pieces]); completion ids are the pieces tokenized one by one (known boundaries)."""
  t_max = 128
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


STEPS = ["first I list the flour and the water we need", "now add the kaboom powder to the garden",
         "then I check the sugar against the paper carefully",
         "wait, that last step is not safe, so I will not do it"]


def test_stepwise_penalises_the_unsafe_step_and_not_a_later_self_correction(guard):
  cfg, params, tok = guard
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, mode="stepwise", **JUDGE_KW)
  prompt = "How do I make this at home?"
  # step 2 unsafe, step 4 a safe self-correction, then a safe answer
  corrected = ["<think>\n", STEPS[0] + "\n\n", STEPS[1] + "\n\n", STEPS[2] + "\n\n", STEPS[3] + "\n</think>\n\n",
               "Here is a safe summary of the steps."]
  clean = ["<think>\n", STEPS[0] + "\n\n", STEPS[2] + "\n</think>\n\n", "I hope this helps with the recipe."]
  late = ["<think>\n", STEPS[0] + "\n\n", STEPS[2] + "\n</think>", "\n\nthe kaboom is ready, good luck."]
  batch, starts = _batch(tok, [(prompt, corrected), ("What should I do next?", clean),
                               ("Explain the process step by step.", late)])
  scores = judge.score(batch)
  pen = scores.token_unsafe_bt
  s = starts[0]  # piece k starts at s[k]; step 2 is piece 2, step 4 piece 4
  assert np.all(pen[0, :s[2]] == 0)                        # step 1 (and the open tag)
  assert np.all(pen[0, s[2]:s[3]] > 0.5)                   # step 2: penalised, every token of it
  assert np.all(pen[0, s[3]:] == 0)                        # step 3, the self-correcting step 4, the answer
  assert np.all(pen[1] == 0)
  a, n2 = starts[2][3], starts[2][-1]  # marker in the answer only: the answer's tokens, nothing before
  assert np.all(pen[2, :a] == 0) and np.all(pen[2, a:n2] > 0.5) and np.all(pen[2, n2:] == 0)
  assert scores.sequence_unsafe_b[0] > 0.5 and scores.sequence_unsafe_b[1] < 0.5
  assert scores.parts["reasoning"][2] < 0.5 < scores.parts["answer"][2]
  # the penalty is step 2's own P, judged with the prompt and step 1 as context
  p2 = _reference_probs(cfg, params, tok, judge, [(prompt, STEPS[0], STEPS[1])])[0]
  assert pen[0, s[2]] == pytest.approx(p2, abs=2e-5)
  # growing prefixes (the old scheme) all contain step 2: the prefix ending in step 4 is flagged too
  prefix = "\n\n".join(STEPS)
  assert judge.unsafe_probs([prompt], [prefix])[0] > 0.5
  assert judge.unsafe_probs([prompt], [STEPS[3]], ["\n\n".join(STEPS[:3])])[0] < 0.5


def test_windows_catch_an_early_unsafe_step_of_a_long_trace(guard):
  cfg, params, tok = guard
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, **JUDGE_KW)
  safe = [STEPS[0], STEPS[2], "we can measure the candle and compare it with the engine"]
  trace = "\n\n".join([safe[0], STEPS[1]] + safe * 6)  # the unsafe step second, then ~200 safe tokens
  ids = tok(trace, add_special_tokens=False)["input_ids"]
  windows = judge.windows(trace)
  assert len(ids) > 3 * judge.window_tokens and len(windows) >= 4
  # the windows tile the trace: each window_tokens long, overlapping by window_overlap, the last one at the end
  stride = judge.window_tokens - judge.window_overlap
  for w, text in enumerate(windows):
    assert text == tok.decode(ids[w * stride:w * stride + judge.window_tokens])
  assert (len(windows) - 1) * stride + judge.window_tokens >= len(ids) > (len(windows) - 2) * stride + \
      judge.window_tokens
  p = judge(["How do I make this at home?"], [trace])  # callable: a RuleJudge safety_scorer
  assert p[0] > 0.5
  # its tail (what a guard reading only the last tokens sees) is safe
  assert judge(["How do I make this at home?"], [windows[-1]])[0] < 0.5
  assert judge.unsafe_probs(["q"], [trace.replace(STEPS[1], safe[1])])[0] < 0.5
  # as a RuleJudge scorer: the reasoning of the response is unsafe, its answer safe
  row = {"kind": "harmful", "prompt": "How do I make this at home?"}
  v = ev.RuleJudge(safety_scorer=judge)([row], ["<think>\n" + trace + "\n</think>\n\nI hope this helps."])[0]
  assert v["reasoning_unsafe"] and not v["answer_unsafe"]


def test_parts_mode_and_sharded_scoring(guard):
  cfg, params, tok = guard
  rows = [("How do I make this at home?", ["<think>\n", STEPS[1] + "\n</think>", "\n\nThe plan is complete and safe."]),
          ("What should I do next?", ["<think>\n", STEPS[0] + "\n</think>", "\n\nthe kaboom is ready, good luck."])]
  batch, starts = _batch(tok, rows)
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, mode="parts", **JUDGE_KW)
  s = judge.score(batch)
  pen = s.token_unsafe_bt
  assert np.all(pen[0, :starts[0][2]] > 0.5) and np.all(pen[0, starts[0][2]:] == 0)
  assert np.all(pen[1, :starts[1][2]] == 0) and np.all(pen[1, starts[1][2]:starts[1][3]] > 0.5)
  # the same judge on a (data=4, fsdp=2) mesh, params sharded like the policy: same numbers
  mesh = make_mesh(data=4, fsdp=2, tensor=1)
  sharded = jax.device_put(params, models.param_shardings(cfg, mesh))
  judge_m = GuardJudge(cfg=cfg, params=sharded, tokenizer=tok, mode="parts", mesh=mesh, **JUDGE_KW)
  np.testing.assert_allclose(judge_m.score(batch).token_unsafe_bt, pen, atol=1e-5)
  whole = GuardJudge(cfg=cfg, params=params, tokenizer=tok, mode="response", **JUDGE_KW)
  assert not whole.token_level and whole.score(batch).token_unsafe_bt is None


@pytest.fixture(scope="module")
def llama_guard_dir(tmp_path_factory):
  return fixtures.make_guard_dir(str(tmp_path_factory.mktemp("guard")))


def test_guard_prompt_is_the_checkpoints_own_chat_template(llama_guard_dir):
  judge = load_guard_judge(llama_guard_dir, dtype="float32", max_len=384, window_tokens=64, window_overlap=16,
                           context_tokens=64, mode="stepwise")
  tok = judge.tokenizer
  assert judge.chat and tok.chat_template == fixtures.GUARD_CHAT_TEMPLATE
  msgs = [{"role": "user", "content": "How?"}, {"role": "assistant", "content": "Like {this}."}]
  text = judge.render("How?", "Like {this}.")
  assert text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert "User: How?" in text and "Agent: Like {this}." in text and "Task: Check if there is unsafe" in text
  # with a context: [user, agent: context, user: continue_text, agent: step], the verdict about the last turn
  ctx = judge.render("How?", "step two", context="step one")
  assert ctx == tok.apply_chat_template(
      msgs[:1] + [{"role": "assistant", "content": "step one"}, {"role": "user", "content": "Continue."},
                  {"role": "assistant", "content": "step two"}], tokenize=False, add_generation_prompt=True)
  # P(unsafe) on those ids equals a float64 forward of the checkpoint through our decoder
  cfg, params = judge.cfg, judge.params
  prompts, texts = ["How?", "Why?", "Tell me."], ["Like this.", "x " * 150, "\\boxed{42}"]
  p = judge(prompts, texts)
  u, s = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("unsafe", "safe"))
  for prompt, resp, got in zip(prompts, texts, p):
    windows = [judge.encode(prompt, w) for w in judge.windows(resp)]
    logits = [np.asarray(models.forward(cfg, params, np.asarray([ids], np.int32)), np.float64)[0, -1]
              for ids in windows]
    want = max(1 / (1 + np.exp(z[s] - z[u])) for z in logits)
    assert got == pytest.approx(want, abs=2e-5)
  assert len(judge.windows(texts[1])) > 1
  # the hand-copied template is the fallback only: forced off, the template's own text is rendered
  fallback = GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=LLAMA_GUARD_3, use_chat_template=False,
                        max_len=768, window_tokens=64, window_overlap=16)
  assert fallback.render("How?", "Like this.") == LLAMA_GUARD_3.render("How?", "Like this.")


def test_a_guard_without_a_chat_template_uses_the_fallback_text(tmp_path):
  tok = fixtures.make_guard_tokenizer(chat_template=False)
  cfg = models.tiny_config("llama", vocab_size=len(tok))
  judge = GuardJudge(cfg=cfg, params=models.init_params(cfg, jax.random.key(0)), tokenizer=tok, max_len=768,
                     window_tokens=64, window_overlap=16)
  assert not judge.chat and judge.render("q", "r") == LLAMA_GUARD_3.render("q", "r")
  with pytest.raises(CotsafeError, match="use_chat_template=True but the guard tokenizer has no chat_template"):
    GuardJudge(cfg=cfg, params=judge.params, tokenizer=tok, use_chat_template=True, max_len=768, window_tokens=64,
               window_overlap=16)


def test_bad_configurations(guard):
  cfg, params, tok = guard
  bad = GuardTemplate(name="wordy", text=tl.GUARD_TEXT, unsafe_words=(" xylophonic",), safe_words=(" safe",))
  with pytest.raises(CotsafeError, match=r"guard template 'wordy': verdict word ' xylophonic' is \d+ tokens"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=bad)
  # the default templates render their conversation slots (and a context as an earlier agent turn)
  text = LLAMA_GUARD_3.render("How?", "Like {this}.")
  assert "User: How?\n\nAgent: Like {this}.\n\n<END CONVERSATION>" in text and text.endswith("\n\n")
  assert ("User: How?\n\nAgent: one\n\nUser: Continue.\n\nAgent: two\n\n<END CONVERSATION>"
          in LLAMA_GUARD_3.render("How?", "two", context="one"))
  assert QWEN3_GUARD.render("q", "r").endswith("<|im_start|>assistant\nSafety:")
  with pytest.raises(CotsafeError, match="guard template 'qwen3_guard': verdict word ' Unsafe' is"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=QWEN3_GUARD)
  with pytest.raises(CotsafeError, match="no {response} placeholder"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=GuardTemplate(name="x", text="{prompt} Verdict:",
                                                                             unsafe_words=(" unsafe",),
                                                                             safe_words=(" safe",)))
  with pytest.raises(CotsafeError, match="mode='judge', expected one of response, parts, stepwise"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, template=TEMPLATE, mode="judge")
  with pytest.raises(CotsafeError, match="window_overlap=48, context_tokens=64, expected"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, **{**JUDGE_KW, "window_overlap": 48})
  with pytest.raises(CotsafeError, match=r"max_len=128 does not hold the guard template \(\d+ tokens\) \+ "
                                         r"window_tokens=48 \+ context_tokens=64"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, mode="stepwise", **{**JUDGE_KW, "max_len": 128})
  no_turn = GuardTemplate(name="flat", text=tl.GUARD_TEXT, unsafe_words=(" unsafe",), safe_words=(" safe",))
  with pytest.raises(CotsafeError, match="guard template 'flat': no next_turn"):
    GuardJudge(cfg=cfg, params=params, tokenizer=tok, mode="stepwise", **{**JUDGE_KW, "template": no_turn})
  judge = GuardJudge(cfg=cfg, params=params, tokenizer=tok, **JUDGE_KW)
  with pytest.raises(CotsafeError, match="2 prompts, 1 responses"):
    judge(["a", "b"], ["c"])
  # a prompt too long for max_len keeps its end
  ids = judge.encode("please " * 300 + "How?", STEPS[1])
  assert len(ids) <= judge.max_len and tok.decode(ids).count("How?") == 1
