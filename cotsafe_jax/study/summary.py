"""The study's summary.json (eval's {"policies": {name: {"metrics", "by_category", ...}}} shape, every metric
{value, ci95, n} over seeds and prompts) and the markdown tables of report.md and the README.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from cotsafe_jax.study import judge as judge_lib, stats, task as task_lib

POLICIES = ("base", "sft", "rft", "ppo", "ppo_seq")
ARMS = POLICIES[1:]
PAIRS = (("ppo", "sft"), ("ppo", "rft"), ("ppo", "ppo_seq"), ("ppo", "base"))
Keep = Callable[[Mapping[str, Any]], bool]


def _split(name: str) -> Keep:
  return lambda s: s["split"] == name


def _kind(kind: str, split: str = "id") -> Keep:
  return lambda s: s["kind"] == kind and s["split"] == split


# key in summary.json -> (metric of stats.prompt_values, which samples); plain names: the in-distribution test split
SPECS: dict[str, tuple[str, Keep]] = {
    **{m: (m, _split("id")) for m in ("safety_rate_cot", "safety_rate_answer", "refusal_rate", "over_refusal",
                                      "accuracy", "reflection_rate", "entropy_cot", "finished_rate",
                                      "rm_unsafe_rate_cot", "rm_missed_unsafe_cot", "rm_judge_agreement_cot",
                                      "unlabelled_form_rate")},
    **{f"{m}/heldout_substance": (m, _split("heldout_substance"))
       for m in ("safety_rate_cot", "safety_rate_answer", "refusal_rate", "over_refusal", "rm_missed_unsafe_cot",
                 "unlabelled_form_rate")},
    **{f"{m}/heldout_phrasing": (m, _split("heldout_phrasing"))
       for m in ("safety_rate_cot", "safety_rate_answer", "refusal_rate", "rm_missed_unsafe_cot",
                 "unlabelled_form_rate")},
    "accuracy/hard": ("accuracy", _split("hard")), "finished_rate/hard": ("finished_rate", _split("hard")),
    "reflection_rate/hard": ("reflection_rate", _split("hard")),
    **{f"reflection_rate/{k}": ("reflection_rate", _kind(k)) for k in task_lib.KINDS},
    **{f"entropy_cot/{k}": ("entropy_cot", _kind(k)) for k in task_lib.KINDS},
}
CATEGORY_METRICS = ("safety_rate_cot", "safety_rate_answer", "refusal_rate", "over_refusal", "accuracy",
                    "reflection_rate", "entropy_cot", "rm_missed_unsafe_cot", "unlabelled_form_rate")
DIFF_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal", "safety_rate_cot/heldout_substance",
             "safety_rate_cot/heldout_phrasing", "over_refusal/heldout_substance", "accuracy/hard",
             "reflection_rate/harmful", "reflection_rate/reasoning", "entropy_cot/harmful", "entropy_cot/reasoning",
             "rm_missed_unsafe_cot")
BY_SEED_KEYS = ("safety_rate_cot", "safety_rate_answer", "accuracy", "over_refusal",
                "safety_rate_cot/heldout_substance", "safety_rate_cot/heldout_phrasing", "accuracy/hard",
                "reflection_rate/harmful", "reflection_rate/reasoning", "entropy_cot", "rm_missed_unsafe_cot")
# the README / report table: (key, header)
TABLE = (("safety_rate_cot", "CoT safe"), ("safety_rate_answer", "answer safe"),
         ("safety_rate_cot/heldout_substance", "CoT safe, held-out substance"),
         ("safety_rate_cot/heldout_phrasing", "CoT safe, held-out phrasing"), ("accuracy", "accuracy"),
         ("accuracy/hard", "accuracy, longer chains"), ("over_refusal", "over-refusal"),
         ("over_refusal/heldout_substance", "over-refusal, held-out substance"),
         ("reflection_rate/harmful", "reflection, harmful"), ("reflection_rate/reasoning", "reflection, reasoning"),
         ("entropy_cot/harmful", "CoT entropy, harmful"), ("entropy_cot/reasoning", "CoT entropy, reasoning"),
         ("rm_missed_unsafe_cot", "RM misses unsafe CoT"))


def _per_seed(evals: Mapping[int, Mapping[Any, Any]], policy: str, decoding: str, metric: str,
              keep: Keep) -> list[dict[int, tuple[float, float]]]:
  return [stats.prompt_values(evals[sd][policy, decoding]["samples"], metric, keep=keep) for sd in sorted(evals)]


def _block(evals, policy: str, decoding: str, *, num_resamples: int, with_categories: bool) -> dict[str, Any]:
  seeds = sorted(evals)
  out: dict[str, Any] = {"metrics": {}}
  for j, (key, (metric, keep)) in enumerate(SPECS.items()):
    m = stats.metric_over_seeds(_per_seed(evals, policy, decoding, metric, keep), num_resamples=num_resamples,
                                seed=j)
    if m is not None:
      out["metrics"][key] = m
  if with_categories:
    cats = sorted({s["category"] for sd in seeds for s in evals[sd][policy, decoding]["samples"]})
    out["by_category"] = {}
    for c in cats:
      ms = {}
      for j, metric in enumerate(CATEGORY_METRICS):
        m = stats.metric_over_seeds(_per_seed(evals, policy, decoding, metric, lambda s, c=c: s["category"] == c),
                                    num_resamples=num_resamples, seed=1000 + j)
        if m is not None:
          ms[metric] = m
      out["by_category"][c] = ms
    out["by_seed"] = {}
    for sd in seeds:
      ms = {}
      for j, key in enumerate(BY_SEED_KEYS):
        metric, keep = SPECS[key]
        m = stats.metric_over_seeds([stats.prompt_values(evals[sd][policy, decoding]["samples"], metric, keep=keep)],
                                    num_resamples=num_resamples, seed=j)
        if m is not None:
          ms[key] = m
      out["by_seed"][str(sd)] = ms
  return out


def _files_union(per_seed: Mapping[int, Any], key: str, fn: Callable[[str], list]) -> list:
  return sorted({x for v in per_seed.values() for x in fn(v["paths"][key])})


def _compute(info: Mapping[str, Any], evals) -> dict[str, Any]:
  """Per arm and seed: steps, rollouts, generated tokens, SFT rows, seconds (the arm's own training; RFT adds its
  sampling), and the evaluation's; the warm start and the RM, which every arm shares."""
  out: dict[str, Any] = {}
  for sd, v in info["per_seed"].items():
    for arm in ARMS:
      p = dict(v["arms"][arm])
      row = {"steps": p.get("steps"), "rollouts": p.get("rollouts", 0), "generated_tokens": p.get("generated_tokens", 0),
             "sft_rows": p.get("rows", 0), "seconds": p.get("seconds")}
      if arm == "rft":
        r = v["rft_data"]
        row.update(rollouts=r["rollouts"], generated_tokens=r["generated_tokens"],
                   seconds=round(float(p["seconds"]) + float(r["seconds"]), 2), sampling_seconds=r["seconds"],
                   kept_rows=r["kept"])
      out.setdefault(arm, {})[str(sd)] = row
    out.setdefault("warm_start", {})[str(sd)] = {"steps": v["warm_start"].get("steps"),
                                                 "seconds": v["warm_start"].get("stage_seconds")}
    out.setdefault("eval", {})[str(sd)] = {f"{p}/{d}": {"seconds": e["seconds"], "generated_tokens": e["generated_tokens"]}
                                           for (p, d), e in evals[int(sd)].items()}
  return out


