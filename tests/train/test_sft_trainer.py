"""SFT trainer: assistant-only target masks, loss vs a float64 NumPy NLL, training + HF export, exact resume
(after num_steps and after SIGTERM), bad-input errors. One compiled train step is shared by all runs."""
import dataclasses
import functools
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError, models, parallel
from cotsafe_jax.data import load_sft, make_pipeline
from cotsafe_jax.data import synthetic as syn
from cotsafe_jax.train import make_optimizer
from cotsafe_jax.train import sft_trainer as st
from cotsafe_jax.train.checkpointing import Checkpointer

# tensor=2 splits heads, mlp and vocab; data x fsdp = 4 splits each microbatch of 4 rows
CONFIG = st.SFTConfig(max_len=64, batch_size=8, num_steps=40, learning_rate=3e-3, schedule="constant",
                      warmup_steps=5, num_microbatches=2, seed=0)
RUN = dict(save_interval_steps=10, max_to_keep=2)
EOS = "<|end|>"
# a second template: a system role, newline after the role header and after the eos (ChatML-like)
TEMPLATE_NL = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|user|>system\n{{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  task = syn.make_task(seed=0, n_train=64, n_eval=0)
  return syn.write_task(task, str(tmp_path_factory.mktemp("task")))


@pytest.fixture(scope="module")
def tok(task_files):
  return models.load_tokenizer(task_files["tokenizer"])


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(2, 2, 2)


@pytest.fixture(scope="module")
def cfg():
  return models.tiny_config("qwen2", vocab_size=576)


def _train(workdir, task_files, cfg, mesh, **kw):
  config = dataclasses.replace(CONFIG, **kw.pop("config", {}))
  return st.sft_train(workdir=str(workdir), data=task_files["sft_safe"], config=config, model=cfg,
                      tokenizer_dir=task_files["tokenizer"], mesh=mesh, **{**RUN, **kw})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, task_files, cfg, mesh):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, _train(workdir, task_files, cfg, mesh)


def _pieces(tok, ids, target):
  """Decoded runs of consecutive target / non-target tokens."""
  runs, start = [], 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or target[i] != target[start]:
      runs.append((tok.decode(ids[start:i]), target[start]))
      start = i
  return runs


def test_target_mask_covers_exactly_the_assistant_tokens(tok):
  response = "<think>\nadd 2 and 3. 2 + 3 = 5.\n</think>\n\nthe answer is 5."
  ids, target = st.encode_row(tok, {"prompt": "what is 2 + 3?", "response": response})
  prefix = models.apply_chat_template(tok, "what is 2 + 3?", add_generation_prompt=True, thinking=True)
  assert prefix.endswith("<think>\n")
  # the prompt opened the think block: the target does not repeat it
  assert _pieces(tok, ids, target) == [(prefix, False), (response[len("<think>\n"):] + EOS, True)]
  ids, target = st.encode_row(tok, {"prompt": "hi", "response": "hello."})
  assert _pieces(tok, ids, target)[1] == ("hello." + EOS, True)

  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, how can i help?"},
              {"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": response}]
  ids, target = st.encode_row(tok, {"messages": messages})
  assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
  assert [text for text, is_target in _pieces(tok, ids, target) if is_target] == [
      "hello, how can i help?" + EOS, response[len("<think>\n"):] + EOS]
  assert [text for text, is_target in _pieces(tok, ids, target) if not is_target] == [
      "<|user|>hi<|assistant|>", "<|user|>what is 2 + 3?<|assistant|><think>\n"]

  tok_nl = models.load_tokenizer(tok.name_or_path)
  tok_nl.chat_template = TEMPLATE_NL
  messages = [{"role": "system", "content": "be brief"}] + messages
  ids, target = st.encode_row(tok_nl, {"messages": messages})
  assert tok_nl.decode(ids) == tok_nl.apply_chat_template(messages, tokenize=False)
  # neither the role header "<|assistant|>\n" nor the newline after the eos is a target
  assert [text for text, is_target in _pieces(tok_nl, ids, target) if is_target] == [
      "hello, how can i help?" + EOS, response[len("<think>\n"):] + EOS]


def _np_loss(logits_btv, tokens_bt, target_bt):
  """Masked token-mean NLL and argmax accuracy in float64, with the top-2 gap of each target position."""
  z = np.asarray(logits_btv, np.float64)[:, :-1]
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  y, m = np.asarray(tokens_bt)[:, 1:], np.asarray(target_bt)[:, 1:]
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  top2 = np.sort(z, -1)[..., -2:]
  return (nll * m).sum() / m.sum(), ((z.argmax(-1) == y) * m).sum() / m.sum(), (top2[..., 1] - top2[..., 0])[m]


def _batch(examples, idx):
  return {"tokens_bt": examples.tokens_nt[idx], "attention_bt": examples.attention_nt[idx],
          "target_bt": examples.target_nt[idx]}


