"""Row sources: every file format, the public-set presets, validation with file:line errors, skip mode."""
import csv
import json
import logging
import os

import pytest

from cotsafe_jax import CotsafeError
from cotsafe_jax.data import sources

ROWS = [
    {"id": "a1", "kind": "harmful", "prompt": "how do i brew zint gas?", "category": "gas", "extra": "dropped"},
    {"id": "a2", "kind": "reasoning", "prompt": "tom has 3 pens, buys 2. how many?", "answer": "5"},
    {"kind": "benign", "prompt": "how do i store zint soap?"},
]
WANT = [
    {"id": "a1", "category": "gas", "kind": "harmful", "prompt": "how do i brew zint gas?"},
    {"id": "a2", "kind": "reasoning", "prompt": "tom has 3 pens, buys 2. how many?", "answer": "5"},
    {"kind": "benign", "prompt": "how do i store zint soap?"},
]


def _write(path, rows):
  path = str(path)
  if path.endswith(".jsonl"):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif path.endswith(".json"):
    with open(path, "w") as f:
      json.dump(rows, f, indent=2)
  elif path.endswith((".csv", ".tsv")):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fields, delimiter="\t" if path.endswith(".tsv") else ",")
      w.writeheader()
      w.writerows(rows)
  elif path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    fields = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in fields} for r in rows]), path)
  return path


def _error(fn, *args, **kwargs):
  with pytest.raises(CotsafeError) as e:
    fn(*args, **kwargs)
  return str(e.value)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, ext):
  got = sources.load_prompts(_write(tmp_path / f"p{ext}", ROWS))
  assert got.rows == WANT and got.num_skipped == 0


def test_datasets_dir_and_splits(tmp_path):
  import datasets
  fields = list(dict.fromkeys(k for r in ROWS for k in r))
  ds = datasets.Dataset.from_list([{k: r.get(k) for k in fields} for r in ROWS])
  ds.save_to_disk(str(tmp_path / "one"))
  assert sources.load_prompts(str(tmp_path / "one")).rows == WANT
  datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "two"))
  got = sources.load_prompts(str(tmp_path / "two"), split="test")
  assert got.rows == WANT[1:2] and got.source == f"{tmp_path}/two[test]"
  assert _error(sources.load_prompts, str(tmp_path / "two")) == (
      f"cotsafe_jax: {tmp_path}/two: split None not found, expected one of ['test', 'train']")


_TFDS_BUILDER = """
import sys
import tensorflow_datasets as tfds

class CotsafeTinyPrompts(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "question": tfds.features.Text(), "answer": tfds.features.Text(), "unique_id": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"question": f"what is {i} + {i}?", "answer": f"work #### {2 * i}", "unique_id": f"q{i}"}

CotsafeTinyPrompts(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
"""


