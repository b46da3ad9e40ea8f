"""Column presets: how each public set's published layout (file type, field names and types, quirks) becomes
our rows (docs/data.md lists them and where each layout comes from).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping


class BadRow(Exception):
  """A row that does not fit: what is wrong and what was expected (the reader adds file:line)."""

  def __init__(self, what: str, expected: str):
    super().__init__(f"{what}, expected {expected}")
    self.what, self.expected = what, expected


@dataclasses.dataclass(frozen=True)
class ColumnPreset:
  """How a published set's fields become ours.

  transform: applied to each raw row first; returns (label, row) pairs (one row, or several: PKU-SafeRLHF's
  two responses become two rows; label names the part in error messages, "" for a whole row) with fields
  renamed or built where a plain column map cannot (a prompt made of two fields, a list or a bool field).
  kind_by_split: the kind of a split's rows when the set marks it by split only (JailbreakBench's benign
  split). schema: the row schemas the preset serves (a str or a tuple of them).
  """
  columns: Mapping[str, str]              # source field -> our field
  schema: str | tuple[str, ...] = "prompts"
  kind: str | None = None                 # kind of rows that carry no kind of their own
  kind_from: str | None = None            # source field whose value gives the kind through kind_values
  kind_values: Mapping[str, str] | None = None
  answer_after: str | None = None         # the reference answer is the text after this marker
  choices: tuple[str, ...] | None = None  # multiple choice: the option fields, the correct one first
  transform: Callable[[dict], list[tuple[str, dict]]] | None = None
  kind_by_split: Mapping[str, str] | None = None

  @property
  def schemas(self) -> tuple[str, ...]:
    return (self.schema,) if isinstance(self.schema, str) else tuple(self.schema)


# WildJailbreak's data_type values, which SafeChain reuses as its `label`
_WJB_KINDS = {"adversarial_harmful": "harmful", "adversarial_benign": "benign",
              "vanilla_harmful": "harmful", "vanilla_benign": "benign"}


def _flag(row: dict, field: str) -> bool:
  """A bool field as published: a bool (jsonl, parquet, datasets) or its text in a csv cell."""
  value = row.get(field)
  if isinstance(value, bool):
    return value
  if isinstance(value, (int, float)) and value in (0, 1):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return value.strip().lower() == "true"
  raise BadRow(f'field "{field}" is {json.dumps(value, default=str)[:40]}', "true or false")


def _categories(value: Any) -> str | None:
  """A category field as text: a string as is, a list of names joined, a {name: flagged} map's flagged names."""
  if isinstance(value, str) and value.startswith(("{", "[")):  # csv cells hold a map or a list as JSON text
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      return value
  if isinstance(value, Mapping):
    value = [k for k, v in value.items() if v is True or (isinstance(v, str) and v.lower() == "true")]
  if isinstance(value, (list, tuple)):
    names = [str(v) for v in value if v is not None and str(v).strip()]
    return ", ".join(names) if names else None
  return value


def _wildjailbreak(row: dict) -> list[tuple[str, dict]]:
  """train.tsv: a vanilla_* row's text is in `vanilla` (its `adversarial` cell is empty), an adversarial_* row's
  in `adversarial`; eval.tsv has `adversarial` only."""
  out = dict(row)
  field = "vanilla" if str(row.get("data_type", "")).startswith("vanilla") else "adversarial"
  if row.get(field) is None and field == "adversarial":
    field = "vanilla"  # a file without data_type: the adversarial text when there is one, else the vanilla
  out["prompt"] = out.pop(field, None)
  for f in ("vanilla", "adversarial", "completion"):
    out.pop(f, None)
  return [("", out)]


def _harmbench(row: dict) -> list[tuple[str, dict]]:
  """HarmBench's behaviours csv: a contextual behaviour is its ContextString, a rule, then the Behavior, as
  HarmBench's own test cases are built."""
  out = dict(row)
  behavior, context = out.pop("Behavior", None), out.pop("ContextString", None)
  if isinstance(context, str) and context.strip() and isinstance(behavior, str):
    behavior = f"{context.strip()}\n\n---\n\n{behavior}"
  out["prompt"] = behavior
  return [("", out)]


def _sorry_bench(row: dict) -> list[tuple[str, dict]]:
  """SORRY-Bench question.jsonl: the request is turns[0]; a prompt_style other than base (its linguistic
  mutations) is part of the id, so the 21 styles of one question stay apart."""
  out = dict(row)
  turns = out.pop("turns", None)
  if isinstance(turns, str) and turns.startswith("["):
    try:
      turns = json.loads(turns)
    except json.JSONDecodeError:
      pass
  if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
    raise BadRow(f'field "turns" is {json.dumps(turns, default=str)[:40]}', "a list with the request text")
  out["prompt"] = turns[0]
  qid, style = out.pop("question_id", None), out.pop("prompt_style", None)
  if qid is not None:
    out["id"] = f"{qid}" if style in (None, "base") else f"{qid}_{style}"
  return [("", out)]


