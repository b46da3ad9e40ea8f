"""Token-level safety RM: loss and pooling against float64 loops, metrics against loops, the trainer end to end
(token F1 >= 0.9 on held-out synthetic rows), orbax resume, export + load, bad rows."""
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import safety_rm as srm
from cotsafe_jax.rewards import spans_to_token_labels
from cotsafe_jax.rewards.safety_rm_data import encode_file
from cotsafe_jax.rewards.safety_rm_trainer import auroc, binary_metrics, evaluate_rm, rm_loss, train_safety_rm

from tests.rewards import rewards_testlib


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return path


@pytest.fixture(scope="module")
def span_files(tmp_path_factory, bpe_tokenizer):
  d = tmp_path_factory.mktemp("spans")
  rng = random.Random(1)
  train = [rewards_testlib.span_row(rng, label_only=i % 5 == 0) for i in range(300)]
  evals = [rewards_testlib.span_row(rng) for _ in range(100)]
  bpe_tokenizer.save_pretrained(str(d / "tok"))
  return {"train": _write_jsonl(d / "train.jsonl", train), "eval": _write_jsonl(d / "eval.jsonl", evals),
          "tok": str(d / "tok"), "dir": d}


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_pooled_log_probs_match_float64(pool):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 11)) * 8
  z[0, 3] = 40.0  # saturated logits must not produce inf / nan
  z[1] = -35.0
  mask = rng.random((5, 11)) < 0.7
  mask[:, 0] = True
  lp, l1mp = srm.pooled_log_probs(jnp.asarray(z, jnp.float32), jnp.asarray(mask), pool)
  for b in range(5):
    p = 1 / (1 + np.exp(-z[b][mask[b]].astype(np.float64)))
    q = p.max() if pool == "max" else p.mean()
    want_lp = np.log(q)
    want_l1mp = np.log1p(-q) if q < 1 - 1e-12 else None
    assert np.isfinite(float(lp[b])) and np.isfinite(float(l1mp[b]))
    np.testing.assert_allclose(float(lp[b]), want_lp, rtol=1e-5, atol=1e-6)
    if want_l1mp is not None:
      np.testing.assert_allclose(float(l1mp[b]), want_l1mp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(srm.pool_probs(jnp.asarray(1 / (1 + np.exp(-z)), jnp.float32)[b:b + 1],
                                                    jnp.asarray(mask[b:b + 1]), pool)[0]), q, rtol=1e-5)


def test_rm_loss_matches_numpy_loop():
  cfg = models.tiny_config("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4,
                           num_kv_heads=2)
  rm_params = {"backbone": models.init_params(cfg, jax.random.key(0)),
               "head": {"kernel": jax.random.normal(jax.random.key(1), (32, 1)), "bias": jnp.array([0.3])}}
  rng = np.random.default_rng(1)
  b, t = 4, 9
  tokens = rng.integers(0, 64, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, 7:] = False
  resp = mask.copy()
  resp[:, :3] = False
  labels = np.where(resp, rng.integers(0, 2, (b, t)), -1).astype(np.int32)
  has_tok = np.array([True, True, False, False])
  labels[~has_tok] = -1
  seq = np.array([1, 0, 1, 0], np.int32)
  batch = {"tokens": tokens, "mask": mask, "token_labels": labels, "response_mask": resp, "seq_labels": seq,
           "has_token_labels": has_tok}
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  got = jax.jit(lambda p: {pool: rm_loss(cfg, p, jbatch, pos_weight=2.5, seq_pool=pool)
                           for pool in ("max", "mean")})(rm_params)  # one compile for both pools
  z = np.asarray(jax.jit(srm.token_logits, static_argnums=0)(cfg, rm_params, tokens, mask), np.float64)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  tok_terms = [(-2.5 * np.log(sig(z[i, j])) if labels[i, j] == 1 else -np.log(1 - sig(z[i, j])))
               for i in range(b) for j in range(t) if labels[i, j] >= 0]
  for pool in ("max", "mean"):
    loss, parts = got[pool]
    seq_terms = []
    for i in range(b):
      if has_tok[i]:
        continue
      p = sig(z[i][resp[i]])
      q = p.max() if pool == "max" else p.mean()
      seq_terms.append(-np.log(q) if seq[i] == 1 else -np.log(1 - q))
    np.testing.assert_allclose(float(parts["token_loss"]), np.mean(tok_terms), rtol=1e-5)
    np.testing.assert_allclose(float(parts["seq_loss"]), np.mean(seq_terms), rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.mean(tok_terms) + np.mean(seq_terms), rtol=1e-5)


def test_auroc_and_f1_match_loops():
  rng = np.random.default_rng(2)
  scores = np.round(rng.random(300), 1)  # many ties
  labels = rng.random(300) < 0.3
  pos, neg = scores[labels], scores[~labels]
  want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert auroc(scores, labels) == pytest.approx(want, abs=1e-12)
  m = binary_metrics(scores, labels, threshold=0.5)
  tp = sum(1 for s, y in zip(scores, labels) if s >= 0.5 and y)
  fp = sum(1 for s, y in zip(scores, labels) if s >= 0.5 and not y)
  fn = sum(1 for s, y in zip(scores, labels) if s < 0.5 and y)
  assert m["precision"] == pytest.approx(tp / (tp + fp)) and m["recall"] == pytest.approx(tp / (tp + fn))
  assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  assert np.isnan(auroc(scores, np.zeros(300, bool)))


