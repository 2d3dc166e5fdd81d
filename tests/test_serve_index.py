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


def test_runs_without_checkpoints_get_no_index(tmp_path):
  class Run:  # what index_trained_run reads first
    checkpointer = None
    workdir = str(tmp_path)
  assert index_lib.index_trained_run(Run()) is None
  assert not (tmp_path / index_lib.INDEX_DIR).exists()


def test_train_leaves_the_index_that_recommend_reuses(served_run, served_session, monkeypatch):
  import io

  from langptune_jax.models import embedder as embedder_lib
  from langptune_jax.rec import retrieval
  from langptune_jax.serve import recommend as recommend_lib
  cfg, workdir = served_run
  folder = workdir / index_lib.INDEX_DIR
  meta = json.loads((folder / "meta.json").read_text())
  assert meta["num_items"] == len(served_session.titles)
  assert not served_session.index_rebuilt  # the session found train's index
  np.testing.assert_array_equal(np.load(folder / "embeddings.npy"),
                                served_session.item_embeddings)

  def no_embedding(*args, **kwargs):
    raise AssertionError("the catalogue was embedded again")
  monkeypatch.setattr(retrieval, "embed_catalogue", no_embedding)
  out = io.StringIO()
  assert recommend_lib.recommend(cfg, workdir, profile="space adventure", out=out) == 0
  assert "rank    score" in out.getvalue()

  # One edited item text: the fingerprint no longer matches, the index is rebuilt.
  monkeypatch.undo()
  texts = list(served_session.data.item_text)
  texts[0] = texts[0].replace("Genres:", "Genres: Horror,", 1)
  assert texts[0] != served_session.data.item_text[0]
  ranker = served_session.ranker
  tokens, mask = embedder_lib.tokenize_texts(ranker.tokenizer, texts, ranker.max_len)
  digest = index_lib.fingerprint(ranker.state, texts, ranker.max_len)
  rebuilt, again = index_lib.load_or_build(folder, digest, ranker.embed_rows, tokens, mask,
                                           int(cfg.decoder.embed_batch_size))
  assert again and json.loads((folder / "meta.json").read_text())["fingerprint"] == digest
  assert not np.allclose(rebuilt[0], served_session.item_embeddings[0], atol=1e-4)
  np.testing.assert_allclose(rebuilt[1:], served_session.item_embeddings[1:], atol=1e-4)
  # Back to the run's texts for the tests that follow (a rebuild, like any mismatch).
  index_lib.load_or_build(folder, index_lib.fingerprint(ranker.state, served_session.data.item_text,
                                                        ranker.max_len),
                          ranker.embed_rows, served_session.data.item_tokens,
                          served_session.data.item_mask, int(cfg.decoder.embed_batch_size))
