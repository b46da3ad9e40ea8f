"""The evaluation report in a workdir: summary.json ({"policies": {name: {"metrics", "by_category", ...}}}, every
metric {value, ci95, n}), report.md (tables of the same numbers) and PNG plots; one writer for a single
evaluation, a comparison of checkpoints and the demo.
"""
from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence

import numpy as np

from cotsafe_jax import parallel, paths
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.eval import metrics as metrics_lib

CURVE_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy")
_RATE_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal")
_COUNT_KEYS = ("n", "n_harmful", "n_benign", "n_reasoning", "n_samples")
_MISSING = "n/a"
_LEGEND = (
    "safety_rate_cot / safety_rate_answer: Safe@1, harmful prompts' mean fraction of samples whose reasoning / "
    "final answer is safe; safe@K / conssafe@K: all K / a majority of the K samples safe; unsafe_rate, "
    "unfinished_rate: the other two classes (a response cut at max_new_tokens is unfinished, never safe); "
    "refusal_rate: harmful prompts' answers that refuse; over_refusal: benign prompts' answers that refuse; "
    "accuracy: pass@1 on reasoning prompts (mean over samples); pass@j: unbiased estimator; maj@K: majority "
    "answer correct; entropy_cot: mean per-token entropy over reasoning tokens (nats); reflection_rate: samples "
    f"with a reflection phrase; tokens: generated per sample; n: prompts. {_MISSING}: no prompt to score. "
    "Intervals: 95% bootstrap over prompts.")


