"""The run's human-readable outputs: results table, plots and sample profiles.

Written to the work directory at the end of ``train`` / ``evaluate``:
  results.md         metrics table (methods x Recall/NDCG/MRR@k) and sample profiles
  results.json       the same numbers, machine-readable
  curves.png         RL reward and both losses over training steps
  metrics.png        bar chart of NDCG@10 / Recall@10 per method
Every file is written to a temporary name and renamed, so a crash never leaves
a truncated report behind.
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import matplotlib
import numpy as np

from langptune_jax import fs

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

METRIC_COLUMNS = ("Recall", "NDCG", "MRR")
# Baselines in table order, with their display names (docs/method.md §9).
_BASELINES = (("random", "random"), ("popularity", "popularity"), ("sasrec", "SASRec"),
              ("reference_query", "reference query (last item)"),
              ("history", "raw history (fine-tuned decoder)"))


def _atomic_write(path: str, text: str) -> None:
  fs.write_text(path, text)


def _save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())


def _label(tag: str) -> str:
  return "LangPTune" if tag == "final" else f"LangPTune ({tag.replace('_', ' ')})"


def _ordered(entry: dict) -> list[tuple[str, str]]:
  """(result name, display label) of one evaluation, in table order."""
  names = entry["results"]
  out = [(name, label) for name, label in _BASELINES if name in names]
  out += [(name, label) for name, label in (("zero_shot", "zero-shot profiles"),
                                            ("cl_only", "CL only (zero-shot profiles, tuned "
                                                        "decoder)")) if name in names]
  if entry["tag"] != "zero_shot":
    out.append((entry["tag"], _label(entry["tag"])))
  return out


def final_entry(history: Sequence[dict]) -> dict | None:
  """The evaluation the final table shows: "final" if there is one, else the last."""
  finals = [e for e in history if e["tag"] == "final"]
  return finals[-1] if finals else (history[-1] if history else None)


def method_rows(history: Sequence[dict]) -> dict[str, dict[str, float]]:
  """{method: metrics} of the final evaluation: baselines, zero-shot, CL only, LangPTune."""
  entry = final_entry(history)
  if entry is None:
    return {}
  if "split" not in entry:  # an evaluation history from before per-split entries
    rows: dict[str, dict[str, float]] = {}
    for e in history:
      rows.update(e["results"])
    entry = dict(entry, results=rows)
  return {label: entry["results"][name] for name, label in _ordered(entry)}


def entry_intervals(entry: dict | None) -> dict[str, dict[str, dict]]:
  """{method label: {metric: {mean, lo, hi}}} of one evaluation (empty without intervals)."""
  if not entry or not entry.get("intervals"):
    return {}
  return {label: entry["intervals"][name] for name, label in _ordered(entry)
          if name in entry["intervals"]}


def _metric_key(values: dict, metric: str, k: int) -> str:
  for key in (f"{metric}@{k}", f"{metric.lower()}@{k}"):
    if key in values:
      return key
  return ""


def results_table(rows: dict[str, dict[str, float]], ks: Sequence[int],
                  intervals: dict[str, dict[str, dict]] | None = None) -> str:
  """Markdown table; with `intervals` each cell reads ``mean [lo, hi]``."""
  header = ["method"] + [f"{m}@{k}" for m in METRIC_COLUMNS for k in ks]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, values in rows.items():
    cells = []
    for m in METRIC_COLUMNS:
      for k in ks:
        key = _metric_key(values, m, k)
        ci = (intervals or {}).get(name, {}).get(key)
        cell = f"{values[key]:.4f}" if key else "-"
        cells.append(f"{cell} [{ci['lo']:.4f}, {ci['hi']:.4f}]" if key and ci else cell)
    lines.append("| " + " | ".join([name] + cells) + " |")
  return "\n".join(lines)


def comparison_table(entry: dict | None, ks: Sequence[int]) -> str:
  """Paired differences against zero-shot profiles: diff [lo, hi] and P(diff > 0)."""
  if not entry or not entry.get("vs_zero_shot"):
    return ""
  metrics = [f"{m}@{k}" for m in ("ndcg", "recall") for k in ks]
  header = ["method"] + [f"{m} - zero-shot" for m in metrics]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, label in _ordered(entry):
    diffs = entry["vs_zero_shot"].get(name)
    if not diffs:
      continue
    cells = [f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] P>0={d['p_positive']:.2f}"
             if (d := diffs.get(m)) else "-" for m in metrics]
    lines.append("| " + " | ".join([label] + cells) + " |")
  return "\n".join(lines)


def readability_table(entry: dict | None) -> str:
  """distinct-1/2 and reference perplexity [interval] of the profiles of one evaluation."""
  if not entry or not entry.get("readability"):
    return ""
  lines = ["| profiles | distinct-1 | distinct-2 | perplexity under the reference writer |",
           "|---|---|---|---|"]
  for name, label in _ordered(entry):
    r = entry["readability"].get(name)
    if not r:
      continue
    ppl = r.get("reference_perplexity")
    cell = f"{ppl['mean']:.2f} [{ppl['lo']:.2f}, {ppl['hi']:.2f}]" if ppl else "-"
    lines.append(f"| {label} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {cell} |")
  return "\n".join(lines)


def phase_runs(points: Sequence[tuple]) -> list[list[tuple]]:
  """Splits (step, value) points where the steps jump: another phase ran in between."""
  runs, run = [], []
  for point in points:
    if run and point[0] != run[-1][0] + 1:
      runs.append(run)
      run = []
    run.append(point)
  return runs + ([run] if run else [])


def plot_curves(curves: Sequence[dict], path: str) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (("rl", "reward", "RL task reward"), ("rl", "loss", "RLSO loss"),
            ("cl", "loss", "InfoNCE loss"))
  window = 5  # each RL point is a handful of prompts: the running mean shows the trend
  for ax, (phase, key, title) in zip(axes, panels):
    points = [(c["step"], c[key]) for c in curves if c["phase"] == phase and key in c]
    labelled = False
    # One line per phase run, so no line (or mean) bridges the other phase's steps.
    for run in phase_runs(points):
      xs, ys = zip(*run)
      ax.plot(xs, ys, color="C0", marker=".", linewidth=1, alpha=0.6)
      if len(ys) >= 2 * window:
        smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
        ax.plot(xs[window - 1:], smooth, color="C1", linewidth=2,
                label=None if labelled else f"mean of {window}")
        labelled = True
    if labelled:
      ax.legend()
    ax.set_title(title)
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  _save_figure(fig, path)


def validation_points(history: Sequence[dict], split: str, k: int = 10,
                      method: str | None = None) -> list[tuple]:
  """(iteration, ndcg@k, lo, hi) of each evaluation on `split` before the final table.

  `method` None: the profiles of the time (each entry's own tag); else that row of
  every entry that has it (e.g. "cl_only": zero-shot profiles, the decoder of the time).
  """
  out = []
  for entry in history:
    if entry.get("split") != split or entry["tag"] == "final":
      continue
    name = method or entry["tag"]
    value = entry["results"].get(name, {}).get(f"ndcg@{k}")
    if value is None:
      continue
    ci = entry.get("intervals", {}).get(name, {}).get(f"ndcg@{k}") or {}
    out.append((entry.get("position", {}).get("iteration", 0), value, ci.get("lo", value),
                ci.get("hi", value)))
  return out


def plot_validation(history: Sequence[dict], split: str, path: str, k: int = 10) -> bool:
  """NDCG@k on `split` per iteration with its intervals, beside CL only; False under two points."""
  points = validation_points(history, split, k)
  if len(points) < 2:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  series = [("LangPTune", points, 0.0),
            ("CL only (zero-shot profiles)", validation_points(history, split, k, "cl_only"), 0.08)]
  for label, pts, shift in series:
    if not pts:
      continue
    xs, ys, lo, hi = map(np.asarray, zip(*pts))
    # A small shift keeps the two series' error bars apart.
    ax.errorbar(xs + shift, ys, yerr=[ys - lo, hi - ys], marker="o", capsize=4, label=label)
  ax.axhline(points[0][1], color="grey", linestyle="--", linewidth=1, label="zero-shot")
  ax.set_xlabel("iteration")
  ax.set_ylabel(f"NDCG@{k} ({split})")
  ax.set_title(f"Validation NDCG@{k} per iteration, 95% bootstrap intervals")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _save_figure(fig, path)
  return True


def plot_metrics(rows: dict[str, dict[str, float]], path: str, k: int = 10,
                 intervals: dict[str, dict[str, dict]] | None = None) -> None:
  """Bars of NDCG@k and Recall@k per method, with the bootstrap intervals as error bars."""
  names = list(rows)
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
  width = 0.38
  for j, metric in enumerate(("NDCG", "Recall")):
    keys = [_metric_key(rows[n], metric, k) for n in names]
    values = [rows[n].get(key, 0.0) for n, key in zip(names, keys)]
    errors = None
    cis = [(intervals or {}).get(n, {}).get(key) for n, key in zip(names, keys)]
    if intervals and all(cis):
      errors = [[v - ci["lo"] for v, ci in zip(values, cis)],
                [ci["hi"] - v for v, ci in zip(values, cis)]]
    ax.bar([i + (j - 0.5) * width for i in range(len(names))], values, width, yerr=errors,
           capsize=3, label=f"{metric}@{k}")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=15, ha="right")
  ax.legend()
  ax.set_title(f"Held-out ranking quality (@{k})" + (", 95% bootstrap intervals" if intervals
                                                       else ""))
  fig.tight_layout()
  _save_figure(fig, path)


def sample_profiles(workdir: str, tag: str, n: int) -> list[dict]:
  path = fs.path(workdir) / "profiles" / f"{tag}.jsonl"
  if n <= 0 or not path.exists():
    return []
  with path.open("r", encoding="utf-8") as f:
    return [json.loads(line) for _, line in zip(range(n), f)]


def write_report(workdir: str, history: Sequence[dict], curves: Sequence[dict],
                 ks: Sequence[int], num_samples: int = 5, validation_split: str = "val") -> str:
  """Writes results.md/json and the plots; returns the results table (markdown).

  validation.png (NDCG per iteration on `validation_split`) is drawn when that
  split was evaluated at least twice (zero-shot and after an iteration).
  """
  rows = method_rows(history)
  entry = final_entry(history)
  intervals = entry_intervals(entry)
  table = results_table(rows, ks, intervals)
  comparison = comparison_table(entry, ks)
  summary = {"methods": rows, "intervals": intervals,
             "vs_zero_shot": {label: entry["vs_zero_shot"][name] for name, label in
                              _ordered(entry) if name in entry.get("vs_zero_shot", {})}
             if entry else {},
             "split": entry.get("split") if entry else None,
             "users": entry.get("users") if entry else None,
             "bootstrap": entry.get("bootstrap", {}) if entry else {},
             "readability": entry.get("readability", {}) if entry else {},
             "evaluations": list(history)}
  _atomic_write(fs.join(workdir, "results.json"), json.dumps(summary, indent=2))
  plot_curves(curves, fs.join(workdir, "curves.png"))
  k_plot = 10 if 10 in ks else ks[0]
  plot_metrics(rows, fs.join(workdir, "metrics.png"), k=k_plot, intervals=intervals)
  validation = plot_validation(history, validation_split, fs.join(workdir, "validation.png"),
                               k_plot)
  where = ""
  if entry and entry.get("split"):
    boot = entry.get("bootstrap", {})
    where = (f"Split `{entry['split']}`, {entry.get('users', '?')} users"
             + (f"; cells: mean [{100 * boot['confidence']:.0f}% percentile-bootstrap interval "
                f"over users, {boot['samples']} resamples, seed {boot['seed']}]"
                if boot else "") + ".")
  parts = ["# LangPTune results", "", where, "", table, ""]
  if comparison:
    parts += ["Paired bootstrap difference against zero-shot profiles (same users):", "",
              comparison, ""]
  readability = readability_table(entry)
  if readability:
    parts += ["Readability of the profiles (distinct-n over words; perplexity: geometric mean "
              "over profiles):", "", readability, ""]
  parts += ["![training curves](curves.png)", "![metrics](metrics.png)", ""]
  if validation:
    parts += [f"![validation NDCG@{k_plot} per iteration](validation.png)", ""]
  tags = [e["tag"] for e in history]
  for tag in dict.fromkeys(t for t in ("zero_shot", tags[-1] if tags else "") if t):
    samples = sample_profiles(workdir, tag, num_samples)
    if samples:
      parts += [f"## Sample profiles ({tag.replace('_', ' ')})", ""]
      for s in samples:
        parts += [f"**user {s['user']}** - target rank {s['rank']}", "",
                  "> " + s["profile"].replace("\n", "\n> "), ""]
  _atomic_write(fs.join(workdir, "results.md"), "\n".join(parts))
  return table
