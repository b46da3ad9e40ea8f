"""The grain batch pipeline: epochs, kind mixture per batch, exact resume from a saved position, host shards."""
import collections
import json

import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax.data import pipeline

MIX = {"harmful": 0.4, "benign": 0.2, "reasoning": 0.4}


def _rows(n_harmful=10, n_benign=7, n_reasoning=13):
  kinds = ["harmful"] * n_harmful + ["benign"] * n_benign + ["reasoning"] * n_reasoning
  return [{"id": f"r{i}", "kind": k, "prompt": f"p{i}"} for i, k in enumerate(kinds)]


def _ids(batch):
  return [r["id"] for r in batch]


def _make(rows, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return pipeline.make_pipeline(rows, **kwargs)


def _kind_counts_loop(mixture, batch_size):
  """Plain largest-remainder rounding, for parity."""
  total = sum(mixture.values())
  exact = [(k, batch_size * w / total) for k, w in mixture.items()]
  counts = {k: int(x) for k, x in exact}
  left = batch_size - sum(counts.values())
  for k, x in sorted(exact, key=lambda kx: -(kx[1] - int(kx[1])))[:left]:
    counts[k] += 1
  return counts


@pytest.mark.parametrize("batch_size", [5, 8, 10, 16, 33, 64])
def test_kind_counts_largest_remainder(batch_size):
  counts = pipeline.kind_counts(MIX, batch_size)
  assert counts == _kind_counts_loop(MIX, batch_size) and sum(counts.values()) == batch_size
  for k, w in MIX.items():
    assert abs(counts[k] - batch_size * w) < 1


def test_epochs_cover_every_row_once_and_reshuffle():
  rows = _rows(8, 8, 8)
  it = _make(rows, batch_size=6, seed=3, num_epochs=2)
  batches = list(it)
  assert len(batches) == 8 and all(len(b) == 6 for b in batches)
  first = [i for b in batches[:4] for i in _ids(b)]
  second = [i for b in batches[4:] for i in _ids(b)]
  assert sorted(first) == sorted(second) == sorted(r["id"] for r in rows)
  assert first != second and first != [r["id"] for r in rows]  # shuffled, and differently each epoch
  assert [_ids(b) for b in _make(rows, batch_size=6, seed=3, num_epochs=2)] == [_ids(b) for b in batches]
  assert [_ids(b) for b in _make(rows, batch_size=6, seed=4, num_epochs=2)] != [_ids(b) for b in batches]
  # rows are copies: a consumer may edit a batch without changing the source
  batches[0][0]["prompt"] = "edited"
  assert all(r["prompt"] != "edited" for r in rows)


def test_mixture_gives_exact_counts_per_batch_and_cycles_each_kind():
  rows = _rows(10, 7, 13)
  it = _make(rows, batch_size=10, seed=0, mixture=MIX)
  assert it.kind_counts == {"harmful": 4, "benign": 2, "reasoning": 4}
  batches = [next(it) for _ in range(35)]
  for b in batches:
    assert collections.Counter(r["kind"] for r in b) == it.kind_counts
  # each kind is its own shuffled epoch: 7 benign rows at 2 a batch -> every row once in 14 rows
  benign = [r["id"] for b in batches for r in b if r["kind"] == "benign"]
  for epoch in range(5):
    assert sorted(benign[7 * epoch:7 * epoch + 7]) == sorted(r["id"] for r in rows if r["kind"] == "benign")
  # a kind with proportion 0 is left out
  it = _make(rows, batch_size=4, seed=0, mixture={"harmful": 0.5, "benign": 0.0, "reasoning": 0.5})
  assert all(collections.Counter(r["kind"] for r in next(it)) == {"harmful": 2, "reasoning": 2} for _ in range(5))


@pytest.mark.parametrize("mixture", [None, MIX])
def test_resume_reproduces_the_next_batches(mixture):
  rows = _rows()
  it = _make(rows, batch_size=10, seed=5, mixture=mixture)
  for _ in range(7):  # past the first epoch of 30 rows
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  want = [_ids(next(it)) for _ in range(6)]
  fresh = _make(rows, batch_size=10, seed=5, mixture=mixture)
  assert _ids(next(fresh)) != want[0]
  fresh.set_state(state)
  assert [_ids(next(fresh)) for _ in range(6)] == want
  assert state["step"] == 7


def test_hosts_split_every_global_batch():
  rows = _rows()
  for mixture in (None, MIX):
    whole = _make(rows, batch_size=8, seed=2, mixture=mixture)
    hosts = [_make(rows, batch_size=8, seed=2, mixture=mixture, process_index=p, process_count=4)
             for p in range(4)]
    for _ in range(9):
      parts = [next(h) for h in hosts]
      assert all(len(p) == 2 for p in parts)
      assert [i for p in parts for i in _ids(p)] == _ids(next(whole))
    # every host saves the same position
    assert len({json.dumps(h.get_state()) for h in hosts}) == 1


def test_finite_stream_stops():
  it = _make(_rows(3, 3, 3), batch_size=4, seed=0, num_epochs=3)
  assert len(list(it)) == 6  # 27 rows, whole batches only
  with pytest.raises(StopIteration):
    next(it)


def test_jax_process_defaults():
  it = pipeline.make_pipeline(_rows(), batch_size=4, seed=0)
  assert len(next(it)) == 4  # one process in tests: the whole batch


def _error(fn, *args, **kwargs):
  with pytest.raises(CotsafeError) as e:
    fn(*args, **kwargs)
  return str(e.value).removeprefix("cotsafe_jax: ")


def test_errors():
  rows = _rows()
  assert _error(_make, [], batch_size=4, seed=0) == "make_pipeline: no rows, expected at least one"
  assert _error(_make, rows, batch_size=6, seed=0, process_count=4) == (
      "make_pipeline: batch_size=6 over 4 processes, expected a positive multiple of the process count")
  assert _error(_make, rows, batch_size=4, seed=0, process_index=4, process_count=4) == (
      "make_pipeline: process_index=4, expected 0 <= it < 4")
  assert _error(_make, rows, batch_size=4, seed=-1) == "make_pipeline: seed=-1, expected seed >= 0"
  assert _error(_make, rows, batch_size=10, seed=0, mixture=MIX, num_epochs=2) == (
      "make_pipeline: num_epochs=2, expected None or >= 1, and None with a mixture or source weights (mixed streams "
      "are endless: set a number of steps)")
  assert _error(_make, rows, batch_size=10, seed=0, mixture={"harmful": 1, "benign": 1}) == (
      "make_pipeline: rows of kind reasoning have no mixture proportion, expected one for every kind in the "
      "rows (0 leaves a kind out)")
  assert _error(_make, _rows(5, 0, 5), batch_size=10, seed=0, mixture=MIX) == (
      "make_pipeline: mixture gives kind 'benign' proportion 0.2, but no row has that kind")
  assert _error(_make, rows, batch_size=10, seed=0, mixture={**MIX, "chat": 0.1}) == (
      "mixture kind 'chat', expected one of harmful|benign|reasoning")
  assert _error(_make, rows, batch_size=10, seed=0, mixture={**MIX, "benign": -0.2}) == (
      "mixture {'harmful': 0.4, 'benign': -0.2, 'reasoning': 0.4}, expected non-negative proportions with a "
      "positive sum")
  assert _error(_make, rows, batch_size=2, seed=0, mixture=MIX) == (
      "mixture {'harmful': 0.4, 'benign': 0.2, 'reasoning': 0.4} gives kind 'benign' no row in a batch of 2, "
      "expected a batch size large enough for every kind with a positive proportion")
  it = _make(rows, batch_size=10, seed=0, mixture=MIX)
  other = _make(rows, batch_size=10, seed=1, mixture=MIX)
  assert _error(it.set_state, other.get_state()) == (
      f"data position was saved by a different pipeline (fingerprint {other.fingerprint}, this one "
      f"{it.fingerprint}), expected the same rows, seed, batch_size, mixture, weights and num_epochs")
  assert _error(it.set_state, {"step": -1}) == (
      "data position {'step': -1}, expected {'step': int >= 0, 'fingerprint': str}")


def test_position_saved_on_one_host_resumes_on_four():
  rows = _rows()
  one = _make(rows, batch_size=8, seed=9, mixture=MIX)
  for _ in range(5):
    next(one)
  state = one.get_state()
  want = _ids(next(one))
  hosts = [_make(rows, batch_size=8, seed=9, mixture=MIX, process_index=p, process_count=4) for p in range(4)]
  for h in hosts:
    h.set_state(state)
  assert [i for h in hosts for i in _ids(next(h))] == want