def test_loss_matches_float64_numpy(straight, task_files, tok, cfg):
  workdir, _ = straight
  rows = load_sft(task_files["sft_safe"]).rows
  examples = st.encode_rows(tok, rows, max_len=CONFIG.max_len)
  # the trained export: peaked logits make token accuracy meaningful
  cfg_hf, params = models.load_hf(os.path.join(workdir, "hf"))
  batch = _batch(examples, np.arange(8))
  loss, metrics = jax.jit(functools.partial(st.sft_loss, cfg_hf))(params, batch)
  logits = models.forward(cfg_hf, params, jnp.asarray(batch["tokens_bt"]), attention_mask_bt=batch["attention_bt"])
  want_loss, want_acc, gap = _np_loss(logits, batch["tokens_bt"], batch["target_bt"])
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert 0.2 < want_acc < 1.0
  # accuracy comes from softmax(z / 1e-3): exact except where the top two logits are within ~1e-3
  assert abs(float(metrics["token_accuracy"]) - want_acc) * batch["target_bt"][:, 1:].sum() <= (gap < 2e-3).sum()

  # the first logged step (8 devices, 2 microbatches) = the float64 loss of the first batch at init
  order = next(make_pipeline([{"i": i} for i in range(len(rows))], batch_size=8, seed=CONFIG.seed))
  batch = _batch(examples, np.asarray([r["i"] for r in order]))
  params0 = models.init_params(cfg, jax.random.key(CONFIG.seed))  # what the run started from
  logits = models.forward(cfg_hf, params0, jnp.asarray(batch["tokens_bt"]), attention_mask_bt=batch["attention_bt"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first["step"] == 1 and first["target_tokens"] == batch["target_bt"][:, 1:].sum()
  np.testing.assert_allclose(first["loss"], _np_loss(logits, batch["tokens_bt"], batch["target_bt"])[0], rtol=1e-5)


def _final_params(workdir, cfg, mesh):
  opt = make_optimizer(learning_rate=1.0, schedule="constant", warmup_steps=0, total_steps=1)
  shapes = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": opt.init(p)},
                          models.param_shapes(cfg))
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        st.state_shardings(cfg, opt, mesh))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, data, _ = ckpt.restore(ckpt.latest_step(), target)
  ckpt.close()
  return state, data


def test_training_drops_the_loss_and_the_export_reloads(straight, task_files, tok, cfg, mesh):
  workdir, out = straight
  with open(out["metrics_path"]) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, 41))
  first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-5:]])
  ratio = last / first
  print(f"sft loss {first:.3f} -> {last:.3f} (ratio {ratio:.3f}), accuracy {rows[-1]['token_accuracy']:.3f}")
  assert ratio < 0.5 and rows[-1]["token_accuracy"] > 0.4
  assert rows[5]["lr"] == pytest.approx(3e-3) and rows[0]["lr"] == 0.0 and rows[-1]["perf/tokens_per_s"] > 0
  assert out["step"] == 40 and not out["stopped_early"] and out["loss"] == rows[-1]["loss"]
  lengths = [len(st.encode_row(tok, r)[0]) for r in load_sft(task_files["sft_safe"]).rows]
  assert out["num_truncated_rows"] == sum(n > CONFIG.max_len for n in lengths) > 0

  state, data = _final_params(workdir, cfg, mesh)
  assert int(state["step"]) == 40 and data["step"] == 40
  cfg_hf, params = models.load_hf(out["hf_dir"])
  assert cfg_hf.eos_token_id == tok.eos_token_id
  assert models.load_tokenizer(out["hf_dir"]).get_vocab() == tok.get_vocab()
  ex = st.encode_rows(tok, load_sft(task_files["sft_safe"]).rows[:8], max_len=CONFIG.max_len)
  trained = jax.device_put(state["params"], jax.devices()[0])
  forward = functools.partial(models.forward, cfg_hf, attention_mask_bt=ex.attention_nt)
  np.testing.assert_array_equal(forward(params, ex.tokens_nt), forward(trained, ex.tokens_nt))


def test_resume_is_exact_after_num_steps_and_after_sigterm(straight, tmp_path, task_files, cfg, mesh,
                                                            monkeypatch):
  straight_dir, want = straight
  half = _train(tmp_path, task_files, cfg, mesh, config={"num_steps": 20}, export_hf=False)
  assert half["step"] == 20 and half["hf_dir"] is None

  write = st.MetricLogger.write

  def write_then_sigterm(self, step, metrics):
    row = write(self, step, metrics)
    if step == 30:  # as a scheduler would, while step 30 is finishing
      os.kill(os.getpid(), signal.SIGTERM)
    return row

  monkeypatch.setattr(st.MetricLogger, "write", write_then_sigterm)
  stopped = _train(tmp_path, task_files, cfg, mesh)
  monkeypatch.undo()
  assert stopped["stopped_early"] and stopped["step"] == 30 and stopped["hf_dir"] is None
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 30

  done = _train(tmp_path, task_files, cfg, mesh)
  assert done["step"] == 40 and not done["stopped_early"] and done["loss"] == want["loss"]
  strip = lambda path: [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
                        for line in open(path)]
  assert strip(done["metrics_path"]) == strip(want["metrics_path"])
  _, resumed = models.load_hf(done["hf_dir"])
  _, reference = models.load_hf(want["hf_dir"])
  jax.tree.map(np.testing.assert_array_equal, resumed, reference)
  again = _train(tmp_path, task_files, cfg, mesh, export_hf=False)  # finished: nothing left to do
  assert again["step"] == 40 and again["loss"] == want["loss"]


