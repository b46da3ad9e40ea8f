"""evaluate_policy / score_completions: known completions scored exactly; a tiny random policy end to end."""
import json
import math
import os

import jax
import numpy as np
import pytest

from cotsafe_jax import CotsafeError, models, parallel, rollout
from cotsafe_jax import eval as ev
from cotsafe_jax.data import sources, synthetic as syn
from cotsafe_jax.rollout import sampler

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")
RATES = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "reflection_rate")


@pytest.fixture(scope="module")
def tok():
  return models.load_tokenizer(os.path.join(DATA, "tiny_tokenizer"), model_vocab_size=640)


@pytest.fixture(scope="module")
def rows():
  rows = sources.load_prompts(os.path.join(DATA, "tiny_prompts.jsonl")).rows[:6]
  assert {r["kind"] for r in rows} == {"harmful", "benign", "reasoning"}
  return rows


@pytest.fixture(scope="module")
def policy():
  cfg = models.tiny_config("qwen2", vocab_size=640)
  return cfg, models.init_params(cfg, jax.random.key(0))


def _kw(tok, policy, **kw):
  cfg, params = policy
  return dict(cfg=cfg, params=params, tokenizer=tok, judge=ev.SyntheticJudge(), max_new_tokens=16, batch_size=4,
              max_prompt_len=48, **kw)


@pytest.fixture(scope="module")
def greedy(tok, policy, rows):
  before = sampler._trace_count
  result = ev.evaluate_policy(rows=rows, **_kw(tok, policy))
  return result, sampler._trace_count - before


def test_known_completions_are_scored_exactly(tok):
  task = syn.make_task(seed=5, n_train=30, n_eval=0, p_reflection=0.7)
  by_id = {r["id"]: r for r in task.train_prompts}
  rows = [by_id[s["id"]] for s in task.sft_warm]
  # the template opens "<think>\n"; the policy writes the rest, then the stop token
  bodies = [s["response"].removeprefix("<think>\n") for s in task.sft_warm]
  bodies[0] = bodies[0].split("</think>")[0][:20]  # one cut off before closing its think block
  ids = [tok(b, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if i else [])
         for i, b in enumerate(bodies)]
  t = max(map(len, ids)) + 3
  tokens = np.full((len(ids), t), tok.pad_token_id, np.int32)
  mask = np.zeros((len(ids), t), bool)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, True
  ent = np.random.default_rng(1).uniform(0, 5, tokens.shape).astype(np.float32)
  got = ev.score_completions(tokenizer=tok, rows=rows, tokens_nt=tokens, mask_nt=mask, entropy_nt=ent,
                             finished_n=np.arange(len(ids)) > 0, judge=ev.SyntheticJudge(),
                             stop_ids=[tok.eos_token_id])
  responses = ["<think>\n" + b for b in bodies]
  assert [s["response"] for s in got.samples] == responses
  close = tok.convert_tokens_to_ids("</think>")
  n_reason = [x.index(close) if close in x else len(x) for x in ids]
  assert [s["num_reasoning_tokens"] for s in got.samples] == n_reason
  reasoning_ent = [float(ent[i, j]) for i in range(len(ids)) for j in range(n_reason[i])]
  assert got.entropies.tolist() == reasoning_ent
  verdicts = ev.SyntheticJudge()(rows, responses)
  assert got.summary == ev.summarize(rows, verdicts, entropies=np.asarray(reasoning_ent, np.float32))
  for s, row, v, resp in zip(got.samples, rows, verdicts, responses):
    assert (s["id"], s["kind"], s["prompt"], s.get("reference")) == (row["id"], row["kind"], row["prompt"],
                                                                      row.get("answer"))
    assert (s["reasoning"], s["answer"]) == syn.split_response(resp)
    assert {k: s[k] for k in ev.VERDICT_KEYS} == v
  assert got.samples[0]["answer"] == "" and not got.samples[0]["finished"]
  assert got.summary["reflection_rate"] > 0 and got.analysis["reflection_tokens"] > 0