def build(*, evals: Mapping[int, Mapping[Any, Any]], info: Mapping[str, Any], task: task_lib.TaskConfig, ppo: Any,
          rft: Any, evaluation: Any, num_resamples: int) -> tuple[dict[str, Any], list[str]]:
  """(summary.json, markdown notes for report.md: the main table first)."""
  seeds = sorted(evals)
  decodings = sorted({d for sd in seeds for _, d in evals[sd]})
  policies = {}
  for p in POLICIES:
    entry = _block(evals, p, "sampled", num_resamples=num_resamples, with_categories=True)
    entry["counts"] = {"n_seeds": len(seeds), "samples_per_prompt": evaluation.samples_per_prompt,
                       "n_test_prompts": sum(len({s["prompt_index"] for s in evals[sd][p, "sampled"]["samples"]})
                                             for sd in seeds)}
    if "greedy" in decodings:
      entry["greedy"] = _block(evals, p, "greedy", num_resamples=num_resamples, with_categories=False)
    pooled = [s for sd in seeds for s in evals[sd][p, "sampled"]["samples"]]
    entry["rm_judge_agreement"] = {split: judge_lib.agreement([s for s in pooled if s["split"] == split])
                                   for split in ("id", "heldout_substance", "heldout_phrasing", "hard")}
    policies[p] = entry
  paired = {}
  for a, b in PAIRS:
    diffs = {}
    for j, key in enumerate(DIFF_KEYS):
      metric, keep = SPECS[key]
      d = stats.paired_difference(_per_seed(evals, a, "sampled", metric, keep), _per_seed(evals, b, "sampled", metric,
                                                                                        keep),
                                  num_resamples=num_resamples, seed=500 + j)
      if d is not None:
        diffs[key] = {**{k: d[k] for k in ("value", "ci95", "n")},
                      "by_seed": {str(sd): x for sd, x in zip(seeds, d["by_seed"])}}
    paired[f"{a} - {b}"] = diffs
  per_seed = info["per_seed"]
  train_categories = {name: _files_union(per_seed, key, task_lib.categories_in)
                      for name, key in (("sft", "sft_safe"), ("rm", "rm_spans"), ("ppo", "train_prompts"),
                                        ("rft", "rft"), ("warm_start", "warm_start"))}
  train_phrasings = {name: _files_union(per_seed, key, task_lib.phrasings_in)
                     for name, key in (("sft", "sft_safe"), ("rm", "rm_spans"), ("ppo", "train_prompts"),
                                       ("rft", "rft"), ("warm_start", "warm_start"))}
  summary = {
      "policies": policies,
      "heldout_categories": [task.heldout_substance],
      "heldout_phrasings": list(task_lib.HARM_TEMPLATES[task_lib.NUM_TRAIN_PHRASINGS:]),
      "train_categories": train_categories,
      "train_phrasings": {k: [task_lib.HARM_TEMPLATES[i] for i in v] for k, v in train_phrasings.items()},
      "seeds": seeds,
      "decoding": {"rates": f"sampled: temperature {evaluation.temperature:g}, {evaluation.samples_per_prompt} "
                            "samples per prompt (a prompt's rate is the fraction of its samples); policies[*].greedy: "
                            "the same metrics under greedy decoding" if "greedy" in decodings else "",
                   "temperature": evaluation.temperature, "samples_per_prompt": evaluation.samples_per_prompt,
                   "max_new_tokens": evaluation.max_new_tokens},
      "intervals": "95% percentile bootstrap over seeds and, within each drawn seed, over test prompts "
                   f"({num_resamples} resamples); n = prompts summed over seeds",
      "paired_differences": paired,
      "compute": _compute(info, evals),
      "hyperparameters": info["tuning"],
      "rollout_budget": {"ppo_max": ppo.rollouts, "rft": rft.rollouts},
      "near_duplicate_check": {str(sd): v["data"]["near_duplicates"] for sd, v in per_seed.items()},
      "rm_eval": {str(sd): v["rm_eval"] for sd, v in per_seed.items()},
      "task": {str(sd): v["data"]["describe"] for sd, v in per_seed.items()},
  }
  return summary, [main_table(summary), paired_table(summary), category_table(summary), compute_table(summary),
                   agreement_table(summary), tuning_table(summary)]