def test_tfds_prepared_dataset_without_tensorflow(tmp_path):
  # prepared in another process, as a user's data_dir would be: here the builder class is not registered
  import subprocess
  import sys
  (tmp_path / "build.py").write_text(_TFDS_BUILDER)
  subprocess.run([sys.executable, str(tmp_path / "build.py"), str(tmp_path)], check=True, capture_output=True)
  got = sources.load_prompts("tfds:cotsafe_tiny_prompts", data_dir=str(tmp_path), split="test", columns="gsm8k")
  assert sorted(got.rows, key=lambda r: r["prompt"]) == [
      {"kind": "reasoning", "prompt": f"what is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
  # a prepared version dir read directly, with a plain column map
  cols = {"question": "prompt", "unique_id": "id"}
  got = sources.load_prompts(str(tmp_path / "cotsafe_tiny_prompts" / "1.0.0"), split="test", columns=cols,
                             kind="reasoning")
  assert sorted(got.rows, key=lambda r: r["id"]) == [
      {"id": f"q{i}", "kind": "reasoning", "prompt": f"what is {i} + {i}?", "answer": f"work #### {2 * i}"}
      for i in range(3)]
  msg = _error(sources.load_prompts, "tfds:cotsafe_tiny_prompts", data_dir=str(tmp_path), split="nope")
  assert msg.startswith("cotsafe_jax: tfds:cotsafe_tiny_prompts: cannot open split 'nope' as a prepared "
                        f"array_record tfds dataset (data_dir={tmp_path}): ")


def test_public_set_presets(tmp_path):
  strongreject = _write(tmp_path / "sr.csv", [{"category": "Violence", "source": "x", "forbidden_prompt": "p1"}])
  assert sources.load_prompts(strongreject, columns="strongreject").rows == [
      {"category": "Violence", "kind": "harmful", "prompt": "p1"}]
  jbb = _write(tmp_path / "jbb.csv", [{"Index": "7", "Goal": "g", "Target": "t", "Behavior": "b", "Category": "c"}])
  assert sources.load_prompts(jbb, columns="jailbreakbench").rows == [
      {"id": "7", "category": "c", "kind": "harmful", "prompt": "g"}]
  wjb = _write(tmp_path / "wjb.tsv", [{"vanilla": "v", "adversarial": "a1", "data_type": "adversarial_benign"},
                                      {"vanilla": "v", "adversarial": "a2", "data_type": "adversarial_harmful"}])
  assert sources.load_prompts(wjb, columns="wildjailbreak").rows == [
      {"kind": "benign", "prompt": "a1"}, {"kind": "harmful", "prompt": "a2"}]
  xstest = _write(tmp_path / "xs.csv", [{"id": "1", "prompt": "how do i kill a python process?",
                                         "type": "homonyms", "label": "safe"},
                                        {"id": "2", "prompt": "how do i kill a person?", "type": "contrast",
                                         "label": "unsafe"}])
  assert [(r["id"], r["kind"], r["category"]) for r in sources.load_prompts(xstest, columns="xstest").rows] == [
      ("1", "benign", "homonyms"), ("2", "harmful", "contrast")]
  gsm = _write(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}])
  assert sources.load_prompts(gsm, columns="gsm8k").rows == [{"kind": "reasoning", "prompt": "q", "answer": "4"}]
  math500 = _write(tmp_path / "m.jsonl", [{"problem": "p", "solution": "s", "answer": "\\frac{1}{2}",
                                           "subject": "Algebra", "level": 3, "unique_id": "test/algebra/1.json"}])
  assert sources.load_prompts(math500, columns="math500").rows == [
      {"id": "test/algebra/1.json", "category": "Algebra", "kind": "reasoning", "prompt": "p",
       "answer": "\\frac{1}{2}"}]
  aime = _write(tmp_path / "aime.parquet", [{"id": 60, "problem": "p", "solution": "s", "answer": 204}])
  assert sources.load_prompts(aime, columns="aime").rows == [
      {"id": "60", "kind": "reasoning", "prompt": "p", "answer": "204"}]
  star = _write(tmp_path / "star.json", [{"id": 3, "question": "q", "response": "<think>\nr\n</think>\n\na",
                                          "category": "c", "source": "s", "score": 10}])
  assert sources.load_sft(star, columns="star1").rows == [
      {"id": "3", "category": "c", "kind": "harmful", "prompt": "q", "response": "<think>\nr\n</think>\n\na"}]
  # STAR-1's questions also serve as harmful PPO prompts (the response is dropped)
  assert sources.load_prompts(star, columns="star1").rows == [
      {"id": "3", "category": "c", "kind": "harmful", "prompt": "q"}]
  assert _error(sources.load_prompts, gsm, columns="beavertails") == (
      "cotsafe_jax: column preset 'beavertails' is for spans rows, not prompts rows")
  assert _error(sources.load_prompts, gsm, columns="gsm9k") == (
      "cotsafe_jax: unknown column preset 'gsm9k', expected one of aime, beavertails, gpqa, gsm8k, harmbench, "
      "jailbreakbench, jailbreakbench_benign, math500, pku_saferlhf, safechain, sorrybench, star1, star41k, "
      "strongreject, wildjailbreak, xstest")
  # AIME 2024 / 2025 files spell their fields capitalised
  aime24 = _write(tmp_path / "aime24.jsonl", [{"ID": "2024-I-1", "Problem": "p", "Solution": "s", "Answer": 204}])
  assert sources.load_prompts(aime24, columns="aime").rows == [
      {"id": "2024-I-1", "kind": "reasoning", "prompt": "p", "answer": "204"}]