# ---- the summary.json shape ------------------------------------------------------------------------------
def summary_of(reports: Mapping[str, Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
  """{"policies": {name: report}, **extra}: reports are EvalResult.report entries, in the given order."""
  return {"policies": {name: dict(r) for name, r in reports.items()}, **extra}


def _check_metric(m: Any, where: str) -> dict[str, Any]:
  if not isinstance(m, Mapping) or set(m) != {"value", "ci95", "n"}:
    raise CotsafeError(f"write_report: {where} = {m!r}, expected {{'value', 'ci95', 'n'}}")
  metrics_lib.check_value(m["value"], f"write_report: {where}.value")
  ci = m["ci95"]
  if ci is not None:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
      raise CotsafeError(f"write_report: {where}.ci95 = {ci!r}, expected [lo, hi] or None")
    for x in ci:
      metrics_lib.check_value(x, f"write_report: {where}.ci95")
  if isinstance(m["n"], bool) or not isinstance(m["n"], (int, np.integer)) or m["n"] < 0:
    raise CotsafeError(f"write_report: {where}.n = {m['n']!r}, expected a count")
  return {"value": None if m["value"] is None else (int(m["value"]) if isinstance(m["value"], (int, np.integer))
                                                     else float(m["value"])),
          "ci95": None if ci is None else [float(x) for x in ci], "n": int(m["n"])}


def _check_block(block: Mapping[str, Any], where: str) -> dict[str, Any]:
  if not isinstance(block, Mapping) or "metrics" not in block:
    raise CotsafeError(f"write_report: {where} has no \"metrics\" (expected {{\"metrics\": {{name: {{value, ci95, "
                       "n}}}}, \"by_category\": ...}})")
  out = dict(block)
  out["metrics"] = {k: _check_metric(v, f"{where}.metrics[{k!r}]") for k, v in block["metrics"].items()}
  out["by_category"] = {c: {k: _check_metric(v, f"{where}.by_category[{c!r}][{k!r}]") for k, v in ms.items()}
                        for c, ms in block.get("by_category", {}).items()}
  for key, n in block.get("counts", {}).items():
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
      raise CotsafeError(f"write_report: {where}.counts[{key!r}] = {n!r}, expected an int")
  out["counts"] = {k: int(v) for k, v in block.get("counts", {}).items()}
  if "by_benchmark" in block:
    out["by_benchmark"] = {b: _check_block(e, f"{where}.by_benchmark[{b!r}]") for b, e in block["by_benchmark"].items()}
  if "macro" in block:
    out["macro"] = {k: _check_metric(v, f"{where}.macro[{k!r}]") for k, v in block["macro"].items()}
  return out


def check_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The summary with plain Python numbers; names usable in a markdown table. Raises on anything else."""
  if not isinstance(summary, Mapping) or not summary.get("policies"):
    raise CotsafeError("write_report: summary has no policies (expected {\"policies\": {name: {\"metrics\": ...}}})")
  out = dict(summary)
  policies = {}
  for name, entry in summary["policies"].items():
    if not isinstance(name, str) or not name or "|" in name or "\n" in name:
      raise CotsafeError(f"write_report: policy name {name!r}, expected a non-empty string without '|'")
    policies[name] = _check_block(entry, f"policies[{name!r}]")
  out["policies"] = policies
  return out


# ---- tables ---------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
  if v is None:
    return _MISSING
  return str(v) if isinstance(v, int) else f"{v:.3f}"


def _cell_ci(m: Mapping[str, Any] | None) -> str:
  if m is None or m["value"] is None:
    return _MISSING
  if m["ci95"] is None:
    return _cell(m["value"])
  return f"{_cell(m['value'])} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})"


def _ordered(names: set[str]) -> list[str]:
  """Known metrics in metric_names' order (for the largest K among the names), then the rest sorted."""
  k = max([int(n.split("@")[1].split("_")[0]) for n in names if "@" in n] + [1])
  known = metrics_lib.metric_names(k, range(2, k + 1))
  return [m for m in known if m in names] + sorted(names - set(known))


def flat_values(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{policy: {metric: value, count: n}}: the main table's numbers."""
  return {name: metrics_lib.flat(e) for name, e in summary["policies"].items()}


def format_table(summary: Mapping[str, Any]) -> str:
  """A markdown table, one row per policy: every metric's value (known metrics in their order, then others
  sorted, then the counts); rates and means to 3 decimals, counts as integers, a missing value as "n/a"."""
  rows = flat_values(summary)
  names = {k for r in rows.values() for k in r}
  keys = _ordered(names - set(_COUNT_KEYS)) + [k for k in _COUNT_KEYS if k in names]
  lines = ["| policy | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
  return "\n".join(lines)


_KEY_METRICS = ("safety_rate_cot", "safety_rate_answer", "safe@", "conssafe@", "unfinished_rate_cot", "refusal_rate",
                "over_refusal", "accuracy", "pass@", "maj@", "finished_rate", "mean_response_tokens")


def _key_metric(name: str) -> bool:
  return any(name == k or (k.endswith("@") and name.startswith(k)) for k in _KEY_METRICS)


def _group_table(groups: Sequence[tuple[str, str, str, Mapping[str, Any], int]], first: str) -> str:
  """rows (group, sub, policy, metrics, n) -> a markdown table of the key metrics with their intervals."""
  names = _ordered({k for *_, ms, _ in groups for k in ms if _key_metric(k)})
  if not names:
    return ""
  lines = [f"| {first} | policy | " + " | ".join(names) + " | n |", "| --- | --- |" + " ---: |" * (len(names) + 1)]
  for group, sub, policy, ms, n in groups:
    label = (group if not sub else f"{group} / {sub}").replace("|", "/").replace("\n", " ")  # names from data
    lines.append(f"| {label} | {policy} | " + " | ".join(_cell_ci(ms.get(k)) for k in names) + f" | {n} |")
  return "\n".join(lines)


def _benchmark_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any], int]]:
  benches = list(dict.fromkeys(b for e in summary["policies"].values() for b in e.get("by_benchmark", {})))
  out = []
  for b in benches:
    for name, e in summary["policies"].items():
      if b in e.get("by_benchmark", {}):
        be = e["by_benchmark"][b]
        out.append((b, "", name, be["metrics"], be["counts"].get("n", 0)))
  for name, e in summary["policies"].items():
    if e.get("macro"):
      out.append(("macro average", "", name, e["macro"], len(e.get("by_benchmark", {}))))
  return out


def _category_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any], int]]:
  out = []
  if any(e.get("by_benchmark") for e in summary["policies"].values()):
    benches = list(dict.fromkeys(b for e in summary["policies"].values() for b in e.get("by_benchmark", {})))
    for b in benches:
      cats = list(dict.fromkeys(c for e in summary["policies"].values()
                                for c in e.get("by_benchmark", {}).get(b, {}).get("by_category", {})))
      for c in cats:
        for name, e in summary["policies"].items():
          ms = e.get("by_benchmark", {}).get(b, {}).get("by_category", {}).get(c)
          if ms:
            out.append((b, c, name, ms, max(m["n"] for m in ms.values())))
  else:
    cats = list(dict.fromkeys(c for e in summary["policies"].values() for c in e.get("by_category", {})))
    for c in cats:
      for name, e in summary["policies"].items():
        ms = e.get("by_category", {}).get(c)
        if ms:
          out.append((c, "", name, ms, max(m["n"] for m in ms.values())))
  return out


