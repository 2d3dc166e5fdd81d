"""Confidence intervals over users: percentile bootstrap and paired comparisons.

Every metric of an evaluation is a mean over held-out users of a per-user value
(hit, 1/rank, 1/log2(rank+1)). Resampling users with replacement gives the
spread of that mean; resampling the *same* users for two methods gives the
spread of their difference, which is what decides whether one beats the other.
Draws come from a seeded generator, so a report is reproducible.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from langptune_jax.rec import metrics as metrics_lib


def resample_indices(num_users: int, samples: int, seed: int) -> np.ndarray:
  """i64[samples, num_users]: user indices drawn with replacement."""
  if num_users < 1:
    raise ValueError("bootstrap needs at least one user")
  return np.random.default_rng(seed).integers(0, num_users, size=(samples, num_users))


def _bounds(means: np.ndarray, confidence: float) -> tuple[float, float]:
  tail = 100.0 * (1.0 - confidence) / 2.0
  lo, hi = np.percentile(means, [tail, 100.0 - tail])
  return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], *, samples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, indices: np.ndarray | None = None) -> dict[str, float]:
  """Mean of `values` and its percentile-bootstrap interval {mean, lo, hi}."""
  values = np.asarray(values, np.float64)
  if indices is None:
    indices = resample_indices(len(values), samples, seed)
  lo, hi = _bounds(values[indices].mean(axis=1), confidence)
  return {"mean": float(values.mean()), "lo": lo, "hi": hi}


def paired_bootstrap(values: Sequence[float], reference: Sequence[float], *, samples: int = 1000,
                     confidence: float = 0.95, seed: int = 0,
                     indices: np.ndarray | None = None) -> dict[str, float]:
  """Mean difference values - reference over the same users, its interval, and P(diff > 0).

  ``p_positive`` is the fraction of resamples whose mean difference is > 0.
  """
  a, b = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired bootstrap needs the same users: {a.shape} vs {b.shape}")
  diff = a - b
  if indices is None:
    indices = resample_indices(len(diff), samples, seed)
  means = diff[indices].mean(axis=1)
  lo, hi = _bounds(means, confidence)
  return {"diff": float(diff.mean()), "lo": lo, "hi": hi,
          "p_positive": float(np.mean(means > 0))}


def summarize_ranks(ranks: Mapping[str, Sequence[int]], ks: Sequence[int], num_items: int, *,
                    reference: str = "zero_shot", samples: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, dict]:
  """Intervals for every method and metric, and paired differences against `reference`.

  Args:
    ranks: method -> 1-based target rank per user; all methods rank the same users
      in the same order.
    ks, num_items: the metric cutoffs and the catalogue size.
    reference: the method the paired comparison is against (absent: none).
    samples: bootstrap resamples (0: no intervals, an empty result).

  Returns:
    ``{"intervals": {method: {metric: {mean, lo, hi}}},
    "vs_reference": {method: {metric: {diff, lo, hi, p_positive}}}, "reference",
    "samples", "confidence", "seed", "users"}``.
  """
  if samples <= 0 or not ranks:
    return {}
  per_user = {name: {m: np.asarray(v) for m, v in metrics_lib.per_user_metrics(
      np.asarray(r), tuple(ks), num_items).items()} for name, r in ranks.items()}
  num_users = {len(np.asarray(r)) for r in ranks.values()}
  if len(num_users) != 1:
    raise ValueError(f"methods rank different numbers of users: {sorted(num_users)}")
  # One set of resamples for every method: the intervals are paired by construction.
  indices = resample_indices(num_users.pop(), samples, seed)
  out = {"intervals": {}, "vs_reference": {}, "reference": reference, "samples": int(samples),
         "confidence": float(confidence), "seed": int(seed), "users": int(indices.shape[1])}
  for name, values in per_user.items():
    out["intervals"][name] = {m: bootstrap_ci(v, confidence=confidence, indices=indices)
                              for m, v in values.items()}
    if reference in per_user and name != reference:
      out["vs_reference"][name] = {
          m: paired_bootstrap(v, per_user[reference][m], confidence=confidence, indices=indices)
          for m, v in values.items()}
  return out