GPQA_HEADER = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
               "Record ID", "High-level domain", "Subdomain"]


def _gpqa(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(GPQA_HEADER)
    w.writerows(rows)
  return str(path)


def test_gpqa_preset_letters_the_shuffled_options():
  rows = [[f"Question {i}?", f" right {i} ", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c", f"rec{i}", "Physics", "x"]
          for i in range(12)]
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    got = sources.load_prompts(_gpqa(os.path.join(d, "gpqa.csv"), rows), columns="gpqa").rows
    again = sources.load_prompts(_gpqa(os.path.join(d, "rev.csv"), rows[::-1]), columns="gpqa").rows
  assert again[::-1] == got  # the order of options depends on the question only, not on the file order
  letters = set()
  for i, r in enumerate(got):
    assert set(r) == {"id", "category", "kind", "prompt", "answer", "grader"}
    assert (r["id"], r["category"], r["kind"], r["grader"]) == (f"rec{i}", "Physics", "reasoning", "choice")
    question, options = r["prompt"].split("\n\n")
    assert question == f"Question {i}?"
    lines = options.split("\n")
    assert [ln[:3] for ln in lines] == ["A) ", "B) ", "C) ", "D) "]
    by_letter = {ln[0]: ln[3:] for ln in lines}
    assert by_letter[r["answer"]] == f"right {i}"  # stripped
    assert sorted(by_letter.values()) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
    letters.add(r["answer"])
  assert len(letters) >= 3  # shuffled: the correct option is not always first


def test_gpqa_preset_errors(tmp_path):
  path = _gpqa(tmp_path / "g.csv", [["Q?", "right", "", "w2", "w3", "r", "Physics", "x"]])
  assert _error(sources.load_prompts, path, columns="gpqa") == (
      f'cotsafe_jax: {path}:2: option field "Incorrect Answer 1" missing or empty, expected the text of every option')
  bad = _write(tmp_path / "g.jsonl", [{"kind": "reasoning", "prompt": "x", "answer": "B", "grader": "essay"}])
  assert _error(sources.load_prompts, bad) == (
      f'cotsafe_jax: {bad}:1: field "grader" is "essay", expected math|choice')


def test_sources_load_into_one_list_tagged_by_source(tmp_path):
  sr = _write(tmp_path / "strongreject_dataset.csv",
              [{"category": "Violence", "source": "x", "forbidden_prompt": f"harm {i}"} for i in range(10)])
  gsm = _write(tmp_path / "gsm.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
  plain = _write(tmp_path / "mine.jsonl", [{"prompt": "p", "answer": "1"}])
  suite = [sources.Source(path=sr, preset="strongreject", max_rows=4, weight=2.0),
           sources.Source(path=gsm, preset="gsm8k", name="gsm8k_test"),
           sources.Source(path=plain, kind="reasoning", grader="choice")]
  got = sources.load_sources(suite, seed=3)
  assert [r["source"] for r in got.rows] == ["strongreject"] * 4 + ["gsm8k_test"] * 5 + ["mine"]
  harm = [r["prompt"] for r in got.rows[:4]]
  assert harm == sorted(harm, key=lambda p: int(p.split()[1]))  # a subset in file order
  assert sources.load_sources(suite, seed=3).rows == got.rows  # seeded
  assert [r["prompt"] for r in sources.load_sources(suite, seed=4).rows[:4]] != harm
  assert got.rows[4] == {"kind": "reasoning", "prompt": "q0", "answer": "0", "source": "gsm8k_test"}
  assert got.rows[-1] == {"kind": "reasoning", "prompt": "p", "answer": "1", "source": "mine", "grader": "choice"}
  assert got.stats["strongreject"] == {"rows": 4, "available": 10, "skipped": 0, "weight": 2.0, "path": sr}
  assert got.weights == {"strongreject": 2.0, "gsm8k_test": 1.0, "mine": 1.0}
  # the same type serves a training mixture of SFT rows
  star = _write(tmp_path / "star.json", [{"id": 3, "question": "q", "response": "r"}])
  sft = sources.load_sources([sources.Source(path=star, preset="star1", schema="sft")])
  assert sft.rows == [{"id": "3", "kind": "harmful", "prompt": "q", "response": "r", "source": "star1"}]


def test_source_errors(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "kind": "benign"}])
  assert _error(sources.Source, path=None, name="aime") == (
      "cotsafe_jax: Source('aime'): path=None, expected a local file, dataset dir or tfds:NAME")
  assert _error(sources.Source, path=path, preset="gsm8k", columns={"a": "prompt"}) == (
      "cotsafe_jax: Source('gsm8k'): both preset='gsm8k' and columns are set, expected one of them")
  assert "unknown preset 'gsm9k', expected one of aime, beavertails, gpqa" in _error(sources.Source, path=path,
                                                                                    preset="gsm9k")
  assert _error(sources.Source, path=path, kind="math") == (
      f"cotsafe_jax: Source({path!r}): kind='math', expected one of harmful|benign|reasoning")
  assert "max_rows=0, expected a positive int or None" in _error(sources.Source, path=path, max_rows=0)
  assert "weight=-1.0, expected a finite number >= 0 or None" in _error(sources.Source, path=path, weight=-1.0)
  assert "grader='essay', expected one of math|choice" in _error(sources.Source, path=path, grader="essay")
  assert _error(sources.load_sources, []) == "cotsafe_jax: load_sources: no sources, expected at least one Source"
  assert _error(sources.load_sources, [sources.Source(path=path), sources.Source(path=path)]) == (
      "cotsafe_jax: load_sources: source name 'p' is used twice, expected unique names (set Source.name)")
  assert "is not a Source" in _error(sources.load_sources, [path])


def test_prompt_row_errors_name_file_line_and_expectation(tmp_path):
  p = str(tmp_path / "p.jsonl")
  cases = [
      ('{"kind": "benign", "prompt": "ok"}\nnot json\n',
       'p.jsonl:2: invalid JSON (Expecting value at column 1), expected one JSON object per line'),
      ('\n{"kind": "benign"}\n', 'p.jsonl:2: field "prompt" missing, expected "prompt" or "messages"'),
      ('{"kind": "evil", "prompt": "x"}\n', 'p.jsonl:1: field "kind" is "evil", expected harmful|benign|reasoning'),
      ('{"prompt": "x"}\n', 'p.jsonl:1: field "kind" missing, expected harmful|benign|reasoning'),
      ('{"kind": "benign", "prompt": "  "}\n', 'p.jsonl:1: field "prompt" is empty, expected a non-empty string'),
      ('{"kind": "benign", "prompt": ["x"]}\n', 'p.jsonl:1: field "prompt" is a list, expected a string'),
      ('{"kind": "benign", "prompt": "x", "messages": []}\n',
       'p.jsonl:1: both "prompt" and "messages", expected one of them'),
      ('{"kind": "benign", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
       'p.jsonl:1: the last message is from "assistant", expected the last from "user"'),
      ('{"kind": "benign", "messages": [{"role": "robot", "content": "a"}]}\n',
       'p.jsonl:1: messages[0] is {"role": "robot", "content": "a"}, expected {role: system|user|assistant, '
       'content: string}'),
      ('[1, 2]\n', 'p.jsonl:1: row is a list, expected an object with named fields'),
      ('{"kind": "reasoning", "prompt": "x", "answer": NaN}\n',
       'p.jsonl:1: field "answer" is nan, expected a string or a finite number'),
  ]
  for text, message in cases:
    with open(p, "w") as f:
      f.write(text)
    assert _error(sources.load_prompts, p) == f"cotsafe_jax: {tmp_path}/{message}", text
  gsm = _write(tmp_path / "g.jsonl", [{"question": "q", "answer": "4"}])
  assert _error(sources.load_prompts, gsm, columns="gsm8k") == (
      f'cotsafe_jax: {gsm}:1: field "answer" has no "####", expected the final answer after "####"')
  xs = _write(tmp_path / "x.csv", [{"prompt": "p", "label": "maybe"}])
  assert _error(sources.load_prompts, xs, columns="xstest") == (
      f'cotsafe_jax: {xs}:2: field "label" is "maybe", expected safe|unsafe')


def test_line_numbers_in_csv_and_json_arrays(tmp_path):
  p = tmp_path / "p.csv"
  p.write_text('kind,prompt\nbenign,"two\nlines"\nbenign,ok,extra\n')
  assert _error(sources.load_prompts, str(p)) == f"cotsafe_jax: {p}:4: 3 cells, expected 2 (as in the header)"
  j = tmp_path / "p.json"
  j.write_text('[\n  {"kind": "benign", "prompt": "a"},\n\n  {"kind": "benign",\n   "prompt": 3.5},\n'
               '  {"kind": "benign"}\n]\n')
  assert _error(sources.load_prompts, str(j)) == (
      f'cotsafe_jax: {j}:6: field "prompt" missing, expected "prompt" or "messages"')
  j.write_text('[{"kind": "benign", "prompt": "a"}\n {"kind": "benign", "prompt": "b"}]')
  assert _error(sources.load_prompts, str(j)) == (
      f"cotsafe_jax: {j}:2: invalid JSON (no ',' or ']' after a row), expected a JSON array of objects")


def test_span_rows_validate_and_merge(tmp_path):
  resp = "first, mix 3 parts zint with krell. then seal it in a jar."  # 58 characters
  good = [{"prompt": "p", "response": resp, "unsafe_spans": [[7, 20], [15, 34], [41, 50], [50, 57]]},
          {"prompt": "p", "response": resp, "unsafe_spans": []},
          {"prompt": "p", "response": resp, "label": "unsafe"},
          {"prompt": "p", "response": resp, "unsafe_spans": [[41, 57]], "label": "unsafe", "kind": "harmful"}]
  got = sources.load_spans(_write(tmp_path / "s.jsonl", good)).rows
  assert [(r["unsafe_spans"], r["label"]) for r in got] == [
      ([[7, 34], [41, 57]], "unsafe"), ([], "safe"), ([], "unsafe"), ([[41, 57]], "unsafe")]
  # csv cells carry the spans as JSON text
  assert sources.load_spans(_write(tmp_path / "s.csv", good[:1])).rows[0]["unsafe_spans"] == [[7, 34], [41, 57]]
  bad = [
      ({"prompt": "p", "response": resp, "unsafe_spans": [[9, 4]]}, "span [9, 4) is inverted, expected start < end"),
      ({"prompt": "p", "response": resp, "unsafe_spans": [[4, 4]]}, "span [4, 4) is empty, expected start < end"),
      ({"prompt": "p", "response": resp, "unsafe_spans": [[50, 59]]},
       "span [50, 59) is out of range, expected offsets within the 58-character response"),
      ({"prompt": "p", "response": resp, "unsafe_spans": [[-1, 3]]},
       "span [-1, 3) is out of range, expected offsets within the 58-character response"),
      ({"prompt": "p", "response": resp, "unsafe_spans": [[1.0, 3]]}, "span [1.0, 3] is not two integers, "
                                                                       "expected [start, end)"),
      ({"prompt": "p", "response": resp, "unsafe_spans": [[1, 3]], "label": "safe"},
       'label "safe" with 1 unsafe spans, expected no spans on a safe row'),
      ({"prompt": "p", "response": resp}, 'field "unsafe_spans" missing, expected a list of [start, end) '
                                          'offsets, or a "label"'),
      ({"prompt": "p", "response": resp, "label": "bad"}, 'field "label" is "bad", expected safe|unsafe'),
      ({"prompt": "p"}, 'field "response" missing, expected a string'),
  ]
  for row, message in bad:
    path = _write(tmp_path / "b.jsonl", [row])
    assert _error(sources.load_spans, path) == f"cotsafe_jax: {path}:1: {message}"


def test_sft_rows(tmp_path):
  msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
  path = _write(tmp_path / "s.jsonl", [{"messages": msgs, "kind": "benign"}, {"prompt": "u", "response": "a"}])
  assert sources.load_sft(path).rows == [{"kind": "benign", "messages": msgs}, {"prompt": "u", "response": "a"}]
  for row, message in [({"prompt": "u"}, 'field "response" missing, expected "messages" or "prompt" + "response"'),
                       ({"messages": msgs[:2]}, 'the last message is from "user", expected the last from '
                                                '"assistant"'),
                       ({"messages": [msgs[0], msgs[2]]}, 'no "user" message, expected at least one "user" turn')]:
    path = _write(tmp_path / "b.jsonl", [row])
    assert _error(sources.load_sft, path) == f"cotsafe_jax: {path}:1: {message}"


def test_skip_mode_counts_and_logs_bad_rows(tmp_path, caplog):
  path = tmp_path / "p.jsonl"
  path.write_text('{"kind": "benign", "prompt": "a"}\n{"kind": "x", "prompt": "b"}\n{oops\n'
                  '{"kind": "harmful", "prompt": "c"}\n')
  with caplog.at_level(logging.WARNING, logger="cotsafe_jax.data.sources"):
    got = sources.load_prompts(str(path), on_bad_row="skip")
  assert [r["prompt"] for r in got.rows] == ["a", "c"] and got.num_skipped == 2
  assert got.skipped == (f'{path}:2: field "kind" is "x", expected harmful|benign|reasoning',
                         f"{path}:3: invalid JSON (Expecting property name enclosed in double quotes at column 2), "
                         "expected one JSON object per line")
  assert f"{path}: skipped 2 bad rows" in caplog.text
  path.write_text('{"kind": "x", "prompt": "b"}\n')
  assert _error(sources.load_prompts, str(path), on_bad_row="skip") == (
      f"cotsafe_jax: {path}: no valid prompts rows (1 skipped), expected at least one")


def test_source_level_errors(tmp_path):
  fmts = ".jsonl, .json, .csv, .tsv, .parquet, a datasets save_to_disk dir, a prepared tfds dir or tfds:NAME"
  assert _error(sources.load_prompts, str(tmp_path / "nope.jsonl")) == (
      f"cotsafe_jax: {tmp_path}/nope.jsonl: no such file, expected one of {fmts}")
  (tmp_path / "p.txt").write_text("x")
  assert _error(sources.load_prompts, str(tmp_path / "p.txt")) == (
      f"cotsafe_jax: {tmp_path}/p.txt: unknown file type '.txt', expected one of {fmts}")
  assert _error(sources.load_prompts, str(tmp_path)) == (
      f"cotsafe_jax: {tmp_path}: a directory that is neither a datasets save_to_disk dir nor a prepared tfds "
      f"dataset, expected one of {fmts}")
  path = _write(tmp_path / "p.jsonl", ROWS)
  assert _error(sources.load_prompts, path, on_bad_row="ignore") == (
      "cotsafe_jax: on_bad_row='ignore', expected 'raise' or 'skip'")
  assert _error(sources.load_prompts, path, kind="weird") == (
      "cotsafe_jax: kind='weird', expected one of harmful|benign|reasoning")
  assert _error(sources.load_rows, path, schema="chat") == (
      "cotsafe_jax: schema 'chat', expected one of prompts|sft|spans")


def test_synthetic_files_load_through_sources(tmp_path):
  from cotsafe_jax.data import synthetic
  paths = synthetic.write_task(synthetic.make_task(seed=1, n_train=40, n_eval=10), str(tmp_path))
  task = synthetic.make_task(seed=1, n_train=40, n_eval=10)
  assert sources.load_prompts(paths["train_prompts"]).rows == list(task.train_prompts)
  assert sources.load_sft(paths["sft_warm"]).rows == list(task.sft_warm)
  assert sources.load_spans(paths["safety_spans"]).rows == list(task.safety_spans)
