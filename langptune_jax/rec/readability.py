"""How readable a set of profiles is: distinct-n and perplexity under the reference writer.

* distinct-n: unique word n-grams over all word n-grams of the profiles. Low
  values mean the writer repeats itself (loops, one template for every user).
* reference perplexity: exp of the mean negative log-likelihood per profile
  token under the frozen reference writer (the model before RL). It rises when
  RL drifts the profiles away from language the base model finds natural (token
  soup that still ranks well); the geometric mean over profiles is reported with
  a bootstrap interval over users.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from langptune_jax.rec import stats as stats_lib


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Unique word n-grams / all word n-grams over `texts` (0.0 when there are none)."""
  if n < 1:
    raise ValueError(f"n={n}: must be >= 1")
  grams = [tuple(words[i:i + n]) for words in (t.lower().split() for t in texts)
           for i in range(len(words) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def log_perplexities(logp_sums: np.ndarray, token_counts: np.ndarray) -> np.ndarray:
  """Per-profile log-perplexity, -logp / tokens; NaN for an empty profile."""
  logp_sums = np.asarray(logp_sums, np.float64)
  counts = np.asarray(token_counts, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, -logp_sums / np.maximum(counts, 1.0), np.nan)


def summarize(texts: Sequence[str], logp_sums=None, token_counts=None, *, samples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> dict:
  """distinct-1/2 and, given reference log-probs, the perplexity with its interval."""
  out = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
  if logp_sums is None:
    return out
  logs = log_perplexities(logp_sums, token_counts)
  logs = logs[np.isfinite(logs)]
  if len(logs) == 0:
    return out
  ci = stats_lib.bootstrap_ci(logs, samples=max(samples, 1), confidence=confidence, seed=seed)
  out["reference_perplexity"] = {k: float(np.exp(v)) for k, v in ci.items()}
  return out