# ---- plots ----------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, width: float = 5.5):
  # the object-oriented API renders with Agg and leaves pyplot's global state (and backend) alone
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str) -> None:
  buf = io.BytesIO()  # rendered in memory, written in one piece (the workdir may be a gs:// URL)
  fig.savefig(buf, format="png", dpi=100)
  paths.write_bytes(path, buf.getvalue())


def _metric_of(key: str, wanted: str) -> bool:
  return key == wanted or key.endswith("/" + wanted)


def _check_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
  drawn = False
  for name, rows in curves.items():
    if any("step" not in r for r in rows):
      raise CotsafeError(f"write_report: curves[{name!r}] has a row without 'step'")
    drawn |= any(r.get(k) is not None for r in rows for k in r if any(_metric_of(k, w) for w in CURVE_KEYS))
  if not drawn:
    raise CotsafeError(f"write_report: no curve row has any of {', '.join(CURVE_KEYS)} (optionally prefixed, "
                       "e.g. 'eval/accuracy'); expected per-step rows {'step': s, 'eval/accuracy': a, ...}")


def _plot_curves(path: str, curves: Mapping[str, Sequence[Mapping[str, Any]]], *, xlabel: str = "PPO step") -> None:
  from matplotlib.ticker import MaxNLocator
  fig, (ax_safe, ax_acc) = _figure(2)
  for name, rows in curves.items():
    keys = sorted({k for r in rows for k in r if any(_metric_of(k, w) for w in CURVE_KEYS)})
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
      if not pts:
        continue
      x, y = zip(*sorted(pts))
      ax = ax_acc if _metric_of(key, "accuracy") else ax_safe
      ax.plot(x, y, marker="o", markersize=3, label=f"{name}: {key}")
  for ax, what in ((ax_safe, "safety rate"), (ax_acc, "accuracy")):
    ax.set(xlabel=xlabel, ylabel=what, ylim=(-0.02, 1.02), title=f"{what} over {xlabel}s")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
      ax.legend(fontsize=7)
  _save(fig, path)


def _hist(ax, arrays: Mapping[str, np.ndarray], *, xlabel: str, title: str) -> bool:
  arrays = {k: np.asarray(v, np.float64).reshape(-1) for k, v in arrays.items()}
  full = {k: v[np.isfinite(v)] for k, v in arrays.items() if np.isfinite(v).any()}
  if not full:
    return False
  top = max(float(v.max()) for v in full.values())
  bins = np.linspace(0.0, top if top > 0 else 1.0, 41)
  for name, v in full.items():
    ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{name} (mean {v.mean():.3f})")
  ax.set(xlabel=xlabel, ylabel="density", title=title)
  ax.legend(fontsize=8)
  return True


