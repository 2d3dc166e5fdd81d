"""Bootstrap intervals over users: coverage on a known distribution, paired signs, seeding."""

import numpy as np
import pytest

from langptune_jax.rec import stats


def test_percentile_interval_covers_the_true_mean_at_the_nominal_rate():
  # Bernoulli(0.3) hits of 200 users, 200 independent studies (fixed seeds): a 95%
  # interval must contain 0.3 in about 95% of them (binomial sd ~1.5 points).
  rng = np.random.default_rng(123)
  covered = 0
  for study in range(200):
    hits = (rng.random(200) < 0.3).astype(float)
    ci = stats.bootstrap_ci(hits, samples=500, confidence=0.95, seed=study)
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    covered += ci["lo"] <= 0.3 <= ci["hi"]
  assert 0.91 <= covered / 200 <= 0.99, covered


def test_interval_width_follows_the_standard_error():
  values = np.random.default_rng(0).normal(size=400)
  ci = stats.bootstrap_ci(values, samples=2000, seed=1)
  # 95% normal interval half-width: 1.96 * sd / sqrt(n).
  assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(1.96 * values.std() / 20, rel=0.1)


def test_paired_difference_sign_and_probability():
  rng = np.random.default_rng(0)
  reference = rng.random(300)
  better = reference + 0.05 + 0.01 * rng.normal(size=300)
  up = stats.paired_bootstrap(better, reference, samples=500, seed=0)
  assert up["diff"] == pytest.approx(0.05, abs=0.005) and up["lo"] > 0
  assert up["p_positive"] == 1.0
  down = stats.paired_bootstrap(reference, better, samples=500, seed=0)
  assert down["hi"] < 0 and down["p_positive"] == 0.0
  # Same users in both: the pairing removes the large per-user spread.
  unpaired_width = 2 * 1.96 * reference.std() / np.sqrt(300)
  assert up["hi"] - up["lo"] < unpaired_width / 5


def test_summarize_ranks_is_seeded_and_paired():
  ranks = {"zero_shot": [1, 50, 3, 80, 2, 40], "trained": [1, 2, 3, 4, 2, 5]}
  a = stats.summarize_ranks(ranks, (5,), 100, samples=200, seed=7)
  b = stats.summarize_ranks(ranks, (5,), 100, samples=200, seed=7)
  assert a == b
  ci = a["intervals"]["trained"]["recall@5"]
  assert ci["mean"] == 1.0 and ci["lo"] == ci["hi"] == 1.0
  assert a["intervals"]["zero_shot"]["recall@5"]["mean"] == pytest.approx(0.5)
  vs = a["vs_reference"]["trained"]["recall@5"]
  assert vs["diff"] == pytest.approx(0.5) and vs["p_positive"] > 0.9
  assert "zero_shot" not in a["vs_reference"]
  assert stats.summarize_ranks(ranks, (5,), 100, samples=0) == {}
  with pytest.raises(ValueError, match="different numbers of users"):
    stats.summarize_ranks({"a": [1, 2], "b": [1]}, (5,), 100, samples=10)
