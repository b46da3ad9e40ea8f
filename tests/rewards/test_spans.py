"""Span -> token labels through the offset mapping, checked against a byte-level reference built from the
token strings themselves (not from the offset mapping)."""
import random

import numpy as np
import pytest

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.rewards import normalize_spans, spans_to_token_labels

from tests.rewards import rewards_testlib

TEXT = "<think>\nmix café 日本語 with bleach 😀 — naïve “plan”.\n</think>\n\nThe answer is 42 ünïcode."


def _reference_labels(tok, text, spans):
  """Token t is unsafe iff its bytes overlap a span's bytes; bytes come from the byte-level token strings."""
  inv = {c: b for b, c in rewards_testlib.bytes_to_unicode().items()}
  added = set(tok.get_added_vocab())
  ids = tok(text, add_special_tokens=False)["input_ids"]
  token_bytes = [t.encode() if t in added else bytes(inv[c] for c in t) for t in tok.convert_ids_to_tokens(ids)]
  assert b"".join(token_bytes) == text.encode()
  char_byte = np.cumsum([0] + [len(c.encode()) for c in text])  # byte offset of each char boundary
  starts = np.cumsum([0] + [len(b) for b in token_bytes])
  out = np.zeros(len(ids), np.int32)
  for s, e in spans:
    bs, be = char_byte[s], char_byte[e]
    for t in range(len(ids)):
      if starts[t] < be and bs < starts[t + 1]:
        out[t] = 1
  return out


def test_labels_match_byte_reference_on_random_spans(bpe_tokenizer):
  rng = random.Random(0)
  for _ in range(200):
    n = rng.randint(1, 3)
    spans = []
    for _ in range(n):
      s = rng.randrange(len(TEXT))
      spans.append([s, rng.randint(s + 1, len(TEXT))])
    got = spans_to_token_labels(bpe_tokenizer, TEXT, spans)
    np.testing.assert_array_equal(got, _reference_labels(bpe_tokenizer, TEXT, spans), err_msg=str(spans))


def test_span_inside_a_token_and_multibyte_characters(bpe_tokenizer):
  tok = bpe_tokenizer
  enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
  offsets = enc["offset_mapping"]
  # a span that starts and ends strictly inside one multi-character token marks exactly that token
  t = next(i for i, (s, e) in enumerate(offsets) if e - s >= 3 and TEXT[s:e].isascii())
  s, e = offsets[t]
  labels = spans_to_token_labels(tok, TEXT, [[s + 1, e - 1]])
  assert labels.tolist() == [int(i == t) for i in range(len(offsets))]
  # a span of one CJK character (3 bytes) marks every token holding one of its bytes, and only those
  j = TEXT.index("本")
  labels = spans_to_token_labels(tok, TEXT, [[j, j + 1]])
  expected = _reference_labels(tok, TEXT, [[j, j + 1]])
  np.testing.assert_array_equal(labels, expected)
  assert expected.sum() >= 1
  holders = [i for i, (a, b) in enumerate(offsets) if a <= j < b]
  assert sorted(np.nonzero(labels)[0].tolist()) == holders
  # the emoji (4 bytes) is split by the byte-level BPE: all its pieces are marked
  k = TEXT.index("😀")
  labels = spans_to_token_labels(tok, TEXT, [[k, k + 1]])
  assert labels.sum() == len([1 for a, b in offsets if a <= k < b]) >= 2


def test_overlapping_spans_are_merged(bpe_tokenizer):
  assert normalize_spans([[10, 20], [15, 30], [40, 41], [0, 3], [3, 5]], length=50) == [(0, 5), (10, 30), (40, 41)]
  a = spans_to_token_labels(bpe_tokenizer, TEXT, [[10, 20], [15, 30]])
  b = spans_to_token_labels(bpe_tokenizer, TEXT, [[10, 30]])
  np.testing.assert_array_equal(a, b)
  assert spans_to_token_labels(bpe_tokenizer, TEXT, []).sum() == 0


@pytest.mark.parametrize("spans,message", [
    ([[5, 999]], "row 7: unsafe_spans[0] = [5, 999] is out of range, expected 0 <= start < end <= 86"),
    ([[0, 4], [-1, 3]], "row 7: unsafe_spans[1] = [-1, 3] is out of range"),
    ([[10, 4]], "row 7: unsafe_spans[0] = [10, 4] is inverted, expected start < end"),
    ([[4, 4]], "row 7: unsafe_spans[0] = [4, 4] is out of range"),
    ([[1.5, 4]], "row 7: unsafe_spans[0] = [1.5, 4], expected [start, end) integer character offsets"),
    ([3, 4], "row 7: unsafe_spans[0] = 3, expected [start, end)"),
    ("0-4", "row 7: unsafe_spans is str, expected a list"),
])
def test_bad_spans_name_the_row(bpe_tokenizer, spans, message):
  assert len(TEXT) == 86
  with pytest.raises(CotsafeError) as e:
    spans_to_token_labels(bpe_tokenizer, TEXT, spans, where="row 7")
  assert message in str(e.value)