def test_padding_each_batch_to_its_longest_row_changes_no_maths(tmp_path, task_files, tok, cfg, mesh, monkeypatch):
  ex = st.encode_rows(tok, load_sft(task_files["sft_safe"]).rows, max_len=CONFIG.max_len)
  lengths = ex.attention_nt.sum(1)
  rows = [{"_row": int(i)} for i in np.argsort(lengths, kind="stable")[:8]]  # 8 short rows
  longest = max(int(lengths[r["_row"]]) for r in rows)
  assert longest < 56  # they do not fill max_len = 64
  cut = st._host_batch(ex, rows, 8)
  assert {v.shape for v in cut.values()} == {(8, -(-longest // 8) * 8)}
  assert int(cut["attention_bt"].sum()) == sum(int(lengths[r["_row"]]) for r in rows)  # only padding was cut
  assert st._host_batch(ex, [{"_row": int(np.argmax(lengths))}], 8)["tokens_bt"].shape == (1, 64)
  with pytest.raises(CotsafeError, match=r"SFTConfig.pad_to_multiple=0, expected a positive int"):
    dataclasses.replace(CONFIG, pad_to_multiple=0)

  # 6 steps with max_len 128 (no row cut): padded to max_len, or each batch to its longest row (lengths recorded)
  widths = []
  host_batch = st._host_batch
  monkeypatch.setattr(st, "_host_batch", lambda *a: widths.append(host_batch(*a)["tokens_bt"].shape[1]) or
                      host_batch(*a))
  runs = {}
  for pad in (None, 8):
    workdir = tmp_path / f"pad{pad}"
    _train(workdir, task_files, cfg, mesh, config={"num_steps": 6, "max_len": 128, "pad_to_multiple": pad},
           export_hf=False)
    with open(workdir / "metrics.jsonl") as f:
      runs[pad] = [json.loads(line) for line in f]
  assert widths[:6] == [128] * 6 and all(w % 8 == 0 and w < 128 for w in widths[6:]), widths
  for key in ("loss", "grad_norm", "token_accuracy", "target_tokens"):
    np.testing.assert_allclose([r[key] for r in runs[8]], [r[key] for r in runs[None]], rtol=2e-5, err_msg=key)


def test_bad_rows_and_overlong_rows_are_errors(tmp_path, task_files, tok, cfg, mesh):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"prompt": "hi", "response": "hello."}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
  want = f'{path}:2: field "response" missing, expected "messages" or "prompt" + "response"'
  with pytest.raises(CotsafeError, match=re.escape(want)):
    st.sft_train(workdir=str(tmp_path / "w1"), data=str(path), config=CONFIG, model=cfg,
                 tokenizer_dir=task_files["tokenizer"], mesh=mesh)

  long_row = {"id": "long-1", "prompt": "hi", "response": "tom has 3 apples. " * 20}
  path.write_text(json.dumps({"prompt": "hi", "response": "hello."}) + "\n" + json.dumps(long_row) + "\n")
  n = len(st.encode_row(tok, long_row)[0])
  want = (f"{path}: row 2 (id long-1): {n} tokens, longer than max_len=64 (expected at most max_len tokens; "
          "raise max_len or set truncate='right')")
  with pytest.raises(CotsafeError, match=re.escape(want)):
    st.sft_train(workdir=str(tmp_path / "w2"), data=str(path), config=dataclasses.replace(CONFIG, truncate="error"),
                 model=cfg, tokenizer_dir=task_files["tokenizer"], mesh=mesh)
  with pytest.raises(CotsafeError, match="expected exactly one of them"):
    st.SFTConfig(num_steps=10, num_epochs=1)


def test_templates_that_cannot_render_a_row_are_errors(tok):
  row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello."}]}
  want = re.escape("sys.jsonl: row 1: the tokenizer's chat template cannot render it (") + ".*no role system"
  with pytest.raises(CotsafeError, match=want):
    st.encode_rows(tok, [row], max_len=64, source="sys.jsonl")
  # like Qwen3 dropping earlier reasoning: the last assistant turn renders differently from earlier ones
  tok_last = models.load_tokenizer(tok.name_or_path)
  tok_last.chat_template = (
      "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% else %}<|assistant|>"
      "{{ m['content'] }}{% if loop.last %} (last){% endif %}<|end|>{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  row = {"id": "t-7", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                   {"role": "user", "content": "and?"}, {"role": "assistant", "content": "b"}]}
  with pytest.raises(CotsafeError, match=re.escape("chat.jsonl: row 1 (id t-7): the chat template renders earlier "
                                                   "turns differently once a later turn is added")):
    st.encode_rows(tok_last, [row], max_len=64, source="chat.jsonl")
  ids, target = st.encode_row(tok_last, {"messages": row["messages"][:2]})  # one turn: fine
  assert [t for t, is_target in _pieces(tok_last, ids, target) if is_target] == ["a (last)" + EOS]
