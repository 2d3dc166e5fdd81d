"""The catalogue index: reused while decoder weights and item texts match, rebuilt otherwise."""

import json

import numpy as np

from langptune_jax.serve import index as index_lib


class CountingEmbed:
  """A stand-in ranking model: the embedding is the token ids themselves, and calls are counted."""

  def __init__(self):
    self.calls = 0

  def __call__(self, tokens, mask):
    self.calls += 1
    return np.asarray(tokens, np.float32) + 1.0


def _build(folder, state, texts, embed):
  tokens = np.arange(len(texts) * 4, dtype=np.int32).reshape(len(texts), 4)
  digest = index_lib.fingerprint(state, texts, 4)
  return index_lib.load_or_build(folder, digest, embed, tokens, np.ones_like(tokens), 2)


def test_index_is_reused_only_when_weights_and_texts_match(tmp_path):
  state = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
  texts = ["a film", "another film", "a third"]
  embed = CountingEmbed()
  first, rebuilt = _build(tmp_path, state, texts, embed)
  assert rebuilt and embed.calls == 2 and first.shape == (3, 4)
  np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-6)
  again, rebuilt = _build(tmp_path, state, texts, embed)
  assert not rebuilt and embed.calls == 2
  np.testing.assert_array_equal(again, first)

  changed = dict(state, b=np.array([0.0, 1e-3], np.float32))  # one weight moved
  _, rebuilt = _build(tmp_path, changed, texts, embed)
  assert rebuilt and embed.calls == 4
  _, rebuilt = _build(tmp_path, changed, texts[:2] + ["a third!"], embed)  # one text edited
  assert rebuilt and embed.calls == 6
  _, rebuilt = _build(tmp_path, changed, texts[:2] + ["a third!"], embed)
  assert not rebuilt and embed.calls == 6


def test_a_torn_index_is_rebuilt(tmp_path):
  state = {"w": np.ones(2, np.float32)}
  embed = CountingEmbed()
  _build(tmp_path, state, ["x", "y"], embed)
  meta = json.loads((tmp_path / "meta.json").read_text())
  (tmp_path / "embeddings.npy").write_bytes(b"not an array")
  _, rebuilt = _build(tmp_path, state, ["x", "y"], embed)
  assert rebuilt and meta["num_items"] == 2
