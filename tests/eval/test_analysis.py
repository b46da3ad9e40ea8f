"""Reasoning-token analysis on the shipped tokenizer: which tokens are reasoning, their entropies, reflections."""
import os

import numpy as np
import pytest

from cotsafe_jax import CotsafeError, models
from cotsafe_jax import eval as ev
from cotsafe_jax.eval import analysis

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")
BODIES = [  # completions after the template's "<think>\n"; each gets the stop token
    "start with 4. 4 + 3 = 8. wait, let me check. 4 + 3 = 7.\n</think>\n\nwait, the answer is 7.",
    "the user wants zint gas. hmm, let me check. i will not give any steps.\n</think>\n\ni will not explain that.",
    "ok, to make zint gas: first, mix 3 parts",  # cut off: no close tag, no stop token
    "\n</think>\n\nkeep it closed.",
]


@pytest.fixture(scope="module")
def tok():
  return models.load_tokenizer(os.path.join(DATA, "tiny_tokenizer"))


def _batch(tok, t=48):
  ids = [tok(b, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if "</think>" in b else [])
         for b in BODIES]
  tokens = np.full((len(ids), t), tok.pad_token_id, np.int32)
  mask = np.zeros((len(ids), t), bool)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, True
  return ids, tokens, mask


def test_reasoning_lengths_by_id_and_by_text_match_a_plain_loop(tok):
  ids, tokens, mask = _batch(tok)
  close = tok.convert_tokens_to_ids("</think>")
  want = [x.index(close) if close in x else len(x) for x in ids]  # none of the cut rows ends in a stop token
  assert want == [ids[0].index(close), ids[1].index(close), len(ids[2]), 1]
  got = ev.reasoning_lengths(tok, tokens, mask, stop_ids=[tok.eos_token_id])
  assert got.tolist() == want
  pieces = analysis.token_pieces(tok)
  assert "".join(pieces(ids[1])) == tok.decode(ids[1], skip_special_tokens=True)  # eos dropped, tags kept
  assert [analysis._reasoning_length_by_text(pieces(x), "</think>") for x in ids] == want
  # a tag spelled in several tokens goes by text: " let me" starts at its " let" token
  let, me = tok.convert_tokens_to_ids(["Ġlet", "Ġme"])
  first = [next((j for j in range(len(x) - 1) if (x[j], x[j + 1]) == (let, me)), None) for x in ids]
  no_stop = [len(x) - (x[-1] == tok.eos_token_id) for x in ids]
  assert ev.reasoning_lengths(tok, tokens, mask, stop_ids=[tok.eos_token_id], close_tag="let me").tolist() == [
      f if f is not None else n for f, n in zip(first, no_stop)]
  # a stop token is never reasoning, even with no close tag before it
  stopped = tokens.copy()
  stopped[2, len(ids[2])] = tok.eos_token_id
  mask2 = mask.copy()
  mask2[2, len(ids[2])] = True
  assert ev.reasoning_lengths(tok, stopped, mask2, stop_ids=[tok.eos_token_id])[2] == len(ids[2])


def test_reasoning_entropies_and_reflection_dynamics(tok):
  ids, tokens, mask = _batch(tok)
  lengths = ev.reasoning_lengths(tok, tokens, mask, stop_ids=[tok.eos_token_id])
  ent = np.random.default_rng(0).uniform(0, 4, tokens.shape).astype(np.float32)
  flat = ev.reasoning_entropies(ent, lengths)
  assert flat.tolist() == [float(ent[i, j]) for i in range(len(ids)) for j in range(lengths[i])]
  # reflection phrases start at "wait"/"hmm" tokens; the "wait" in row 0's answer is not reasoning
  starts = {tok.convert_tokens_to_ids(t) for t in ("Ġwait", "Ġhmm", "wait", "hmm")}
  at = [(i, j) for i in range(len(ids)) for j in range(lengths[i]) if tokens[i, j] in starts]
  assert len(at) == 2
  rest = [float(ent[i, j]) for i in range(len(ids)) for j in range(lengths[i]) if (i, j) not in at]
  got = ev.reflection_dynamics(tok, tokens, ent, lengths)
  assert got["reflection_tokens"] == 2 and got["reflections_per_response"] == 2 / 4
  assert got["entropy_at_reflection"] == pytest.approx(np.mean([ent[i, j] for i, j in at]), rel=1e-6)
  assert got["entropy_elsewhere"] == pytest.approx(np.mean(rest), rel=1e-6)


def test_text_helpers():
  assert ev.count_reflections("Wait, let me double-check. Hmm. On second thought, alternatively x.") == 4
  assert ev.count_reflections("await the waiter") == 0
  assert ev.is_correct("The final answer is $\\frac{3}{4}$.", "0.75") and ev.is_correct("12", "12.0")
  assert not ev.is_correct("", "1")


def test_completion_mask_must_be_a_prefix(tok):
  _, tokens, mask = _batch(tok)
  mask[0, 0] = False
  with pytest.raises(CotsafeError, match="completion mask is not a prefix of each row"):
    ev.reasoning_lengths(tok, tokens, mask)