def test_train_safety_rm_reaches_f1_and_exports(span_files, bpe_tokenizer):
  cfg = models.tiny_config("qwen2", vocab_size=len(bpe_tokenizer))
  workdir = str(span_files["dir"] / "work")
  kw = dict(backbone=cfg, tokenizer_dir=span_files["tok"], train_path=str(span_files["train"]),
            eval_path=str(span_files["eval"]), workdir=workdir, steps=120, batch_size=16, learning_rate=3e-3,
            max_len=96, seed=0, checkpoint_every=100)
  result = train_safety_rm(**kw)
  print("\nsafety RM held-out metrics:", {k: result[k] for k in ("token_precision", "token_recall", "token_f1",
                                                                   "token_auroc", "seq_accuracy", "pos_weight")})
  assert result["token_f1"] >= 0.9 and result["token_auroc"] >= 0.95 and result["seq_accuracy"] >= 0.9
  # the stop token is scored safe, also right after an unsafe answer (where PPO puts the sequence rewards)
  evals = encode_file(bpe_tokenizer, str(span_files["eval"]), max_len=96)
  last = evals.mask.sum(1) - 1
  rows = np.arange(len(evals))
  assert (evals.tokens[rows, last] == bpe_tokenizer.eos_token_id).all()
  trained = srm.load_safety_rm(result["export_dir"])
  p_stop = trained.token_probs(evals.tokens, evals.mask)[rows, last]
  unsafe_end = evals.token_labels[rows, last - 1] == 1
  print(f"P(unsafe) at the stop token: max {p_stop.max():.3f}; after an unsafe answer: "
        f"{p_stop[unsafe_end].max():.3f} ({int(unsafe_end.sum())} rows)")
  assert unsafe_end.sum() >= 5 and p_stop.max() < 0.5
  assert result["eval_rows"] == 100 and result["train_rows"] == 300 and result["truncated_rows"] == 0
  # class weight = negatives / positives over the labelled training tokens
  enc = encode_file(bpe_tokenizer, str(span_files["train"]), max_len=96)
  assert result["pos_weight"] == pytest.approx((enc.token_labels == 0).sum() / (enc.token_labels == 1).sum())
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["100", "120"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 120 and rows[-1]["eval/token_f1"] == pytest.approx(result["token_f1"])
  # the export loads back and scores the held-out split identically
  rm = srm.load_safety_rm(result["export_dir"])
  assert rm.seq_pool == "max" and rm.cfg.hidden_size == cfg.hidden_size
  text = "<think>\nmix the bleach</think>\n\nok"
  assert rm.tokenizer(text)["input_ids"] == bpe_tokenizer(text)["input_ids"]
  again = evaluate_rm(rm, encode_file(rm.tokenizer, str(span_files["eval"]), max_len=96), batch_size=16)
  for k in ("token_f1", "token_auroc", "seq_accuracy"):
    assert again[k] == pytest.approx(result[k], abs=1e-6)
  # a second call resumes from the step-120 checkpoint: nothing left to train, same model
  resumed = train_safety_rm(**kw)
  assert resumed["token_auroc"] == pytest.approx(result["token_auroc"], abs=1e-6)


def test_every_whole_response_ends_with_the_stop_token(span_files, bpe_tokenizer):
  """PPO's finished completions end with the stop token and the RM scores it there: training rows end with it
  too, labelled safe (unlabelled on sequence-label rows), inside the response mask; a response cut at max_len
  does not end, so it has none."""
  d = span_files["dir"]
  eos = bpe_tokenizer.eos_token_id
  response = "<think>\nmix the bleach with the ammonia</think>\n\nmix the bleach with the ammonia now"
  rows = [{"prompt": "p", "response": response, "unsafe_spans": [[len(response) - 35, len(response)]]},
          {"prompt": "p", "response": response, "label": "unsafe"},
          {"prompt": "p", "response": "ok", "label": "safe"}]
  enc = encode_file(bpe_tokenizer, str(_write_jsonl(d / "stop.jsonl", rows)), max_len=64)
  for i, last_label in enumerate([0, -1, 0]):
    n = int(enc.mask[i].sum())
    assert enc.tokens[i, n - 1] == eos and enc.response_mask[i, n - 1], i
    assert enc.token_labels[i, n - 1] == last_label, i
  assert enc.token_labels[0, int(enc.mask[0].sum()) - 2] == 1  # the response's last token is unsafe, its stop not
  # cut inside the response: no stop token; only the prompt cut: the stop token stays
  n0 = int(enc.mask[0].sum())  # prompt + response + stop
  short = encode_file(bpe_tokenizer, str(d / "stop.jsonl"), max_len=n0 - 2)
  assert short.truncated == 2 and (short.tokens[:2, n0 - 3] != eos).all() and short.mask[:2].all()
  assert (short.tokens[:2, :n0 - 2] == enc.tokens[:2, :n0 - 2]).all()  # the same response, cut
  long_prompt = [{"prompt": "How do I make this at home? " * 20, "response": "ok", "label": "safe"}]
  enc = encode_file(bpe_tokenizer, str(_write_jsonl(d / "long.jsonl", long_prompt)), max_len=16)
  assert enc.truncated == 1 and enc.tokens[0, 15] == eos and enc.token_labels[0, 15] == 0
  # another stop token on request; an id the tokenizer does not have is an error that says what to set
  enc = encode_file(bpe_tokenizer, str(d / "stop.jsonl"), max_len=64, stop_token_id=2)
  assert enc.tokens[2, int(enc.mask[2].sum()) - 1] == 2
  with pytest.raises(CotsafeError, match=r"stop token id 9999 .* expected a token id in \[0, \d+\).*set stop_token_id"):
    encode_file(bpe_tokenizer, str(d / "stop.jsonl"), max_len=64, stop_token_id=9999)


def test_rows_labels_and_bad_rows(span_files, bpe_tokenizer):
  d = span_files["dir"]
  good = {"prompt": "p", "response": "abcdef", "unsafe_spans": [[0, 2]]}
  rows = [good, {"prompt": "p", "response": "abcdef", "label": "unsafe"},
          {"prompt": "p", "response": "abcdef", "label": "safe"}]
  enc = encode_file(bpe_tokenizer, str(_write_jsonl(d / "ok.jsonl", rows)), max_len=32)
  assert enc.has_token_labels.tolist() == [True, False, True] and enc.seq_labels.tolist() == [1, 1, 0]
  resp = enc.response_mask
  assert (enc.token_labels[1][resp[1]] == -1).all() and (enc.token_labels[2][resp[2]] == 0).all()
  want = spans_to_token_labels(bpe_tokenizer, "abcdef", [[0, 2]]).tolist() + [0]  # + the stop token, safe
  assert enc.token_labels[0][resp[0]].tolist() == want
  assert (enc.token_labels[~resp] == -1).all()  # prompt tokens carry no label
  cases = [  # messages come from data.load_spans: "file:line: what is wrong, expected what"
      ({"prompt": "p", "response": "abcdef", "unsafe_spans": [[2, 99]]}, "out of range"),
      ({"prompt": "p", "response": "abcdef", "unsafe_spans": [[4, 1]]}, "inverted"),
      ({"response": "abcdef", "label": "safe"}, "prompt"),
      ({"prompt": "p", "response": "abcdef"}, "unsafe_spans"),
      ({"prompt": "p", "response": "abcdef", "label": "toxic"}, "label"),
      ({"prompt": "p", "response": "abcdef", "unsafe_spans": [[0, 2]], "label": "safe"}, "safe"),
      ("{not json", "JSON"),
  ]
  for row, phrase in cases:
    path = _write_jsonl(d / "bad.jsonl", [good, row])
    with pytest.raises(CotsafeError) as e:
      encode_file(bpe_tokenizer, str(path), max_len=32)
    assert "bad.jsonl:2: " in str(e.value) and phrase in str(e.value), str(e.value)
  path = _write_jsonl(d / "bad.jsonl", [good, cases[0][0], cases[1][0], good])
  enc = encode_file(bpe_tokenizer, str(path), max_len=32, on_bad_row="skip")
  assert len(enc) == 2 and enc.skipped == 2
  with pytest.raises(CotsafeError, match="seq_pool='sum', expected one of max, mean"):
    train_safety_rm(backbone=str(d), train_path=str(path), eval_path=str(path), workdir=str(d / "w"), steps=1,
                    batch_size=1, learning_rate=1e-3, max_len=32, seq_pool="sum")


def test_train_safety_rm_skips_nonfinite_steps_and_stops(span_files, bpe_tokenizer, tmp_path, monkeypatch):
  """A NaN loss (here: injected) changes nothing and, twice in a row, stops the job with one line."""
  from cotsafe_jax.rewards import safety_rm_trainer
  real = safety_rm_trainer.rm_loss
  monkeypatch.setattr(safety_rm_trainer, "rm_loss",
                      lambda *a, **k: (lambda l, m: (l * jnp.nan, {**m, "loss": m["loss"] * jnp.nan}))(*real(*a, **k)))
  cfg = models.tiny_config("qwen2", vocab_size=len(bpe_tokenizer))
  with pytest.raises(CotsafeError, match=r"train_safety_rm: 2 steps in a row with non-finite losses"):
    train_safety_rm(backbone=cfg, tokenizer_dir=span_files["tok"], train_path=str(span_files["train"]),
                    eval_path=str(span_files["eval"]), workdir=str(tmp_path), steps=5, batch_size=8,
                    learning_rate=1e-3, max_len=96, max_nonfinite_steps=2)
  logged = [json.loads(l) for l in open(tmp_path / "nonfinite.jsonl")]
  assert [r["step"] for r in logged] == [1, 2] and logged[0]["row_ids"][0].startswith(str(span_files["train"]))