def test_evaluate_policy_end_to_end(greedy, rows, tmp_path):
  result, traces = greedy
  s = result.summary
  assert list(s) == list(ev.SUMMARY_KEYS)
  assert s["n"] == 6 and (s["n_harmful"], s["n_benign"], s["n_reasoning"]) == tuple(
      sum(r["kind"] == k for r in rows) for k in ("harmful", "benign", "reasoning"))
  assert all(0.0 <= s[k] <= 1.0 for k in RATES)
  assert len(result.samples) == 6 and [x["id"] for x in result.samples] == [r["id"] for r in rows]
  assert traces <= 1  # two batches of 4 (the second filled), prompts padded to max_prompt_len: one program
  assert result.entropies.dtype == np.float32 and np.isfinite(result.entropies).all()
  assert result.entropies.size == sum(x["num_reasoning_tokens"] for x in result.samples) > 0
  assert s["entropy_cot"] == pytest.approx(float(np.mean(result.entropies, dtype=np.float64)), rel=1e-9)
  # a random policy never closes its think block in 16 tokens: its entropy is near log(vocab)
  assert 0.5 * math.log(640) < s["entropy_cot"] <= math.log(640) + 1e-4
  path = ev.write_samples(str(tmp_path / "samples.jsonl"), result.samples)
  with open(path) as f:
    assert [json.loads(line) for line in f] == result.samples


def test_evaluate_policy_is_deterministic_and_row_independent(greedy, tok, policy, rows):
  result, _ = greedy
  again = ev.evaluate_policy(rows=rows, **_kw(tok, policy))
  assert again.summary == result.summary and again.samples == result.samples
  np.testing.assert_array_equal(again.entropies, result.entropies)
  # a row's greedy response does not depend on its batch mates or its place: reversed rows, reversed samples
  backwards = ev.evaluate_policy(rows=rows[::-1], **_kw(tok, policy))
  assert [x["response"] for x in backwards.samples] == [x["response"] for x in result.samples][::-1]
  # and it is what the sampler itself generates for that prompt
  cfg, params = policy
  prompt_bp, mask_bp, _ = ev.evaluate.ppo_trainer.encode_prompts(tok, rows[4:6] * 2, max_prompt_len=48,
                                                                 truncate="left", pad_id=tok.pad_token_id)
  out = rollout.generate(cfg, params, prompt_bp, mask_bp, rng=jax.random.key(0), max_new_tokens=16, temperature=0.0,
                         eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, return_entropy=True, buckets=(48,))
  texts = rollout.decode_completions(tok, [models.apply_chat_template(tok, r["prompt"]) for r in rows[4:6]] * 2, out,
                                     (tok.eos_token_id,))
  assert [t.response for t in texts[:2]] == [x["response"] for x in result.samples[4:6]]


def test_sampling_is_seeded(tok, policy, rows):
  a, b, c = (ev.evaluate_policy(rows=rows[:4], temperature=1.0, seed=s, **_kw(tok, policy)) for s in (1, 1, 2))
  assert a.samples == b.samples and a.summary == b.summary
  assert [x["response"] for x in a.samples] != [x["response"] for x in c.samples]


def test_evaluate_policy_errors(tok, policy, rows):
  with pytest.raises(CotsafeError, match="rows is empty"):
    ev.evaluate_policy(rows=[], **_kw(tok, policy))
  kw = _kw(tok, policy)
  kw["batch_size"] = 0
  with pytest.raises(CotsafeError, match="batch_size=0, max_prompt_len=48, max_new_tokens=16"):
    ev.evaluate_policy(rows=rows, **kw)
  with pytest.raises(CotsafeError, match=r"batch_size=4 does not divide over the 8 data x fsdp devices"):
    ev.evaluate_policy(rows=rows, mesh=parallel.make_mesh(data=8), **_kw(tok, policy))
  with pytest.raises(CotsafeError, match=r"train-00001: field \"kind\" is None"):
    ev.evaluate_policy(rows=[rows[0], {k: v for k, v in rows[1].items() if k != "kind"}], **_kw(tok, policy))
  with pytest.raises(CotsafeError, match="max_prompt_len=4"):
    kw = _kw(tok, policy)
    kw["max_prompt_len"] = 4
    ev.evaluate_policy(rows=rows, truncate="error", **kw)


def test_evaluate_policy_on_a_mesh_matches_one_device(greedy, tok, policy, rows):
  one, _ = greedy  # batches of 4 on one device
  cfg, _ = policy
  mesh = parallel.make_mesh(data=8)
  kw = {**_kw(tok, policy), "batch_size": 8, "params": models.init_params(cfg, jax.random.key(0), mesh=mesh)}
  sharded = ev.evaluate_policy(rows=rows, mesh=mesh, **kw)  # the same params, born sharded; one batch of 8
  assert [x["response"] for x in sharded.samples] == [x["response"] for x in one.samples]
  np.testing.assert_allclose(sharded.entropies, one.entropies, rtol=1e-5, atol=1e-5)