def _plot_entropy(path: str, entropies: Mapping[str, np.ndarray]) -> bool:
  fig, (ax,) = _figure()
  if not _hist(ax, entropies, xlabel="per-token entropy of reasoning tokens (nats)",
               title="Entropy over reasoning tokens"):
    return False
  _save(fig, path)
  return True


def _plot_lengths(path: str, lengths: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
  fig, axes = _figure(2)
  drawn = [_hist(ax, {n: v[part] for n, v in lengths.items() if part in v}, xlabel=f"{part} tokens per sample",
                 title=f"{part.capitalize()} length") for ax, part in zip(axes, ("response", "reasoning"))]
  if not any(drawn):
    return False
  _save(fig, path)
  return True


def _bars(path: str, values: Mapping[str, Mapping[str, Any]], keys: Sequence[str], title: str) -> None:
  fig, (ax,) = _figure()
  names = list(values)
  width = 0.8 / len(keys)
  for j, key in enumerate(keys):
    vals = [values[n].get(key) for n in names]
    x = np.arange(len(names)) + (j - (len(keys) - 1) / 2) * width
    bars = ax.bar(x, [0.0 if v is None else v for v in vals], width, label=key)
    ax.bar_label(bars, labels=[_cell(v) for v in vals], fontsize=7)
  ax.set_xticks(np.arange(len(names)), names)
  ax.set(ylim=(0, 1.15), ylabel="rate", title=title)
  if len(keys) > 1:
    ax.legend(fontsize=7, loc="upper left", ncols=2)
  _save(fig, path)


def _benchmark_bars(path: str, summary: Mapping[str, Any], panels: Sequence[tuple[str, str]], title: str) -> bool:
  """One panel per (metric, label): x = benchmarks that have the metric, one bar per policy, 95% intervals."""
  policies = summary["policies"]
  todo = []
  for key, label in panels:
    benches = list(dict.fromkeys(b for e in policies.values() for b, be in e.get("by_benchmark", {}).items()
                                 if be["metrics"].get(key, {}).get("value") is not None))
    if benches:
      todo.append((key, label, benches))
  if not todo:
    return False
  fig, axes = _figure(len(todo), width=max(4.0, 1.2 * max(len(b) for *_, b in todo) * len(policies) ** 0.5))
  for ax, (key, label, benches) in zip(axes, todo):
    width = 0.8 / len(policies)
    for j, (name, e) in enumerate(policies.items()):
      ms = [e.get("by_benchmark", {}).get(b, {}).get("metrics", {}).get(key) for b in benches]
      vals = [m["value"] if m and m["value"] is not None else 0.0 for m in ms]
      err = np.array([[v - m["ci95"][0], m["ci95"][1] - v] if m and m["ci95"] else [0.0, 0.0]
                      for v, m in zip(vals, ms)]).T
      x = np.arange(len(benches)) + (j - (len(policies) - 1) / 2) * width
      ax.bar(x, vals, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(np.arange(len(benches)), benches, rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel=label, title=f"{label} by benchmark")
    ax.legend(fontsize=7)
  fig.suptitle(title)
  _save(fig, path)
  return True


# ---- the writer -----------------------------------------------------------------------------------------
def write_report(workdir: str, summary: Mapping[str, Any], *,
                 curves: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 entropies: Mapping[str, np.ndarray] | None = None,
                 lengths: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 speed: Mapping[str, Mapping[str, Any]] | None = None, notes: Sequence[str] = (),
                 title: str = "Chain-of-thought safety evaluation") -> str:
  """Write summary.json (the summary as given, policies in order), report.md and the plots into `workdir`.

  summary: {"policies": {name: {"metrics": {m: {value, ci95, n}}, "by_category", "counts", optional
  "by_benchmark", "macro"}}, **more keys} (`summary_of` builds it from EvalResult.report entries).
  curves: name -> per-step rows ({"step": s, "eval/safety_rate_cot": ...}) -> curves.png. entropies: name ->
  per-token reasoning entropies -> entropy.png. lengths: name -> {"response": [...], "reasoning": [...]} tokens
  per sample -> lengths.png. speed: name -> EvalResult.speed (a table; not in summary.json, which stays
  reproducible). Always: rates.png, reflection.png; with benchmarks: safety_by_benchmark.png,
  accuracy_by_benchmark.png, and tables by benchmark and category. Only the main process writes. Returns the
  main markdown table (policies x metrics).
  """
  clean = check_summary(summary)
  if curves:
    _check_curves(curves)
  table = format_table(clean)
  if not parallel.is_main_process():
    return table
  paths.makedirs(workdir)
  paths.write_text(paths.join(workdir, "summary.json"), json.dumps(clean, indent=2, allow_nan=False))
  values = flat_values(clean)
  plots = []
  if curves:
    _plot_curves(paths.join(workdir, "curves.png"), curves)
    plots.append(("Safety and accuracy over PPO steps", "curves.png"))
  if _benchmark_bars(paths.join(workdir, "safety_by_benchmark.png"), clean,
                     (("safety_rate_cot", "CoT Safe@1"), ("safety_rate_answer", "answer Safe@1")),
                     "Safety by benchmark and part"):
    plots.append(("Safety by benchmark and part", "safety_by_benchmark.png"))
  if _benchmark_bars(paths.join(workdir, "accuracy_by_benchmark.png"), clean,
                     (("accuracy", "pass@1"), ("over_refusal", "over-refusal")), "Accuracy and over-refusal"):
    plots.append(("Accuracy and over-refusal by benchmark", "accuracy_by_benchmark.png"))
  _bars(paths.join(workdir, "rates.png"), values, _RATE_KEYS, "Safety, accuracy and over-refusal")
  plots.append(("Safety, accuracy and over-refusal", "rates.png"))
  _bars(paths.join(workdir, "reflection.png"), values, ("reflection_rate",), "Reflection-phrase rate")
  plots.append(("Reflection-phrase rate", "reflection.png"))
  if entropies and _plot_entropy(paths.join(workdir, "entropy.png"), entropies):
    plots.append(("Entropy over reasoning tokens", "entropy.png"))
  if lengths and _plot_lengths(paths.join(workdir, "lengths.png"), lengths):
    plots.append(("Response and reasoning lengths", "lengths.png"))
  legend = _LEGEND
  if isinstance(summary.get("intervals"), str):  # a summary that says how its intervals were drawn (the study)
    legend = legend.replace("Intervals: 95% bootstrap over prompts.", f"Intervals: {summary['intervals']}.")
  md = [f"# {title}", "", table, "", legend, ""]
  for line in notes:
    md += [line, ""]
  bench = _group_table(_benchmark_rows(clean), "benchmark")
  if bench:
    md += ["## By benchmark", "", bench, ""]
  cats = _group_table(_category_rows(clean), "category")
  if cats:
    md += ["## By category", "", cats, ""]
  if speed:
    md += ["## Speed", "", "| policy | prompts/s | samples/s | tokens/s | generate (s) | judge (s) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, sp in speed.items():
      md.append(f"| {name} | " + " | ".join(_cell(None if sp.get(k) is None else float(sp[k])) for k in
                                         ("prompts_per_s", "samples_per_s", "tokens_per_s", "generate_s",
                                          "judge_s")) + " |")
    md.append("")
  for caption, file in plots:
    md += [f"## {caption}", "", f"![{caption}]({file})", ""]
  paths.write_text(paths.join(workdir, "report.md"), "\n".join(md))
  return table


# ---- a training job's report -------------------------------------------------------------------------------
def _read_metrics(path: str) -> list[dict[str, Any]]:
  rows = []
  if paths.exists(path):
    with paths.open_file(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:  # a torn last line of a killed run
            continue
  return rows


def _plot_training(path: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
  """One panel per key that has values (with its val/ twin on the same axes); returns the keys drawn."""
  drawn = [k for k in keys if any(r.get(k) is not None or r.get(f"val/{k}") is not None for r in rows)]
  if not drawn:
    return []
  ncols = min(3, len(drawn))
  nrows = -(-len(drawn) // ncols)
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), layout="constrained")
  axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
  for ax, key in zip(axes, drawn):
    for name in (key, f"val/{key}"):
      pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
      if pts:
        x, y = zip(*pts)
        ax.plot(x, y, marker="o" if name.startswith("val/") else None, markersize=3, label=name)
    ax.set(xlabel="step", title=key)
    ax.legend(fontsize=7)
  for ax in axes[len(drawn):]:
    ax.set_visible(False)
  fig.savefig(path, dpi=100)
  return drawn


def write_training_report(workdir: str, *, job: str, curves: Sequence[str],
                          final: Mapping[str, Any] | None = None, notes: Sequence[str] = (),
                          title: str | None = None) -> str:
  """report.md of a training job in `workdir`: its metrics over steps (metrics.jsonl: `curves` keys, each with
  its val/ twin) in training_curves.png, the last logged value of each, `final` (e.g. held-out metrics) as a
  table, and, when the job validated a policy (validation/step_N.json, written by train.validation), the last
  validation's tables (the evaluation's, with its step) and validation_curves.png (safety and accuracy over
  steps). summary.json is left alone (the job's own). Only the main process writes. Returns the markdown."""
  rows = _read_metrics(paths.join(workdir, "metrics.jsonl"))
  title = title or f"{job}: training report"
  md = [f"# {title}", "", f"Workdir: `{workdir}`; {len(rows)} logged steps"
        + (f", last step {rows[-1]['step']}" if rows else "") + ".", ""]
  for line in notes:
    md += [line, ""]
  if not parallel.is_main_process():
    return "\n".join(md)
  paths.makedirs(workdir)
  last = {}
  for r in rows:
    last.update({k: (r["step"], v) for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
  shown = [k for k in curves if k in last] + sorted(k for k in last if k.startswith("val/") and "/" not in k[4:])
  if shown:
    md += ["## Last logged values", "", "| metric | step | value |", "| --- | ---: | ---: |"]
    md += [f"| {k} | {last[k][0]} | {_cell(float(last[k][1]))} |" for k in shown]
    md.append("")
  if final:
    md += ["## Final metrics", "", "| metric | value |", "| --- | ---: |"]
    for k, v in final.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        md.append(f"| {k} | {_cell(v if isinstance(v, int) else float(v))} |")
    md.append("")
  plots = []
  if _plot_training(paths.join(workdir, "training_curves.png"), rows, curves):
    plots.append(("Training curves", "training_curves.png"))
  val_dir = paths.join(workdir, "validation")
  saved = sorted((int(f[5:-5]), f) for f in paths.listdir(val_dir) if f.startswith("step_") and f.endswith(".json")
                 ) if paths.isdir(val_dir) else []
  if saved:
    step, name = saved[-1]
    got = json.loads(paths.read_text(paths.join(val_dir, name)))
    summary = check_summary(summary_of({f"step {step}": got["report"]}))
    md += [f"## Validation at step {step}", "", format_table(summary), "", _LEGEND, ""]
    bench = _group_table(_benchmark_rows(summary), "benchmark")
    if bench:
      md += [bench, ""]
    curve_rows = [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("val/")}} for r in rows]
    curve_rows = [r for r in curve_rows if len(r) > 1]
    if any(r.get(f"val/{k}") is not None for r in curve_rows for k in CURVE_KEYS):
      _plot_curves(paths.join(workdir, "validation_curves.png"), {"validation": curve_rows}, xlabel="training step")
      plots.append(("Validation safety and accuracy over training", "validation_curves.png"))
  for caption, file in plots:
    md += [f"## {caption}", "", f"![{caption}]({file})", ""]
  text = "\n".join(md)
  paths.write_text(paths.join(workdir, "report.md"), text)
  return text