# ---- markdown ------------------------------------------------------------------------------------------------------
def _cell(m: Mapping[str, Any] | None, digits: int = 2) -> str:
  if m is None or m.get("value") is None:
    return "n/a"
  if m.get("ci95") is None:
    return f"{m['value']:.{digits}f}"
  lo, hi = m["ci95"]
  return f"{m['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main_table(summary: Mapping[str, Any], *, decoding: str = "sampled") -> str:
  """Policies x the study's key rates, each "value [95% interval]", and a last row with n (prompts over seeds)."""
  pol = summary["policies"]
  lines = ["| policy | " + " | ".join(h for _, h in TABLE) + " |", "| --- |" + " ---: |" * len(TABLE)]
  for name, e in pol.items():
    ms = e["metrics"] if decoding == "sampled" else e["greedy"]["metrics"]
    lines.append(f"| {name} | " + " | ".join(_cell(ms.get(k)) for k, _ in TABLE) + " |")
  first = next(iter(pol.values()))
  ms = first["metrics"] if decoding == "sampled" else first["greedy"]["metrics"]
  lines.append("| n (prompts) | " + " | ".join(str(ms[k]["n"]) if k in ms else "n/a" for k, _ in TABLE) + " |")
  return "\n".join(lines)


def paired_table(summary: Mapping[str, Any]) -> str:
  keys = [k for k in DIFF_KEYS if any(k in d for d in summary["paired_differences"].values())]
  lines = ["### Paired differences (same seeds, same prompts; per seed in summary.json)", "",
           "| difference | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
  for name, d in summary["paired_differences"].items():
    lines.append(f"| {name} | " + " | ".join(_cell(d.get(k)) for k in keys) + " |")
    per = " | ".join(", ".join("n/a" if x is None else f"{x['value']:+.2f}" for x in d[k]["by_seed"].values())
                     if k in d else "n/a" for k in keys)
    lines.append(f"| ... by seed | {per} |")
  return "\n".join(lines)


def category_table(summary: Mapping[str, Any]) -> str:
  pol = summary["policies"]
  cats = list(dict.fromkeys(c for e in pol.values() for c in e["by_category"]))
  keys = ("safety_rate_cot", "safety_rate_answer", "over_refusal", "accuracy", "reflection_rate", "entropy_cot")
  lines = ["### By category (sampled)", "", "| category | policy | " + " | ".join(keys) + " | n |",
           "| --- | --- |" + " ---: |" * (len(keys) + 1)]
  for c in cats:
    for name, e in pol.items():
      ms = e["by_category"].get(c, {})
      if ms:
        n = max(m["n"] for m in ms.values())
        lines.append(f"| {c} | {name} | " + " | ".join(_cell(ms.get(k)) for k in keys) + f" | {n} |")
  return "\n".join(lines)


def compute_table(summary: Mapping[str, Any]) -> str:
  comp = summary["compute"]
  lines = ["### Compute per arm (mean over seeds)", "",
           "| arm | steps | rollouts | generated tokens | SFT rows | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for arm in ARMS:
    rows = list(comp[arm].values())
    mean = lambda k: sum(float(r.get(k) or 0) for r in rows) / len(rows)  # noqa: E731
    lines.append(f"| {arm} | {mean('steps'):.0f} | {mean('rollouts'):.0f} | {mean('generated_tokens'):.0f} | "
                 f"{mean('sft_rows'):.0f} | {mean('seconds'):.0f} |")
  warm = list(comp["warm_start"].values())
  lines.append(f"| warm start (shared) | {sum(float(r['steps'] or 0) for r in warm) / len(warm):.0f} | 0 | 0 | | "
               f"{sum(float(r['seconds'] or 0) for r in warm) / len(warm):.0f} |")
  return "\n".join(lines)


def agreement_table(summary: Mapping[str, Any]) -> str:
  lines = ["### Safety RM vs the judge on the policies' sampled reasoning (pooled over seeds)", "",
           "| policy | split | n | agreement | kappa | judge unsafe, RM safe | of which unlabelled forms | "
           "judge safe, RM unsafe |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, e in summary["policies"].items():
    for split, a in e["rm_judge_agreement"].items():
      if a["n"]:
        kappa = "n/a" if a["kappa"] is None else f"{a['kappa']:.2f}"
        lines.append(f"| {name} | {split} | {a['n']} | {a['agreement']:.3f} | {kappa} | {a['judge_unsafe_rm_safe']} | "
                     f"{a['judge_unsafe_rm_safe_with_unlabelled_forms']} | {a['judge_safe_rm_unsafe']} |")
  return "\n".join(lines)


def tuning_table(summary: Mapping[str, Any]) -> str:
  h = summary["hyperparameters"]
  if h.get("fixed"):
    return "### Learning rates and steps\n\nFixed in the config (Tuning.fixed): " + ", ".join(
        f"{a} {v}" for a, v in h.get("chosen", {}).items())
  lines = [f"### Learning rates and steps, chosen on seed {h['seed']}'s validation split (sampled as the test)", "",
           "| arm | learning rate | steps | val score | val CoT safe | val accuracy | chosen |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
  for arm, points in h["runs"].items():
    for p in points:
      chosen = h["chosen"][arm]
      mark = "yes" if p["learning_rate"] == chosen["learning_rate"] and p["steps"] == chosen["steps"] else ""
      v = p["val"]
      fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
      lines.append(f"| {arm} | {p['learning_rate']:g} | {p['steps']} | {v['score']:.3f} | "
                   f"{fmt(v['safety_rate_cot'])} | {fmt(v['accuracy'])} | {mark} |")
  return "\n".join(lines)


def curves(tuning: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
  """Validation curves of the PPO tuning runs (per learning rate), for curves.png."""
  out: dict[str, list[dict[str, Any]]] = {}
  base = tuning.get("base_val")
  for arm in ("ppo", "ppo_seq"):
    for p in tuning.get("runs", {}).get(arm, []):
      rows = out.setdefault(f"{arm} lr {p['learning_rate']:g}",
                            [{"step": 0, **{f"val/{k}": base[k] for k in ("safety_rate_cot", "accuracy")}}]
                            if base else [])
      rows.append({"step": p["steps"], **{f"val/{k}": p["val"][k] for k in ("safety_rate_cot", "accuracy")}})
  return out

