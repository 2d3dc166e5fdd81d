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

import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

METRIC_COLUMNS = ("Recall", "NDCG", "MRR")
# Baselines in table order, with their display names (docs/method.md §9).
_BASELINES = (("random", "random"), ("popularity", "popularity"), ("sasrec", "SASRec"),
              ("reference_query", "reference query (last item)"),
              ("history", "raw history (fine-tuned decoder)"))


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def method_rows(history: Sequence[dict]) -> dict[str, dict[str, float]]:
  """{method: metrics}: baselines, zero-shot profiles and the final LangPTune profiles."""
  rows: dict[str, dict[str, float]] = {}
  for entry in history:
    for name, values in entry["results"].items():
      rows[name] = values
  evaluations = [e["tag"] for e in history if e["tag"].startswith("iteration_")]
  ordered = {label: rows[name] for name, label in _BASELINES if name in rows}
  if "zero_shot" in rows:
    ordered["zero-shot profiles"] = rows["zero_shot"]
  if evaluations:
    ordered[f"LangPTune ({evaluations[-1].replace('_', ' ')})"] = rows[evaluations[-1]]
  return ordered


def _metric_key(values: dict, metric: str, k: int) -> str:
  for key in (f"{metric}@{k}", f"{metric.lower()}@{k}"):
    if key in values:
      return key
  return ""


def results_table(rows: dict[str, dict[str, float]], ks: Sequence[int]) -> str:
  header = ["method"] + [f"{m}@{k}" for m in METRIC_COLUMNS for k in ks]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, values in rows.items():
    cells = []
    for m in METRIC_COLUMNS:
      for k in ks:
        key = _metric_key(values, m, k)
        cells.append(f"{values[key]:.4f}" if key else "-")
    lines.append("| " + " | ".join([name] + cells) + " |")
  return "\n".join(lines)


def plot_curves(curves: Sequence[dict], path: str) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (("rl", "reward", "RL task reward"), ("rl", "loss", "RLSO loss"),
            ("cl", "loss", "InfoNCE loss"))
  for ax, (phase, key, title) in zip(axes, panels):
    points = [(c["step"], c[key]) for c in curves if c["phase"] == phase and key in c]
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, marker=".", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def plot_metrics(rows: dict[str, dict[str, float]], path: str, k: int = 10) -> None:
  names = list(rows)
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
  width = 0.38
  for j, metric in enumerate(("NDCG", "Recall")):
    values = [rows[n].get(_metric_key(rows[n], metric, k), 0.0) for n in names]
    ax.bar([i + (j - 0.5) * width for i in range(len(names))], values, width,
           label=f"{metric}@{k}")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=15, ha="right")
  ax.legend()
  ax.set_title(f"Held-out ranking quality (@{k})")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def sample_profiles(workdir: str, tag: str, n: int) -> list[dict]:
  path = os.path.join(workdir, "profiles", f"{tag}.jsonl")
  if not os.path.exists(path) or n <= 0:
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for _, line in zip(range(n), f)]


def write_report(workdir: str, history: Sequence[dict], curves: Sequence[dict],
                 ks: Sequence[int], num_samples: int = 5) -> str:
  """Writes results.md/json and the plots; returns the results table (markdown)."""
  rows = method_rows(history)
  table = results_table(rows, ks)
  _atomic_write(os.path.join(workdir, "results.json"),
                json.dumps({"methods": rows, "evaluations": list(history)}, indent=2))
  plot_curves(curves, os.path.join(workdir, "curves.png"))
  plot_metrics(rows, os.path.join(workdir, "metrics.png"), k=10 if 10 in ks else ks[0])
  parts = ["# LangPTune results", "", table, "", "![training curves](curves.png)",
           "![metrics](metrics.png)", ""]
  tags = [e["tag"] for e in history]
  for tag in (t for t in ("zero_shot", tags[-1] if tags else "") if t):
    samples = sample_profiles(workdir, tag, num_samples)
    if samples:
      parts += [f"## Sample profiles ({tag.replace('_', ' ')})", ""]
      for s in samples:
        parts += [f"**user {s['user']}** - target rank {s['rank']}", "",
                  "> " + s["profile"].replace("\n", "\n> "), ""]
  _atomic_write(os.path.join(workdir, "results.md"), "\n".join(parts))
  return table