def _beavertails(row: dict) -> list[tuple[str, dict]]:
  """BeaverTails (and PKU-SafeRLHF-QA): one QA pair with its sequence label `is_safe` and a {harm category:
  flagged} map; no spans, so an unsafe row trains the RM's sequence score only."""
  out = {k: v for k, v in row.items() if k not in ("is_safe", "category")}
  out["label"] = "safe" if _flag(row, "is_safe") else "unsafe"
  category = _categories(row.get("category"))
  if category:
    out["category"] = category
  return [("", out)]


def _pku_saferlhf(row: dict) -> list[tuple[str, dict]]:
  """PKU-SafeRLHF: a prompt with two responses, each with its own sequence label is_response_{i}_safe and
  harm categories; one span row per response."""
  out = []
  for i in (0, 1):
    one = {"prompt": row.get("prompt"), "response": row.get(f"response_{i}"),
           "label": "safe" if _flag(row, f"is_response_{i}_safe") else "unsafe"}
    category = _categories(row.get(f"response_{i}_harm_category"))
    if category:
      one["category"] = category
    out.append((f"response_{i}", one))
  return out


def _category_list(row: dict) -> list[tuple[str, dict]]:
  out = dict(row)
  if "category" in out:
    out["category"] = _categories(out["category"])
  return [("", out)]


PRESETS: dict[str, ColumnPreset] = {
    "strongreject": ColumnPreset({"forbidden_prompt": "prompt", "category": "category"}, kind="harmful"),
    # JBB-Behaviors: harmful-behaviors.csv and benign-behaviors.csv share their columns; a datasets dir names
    # the two by split ("harmful", "benign"); the benign csv alone: preset jailbreakbench_benign
    "jailbreakbench": ColumnPreset({"Goal": "prompt", "Category": "category", "Index": "id"}, kind="harmful",
                                   kind_by_split={"harmful": "harmful", "benign": "benign"}),
    "jailbreakbench_benign": ColumnPreset({"Goal": "prompt", "Category": "category", "Index": "id"}, kind="benign"),
    "wildjailbreak": ColumnPreset({}, kind="harmful", kind_from="data_type", kind_values=_WJB_KINDS,
                                  transform=_wildjailbreak),
    "xstest": ColumnPreset({"prompt": "prompt", "type": "category", "id": "id"}, kind_from="label",
                           kind_values={"safe": "benign", "unsafe": "harmful"}),
    "harmbench": ColumnPreset({"SemanticCategory": "category", "BehaviorID": "id"}, kind="harmful",
                              transform=_harmbench),
    "sorrybench": ColumnPreset({"category": "category"}, kind="harmful", transform=_sorry_bench),
    "gsm8k": ColumnPreset({"question": "prompt", "answer": "answer"}, kind="reasoning", answer_after="####"),
    "math500": ColumnPreset({"problem": "prompt", "answer": "answer", "subject": "category", "unique_id": "id"},
                            kind="reasoning"),
    # AI-MO's aimo-validation-aime spells its fields in lower case, the AIME 2024 / 2025 sets capitalised
    "aime": ColumnPreset({"problem": "prompt", "answer": "answer", "id": "id", "Problem": "prompt",
                          "Answer": "answer", "ID": "id"}, kind="reasoning"),
    # GPQA's csv: the options are shuffled per question (seeded by its text), the answer is their letter
    "gpqa": ColumnPreset({"Question": "prompt", "Record ID": "id", "High-level domain": "category"},
                         kind="reasoning", choices=("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                                    "Incorrect Answer 3")),
    # safe chains of thought for SFT (their questions also serve as harmful PPO prompts)
    "star1": ColumnPreset({"question": "prompt", "response": "response", "id": "id"}, schema=("sft", "prompts"),
                          kind="harmful", transform=_category_list),
    "star41k": ColumnPreset({"question": "prompt", "response": "response", "id": "id"}, schema=("sft", "prompts"),
                            kind="harmful", transform=_category_list),
    # SafeChain: WildJailbreak prompts (`label` is their data_type) with R1 responses that open without <think>
    "safechain": ColumnPreset({"instruction": "prompt", "response": "response"}, schema=("sft", "prompts"),
                              kind_from="label", kind_values=_WJB_KINDS),
    # sequence-labelled QA pairs for the safety RM (no spans)
    "beavertails": ColumnPreset({"prompt": "prompt", "response": "response"}, schema="spans",
                                transform=_beavertails),
    "pku_saferlhf": ColumnPreset({}, schema="spans", transform=_pku_saferlhf),
}
