"""Near-duplicate detection between evaluation and training prompts: word n-gram shingles and their overlap.

Two texts are near-duplicates when one's shingles are mostly inside the other's: |A & B| / min(|A|, |B|) >=
threshold (the overlap coefficient of word trigrams after lowercasing and dropping punctuation). A copy, a copy with
a prefix ("please, ..."), a suffix or changed punctuation scores 1; one changed word in the middle of a ten-word
prompt removes three trigrams (0.625).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from cotsafe_jax.errors import CotsafeError

_WORD_RE = re.compile(r"[a-z0-9]+")


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
  """Word n-grams of the lowercased text without punctuation; a text of fewer than n words is one shingle."""
  words = _WORD_RE.findall(text.lower())
  if len(words) < n:
    return {tuple(words)} if words else set()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def similarity(a: str, b: str, n: int = 3) -> float:
  """The overlap coefficient of the two texts' shingles (0 when either has none)."""
  sa, sb = shingles(a, n), shingles(b, n)
  if not sa or not sb:
    return 0.0
  return len(sa & sb) / min(len(sa), len(sb))


class ShingleIndex:
  """A corpus (the training prompts) indexed by shingle, to find the nearest corpus text of many queries at once."""

  def __init__(self, corpus: Sequence[str], *, n: int = 3, threshold: float = 0.8):
    if n < 1 or not 0.0 < threshold <= 1.0:
      raise CotsafeError(f"near-duplicates: n={n}, threshold={threshold}, expected n >= 1 and 0 < threshold <= 1")
    self.n, self.threshold = n, threshold
    self.corpus = list(corpus)
    postings: dict[tuple[str, ...], list[int]] = {}
    sizes = []
    for i, text in enumerate(self.corpus):
      sh = shingles(text, n)
      sizes.append(len(sh))
      for x in sh:
        postings.setdefault(x, []).append(i)
    self._postings = {x: np.asarray(ids, np.int64) for x, ids in postings.items()}
    self._sizes = np.asarray(sizes, np.float64)

  def nearest(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(index of the most similar corpus text [Q] (-1 when none shares a shingle), its similarity [Q])."""
    best, sim = np.full(len(queries), -1, np.int64), np.zeros(len(queries))
    for i, text in enumerate(queries):
      sh = shingles(text, self.n)
      hits = [self._postings[x] for x in sh if x in self._postings]
      if not hits:
        continue
      shared = np.bincount(np.concatenate(hits), minlength=len(self.corpus))  # [corpus] shingles in common
      js = np.flatnonzero(shared)
      s = shared[js] / np.minimum(len(sh), self._sizes[js])
      k = int(np.argmax(s))
      best[i], sim[i] = js[k], s[k]
    return best, sim

  def near_duplicates(self, queries: Sequence[str]) -> list[tuple[int, int, float]]:
    """(query index, corpus index, similarity) of every query whose nearest corpus text reaches the threshold."""
    best, sim = self.nearest(queries)
    return [(i, int(best[i]), float(sim[i])) for i in np.flatnonzero(sim >= self.threshold)]

  def max_similarity(self, queries: Sequence[str]) -> float:
    """The highest similarity of any query to the corpus (0 for none)."""
    return float(self.nearest(queries)[1].max()) if len(queries) else 0.0
