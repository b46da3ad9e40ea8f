"""The evaluation report in a workdir: summary.json, report.md (a table of the same numbers) and PNG plots
(safety and accuracy over PPO steps, reasoning-token entropy histograms, reflection and outcome rates).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cotsafe_jax import parallel
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.eval.evaluate import SUMMARY_KEYS

CURVE_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy")
_RATE_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal")
_MISSING = "n/a"


def _check_summaries(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Plain Python numbers (ints stay ints, None stays None); names usable in a markdown table."""
  if not summaries:
    raise CotsafeError("write_report: summaries is empty (expected name -> summary dict)")
  out = {}
  for name, summary in summaries.items():
    if not isinstance(name, str) or not name or "|" in name or "\n" in name:
      raise CotsafeError(f"write_report: policy name {name!r}, expected a non-empty string without '|'")
    clean = {}
    for key, v in summary.items():
      if v is None or isinstance(v, (bool, np.bool_)):
        clean[key] = None if v is None else int(v)
      elif isinstance(v, (int, np.integer)):
        clean[key] = int(v)
      elif isinstance(v, (float, np.floating)) and math.isfinite(float(v)):
        clean[key] = float(v)
      else:
        raise CotsafeError(f"write_report: summaries[{name!r}][{key!r}] = {v!r}, expected a finite number or None")
    out[name] = clean
  return out


def _cell(v: Any) -> str:
  if v is None:
    return _MISSING
  return str(v) if isinstance(v, int) else f"{v:.3f}"


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """A markdown table, one row per policy: the SUMMARY_KEYS first, then any other keys (sorted);
  rates and means to 3 decimals, counts as integers, a missing value as "n/a"."""
  summaries = _check_summaries(summaries)
  seen = {k for s in summaries.values() for k in s}
  keys = [k for k in SUMMARY_KEYS if k in seen] + sorted(seen - set(SUMMARY_KEYS))
  lines = ["| policy | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
  for name, s in summaries.items():
    lines.append(f"| {name} | " + " | ".join(_cell(s.get(k)) for k in keys) + " |")
  return "\n".join(lines)


def _figure(ncols: int = 1):
  # the object-oriented API renders with Agg and leaves pyplot's global state (and backend) alone
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5 * ncols, 4.0), layout="constrained")
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _metric_of(key: str, wanted: str) -> bool:
  return key == wanted or key.endswith("/" + wanted)


def _plot_curves(path: str, curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
  from matplotlib.ticker import MaxNLocator
  fig, (ax_safe, ax_acc) = _figure(2)
  drawn = 0
  for name, rows in curves.items():
    if any("step" not in r for r in rows):
      raise CotsafeError(f"write_report: curves[{name!r}] has a row without 'step'")
    keys = sorted({k for r in rows for k in r if any(_metric_of(k, w) for w in CURVE_KEYS)})
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
      if not pts:
        continue
      x, y = zip(*sorted(pts))
      ax = ax_acc if _metric_of(key, "accuracy") else ax_safe
      ax.plot(x, y, marker="o", markersize=3, label=f"{name}: {key}")
      drawn += 1
  if not drawn:
    raise CotsafeError(f"write_report: no curve row has any of {', '.join(CURVE_KEYS)} (optionally prefixed, "
                       "e.g. 'eval/accuracy'); expected per-step rows {'step': s, 'eval/accuracy': a, ...}")
  for ax, what in ((ax_safe, "safety rate"), (ax_acc, "accuracy")):
    ax.set(xlabel="PPO step", ylabel=what, ylim=(-0.02, 1.02), title=f"{what} over PPO steps")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
      ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)


def _plot_entropy(path: str, entropies: Mapping[str, np.ndarray]) -> bool:
  arrays = {k: np.asarray(v, np.float64).reshape(-1) for k, v in entropies.items()}
  arrays = {k: v[np.isfinite(v)] for k, v in arrays.items()}
  full = {k: v for k, v in arrays.items() if v.size}
  if not full:
    return False
  top = max(float(v.max()) for v in full.values())
  bins = np.linspace(0.0, top if top > 0 else 1.0, 41)
  fig, (ax,) = _figure()
  for name, v in full.items():
    ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{name} (mean {v.mean():.3f})")
  ax.set(xlabel="per-token entropy of reasoning tokens (nats)", ylabel="density",
         title="Entropy over reasoning tokens")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  return True


def _bars(path: str, summaries: Mapping[str, Mapping[str, Any]], keys: Sequence[str], title: str) -> None:
  fig, (ax,) = _figure()
  names = list(summaries)
  width = 0.8 / len(keys)
  for j, key in enumerate(keys):
    vals = [summaries[n].get(key) for n in names]
    x = np.arange(len(names)) + (j - (len(keys) - 1) / 2) * width
    bars = ax.bar(x, [0.0 if v is None else v for v in vals], width, label=key)
    ax.bar_label(bars, labels=[_cell(v) for v in vals], fontsize=7)
  ax.set_xticks(np.arange(len(names)), names)
  ax.set(ylim=(0, 1.15), ylabel="rate", title=title)
  if len(keys) > 1:
    ax.legend(fontsize=7, loc="upper left", ncols=2)
  fig.savefig(path, dpi=100)


def write_report(workdir: str, summaries: Mapping[str, Mapping[str, Any]], *,
                 curves: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 entropies: Mapping[str, np.ndarray] | None = None,
                 title: str = "Chain-of-thought safety evaluation") -> str:
  """Write summary.json ({name: summary}, in the given order), report.md and the plots into `workdir`.

  curves: name -> per-step rows ({"step": s, "eval/safety_rate_cot": ..., "eval/accuracy": ...}; keys equal to
  or ending in "/" + one of CURVE_KEYS are drawn) -> curves.png. entropies: name -> per-token reasoning
  entropies (EvalResult.entropies) -> entropy.png. Always: rates.png (safety, accuracy, over-refusal per
  policy) and reflection.png. Only the main process writes. Returns the markdown table.
  """
  clean = _check_summaries(summaries)
  table = format_table(clean)
  if not parallel.is_main_process():
    return table
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "summary.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(clean, f, indent=2, allow_nan=False)
  os.replace(tmp, os.path.join(workdir, "summary.json"))
  plots = []
  if curves:
    _plot_curves(os.path.join(workdir, "curves.png"), curves)
    plots.append(("Safety and accuracy over PPO steps", "curves.png"))
  if entropies and _plot_entropy(os.path.join(workdir, "entropy.png"), entropies):
    plots.append(("Entropy over reasoning tokens", "entropy.png"))
  _bars(os.path.join(workdir, "rates.png"), clean, _RATE_KEYS, "Safety, accuracy and over-refusal")
  plots.append(("Safety, accuracy and over-refusal", "rates.png"))
  _bars(os.path.join(workdir, "reflection.png"), clean, ("reflection_rate",), "Reflection-phrase rate")
  plots.append(("Reflection-phrase rate", "reflection.png"))
  md = [f"# {title}", "", table, "",
        "safety_rate_cot / safety_rate_answer: harmful prompts whose reasoning / final answer is safe; "
        "accuracy: reasoning prompts answered correctly; over_refusal: benign prompts refused; entropy_cot: "
        "mean per-token entropy over reasoning tokens (nats); reflection_rate: responses with a reflection "
        f"phrase; n: prompts. {_MISSING}: no prompt to score.", ""]
  for caption, file in plots:
    md += [f"## {caption}", "", f"![{caption}]({file})", ""]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  return table
