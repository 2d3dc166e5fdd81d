"""Recommendation side: ranking metrics, cosine retrieval over the catalogue, rewards, baselines."""
