"""Readability of profiles: distinct-n, and perplexity under the frozen reference writer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_lora import VOCAB, perturb_adapters, tiny

from langptune_jax import parallel, sampling
from langptune_jax.models import finetune, lora
from langptune_jax.rec import readability
from langptune_jax.train import profiles


def test_distinct_n_counts_unique_word_ngrams():
  texts = ["Loves sci-fi loves sci-fi", "loves dramas"]
  # words: loves sci-fi loves sci-fi | loves dramas -> 3 unique of 6
  assert readability.distinct_n(texts, 1) == pytest.approx(3 / 6)
  # bigrams: (loves sci-fi) (sci-fi loves) (loves sci-fi) | (loves dramas) -> 3 unique of 4
  assert readability.distinct_n(texts, 2) == pytest.approx(3 / 4)
  assert readability.distinct_n(["one"], 2) == 0.0  # no bigram at all
  with pytest.raises(ValueError, match="n=0"):
    readability.distinct_n(texts, 0)


def test_perplexity_is_the_geometric_mean_over_profiles_with_an_interval():
  # Per-token log-probs -1 (3 tokens) and -3 (2 tokens): log-perplexities 1 and 3.
  summary = readability.summarize(["a b", "c d"], logp_sums=[-3.0, -6.0], token_counts=[3, 2],
                                  samples=200, seed=0)
  ppl = summary["reference_perplexity"]
  assert ppl["mean"] == pytest.approx(np.exp(2.0))
  assert np.exp(1.0) - 1e-9 <= ppl["lo"] <= ppl["mean"] <= ppl["hi"] <= np.exp(3.0) + 1e-9
  # An empty profile has no perplexity and does not count.
  empty = readability.summarize(["a", ""], logp_sums=[-2.0, 0.0], token_counts=[2, 0],
                                samples=50)
  assert empty["reference_perplexity"]["mean"] == pytest.approx(np.e)
  assert "reference_perplexity" not in readability.summarize(["a b"])


def _rows(num, prompt_len=5, response_len=4, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, VOCAB, (num, prompt_len)).astype(np.int32)
  prompt_mask = np.ones((num, prompt_len), bool)
  prompt_mask[::2, :2] = False  # left padding on every other row
  response = rng.integers(2, VOCAB, (num, response_len)).astype(np.int32)
  response_mask = np.ones((num, response_len), bool)
  response_mask[1::3, -2:] = False  # stopped early
  return prompt, prompt_mask, response, response_mask


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_reference_logprobs_score_with_adapters_off_in_any_batching(shape):
  model = tiny(tie=False)
  lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  reference = finetune.ReferencePolicy.from_model(model, "lora")
  rows = _rows(7)
  base = np.asarray(sampling.sequence_logprobs(model, *map(jnp.asarray, rows)))
  perturb_adapters(model)  # the policy moves; the reference must not
  policy = np.asarray(sampling.sequence_logprobs(model, *map(jnp.asarray, rows)))
  assert np.abs(policy - base).max() > 1e-2
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape))),
                            jax.devices()[:int(np.prod(shape))])
  # 7 rows in batches of 3 (rounded up to the data-parallel size), the last one padded.
  got = profiles.reference_logprobs(model, reference, *rows, batch_size=3, mesh=mesh)
  assert got.shape == (7,)
  np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-5)
