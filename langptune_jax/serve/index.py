"""The catalogue index: every item's decoder embedding, saved next to the checkpoint.

Embedding a large catalogue takes minutes, so it is done once and kept in
``<dir>/catalogue_index/``. A fingerprint of the decoder weights and the item
texts travels with it: a matching index is reused, any other is rebuilt (with a
progress bar), so a re-trained decoder or an edited catalogue never ranks with
stale vectors. ``train`` builds it when it finishes (:func:`index_trained_run`),
so the first ``recommend`` or ``serve`` of a run starts without embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from langptune_jax import fs
from langptune_jax.rec import retrieval

INDEX_DIR = "catalogue_index"
_EMBEDDINGS = "embeddings.npy"
_META = "meta.json"


def fingerprint(ranker_state, item_text: Sequence[str], max_len: int) -> str:
  """sha256 over the decoder's arrays (in tree order), the item texts and the window."""
  digest = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(ranker_state)
  digest.update(str(treedef).encode())
  for leaf in leaves:
    array = np.asarray(jax.device_get(leaf))
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(str(max_len).encode())
  for text in item_text:
    digest.update(text.encode())
    digest.update(b"\x00")
  return digest.hexdigest()


def load(folder: pathlib.Path, expected: str) -> np.ndarray | None:
  """The saved embeddings when their fingerprint matches, else None."""
  try:
    meta = json.loads((folder / _META).read_text())
    if meta.get("fingerprint") != expected:
      return None
    return np.load(io.BytesIO((folder / _EMBEDDINGS).read_bytes()))
  except (OSError, ValueError):
    return None


def save(folder: pathlib.Path, embeddings: np.ndarray, digest: str) -> None:
  """Writes the embeddings, then the fingerprint (last, so a torn write never matches)."""
  fs.makedirs(folder)
  if (folder / _META).exists():
    (folder / _META).unlink()
  buffer = io.BytesIO()
  np.save(buffer, embeddings, allow_pickle=False)
  fs.write_bytes(folder / _EMBEDDINGS, buffer.getvalue())
  fs.write_text(folder / _META, json.dumps({"fingerprint": digest,
                                            "num_items": int(embeddings.shape[0]),
                                            "dim": int(embeddings.shape[1])}))


def load_or_build(folder: pathlib.Path, digest: str, embed_fn: Callable, item_tokens: np.ndarray,
                  item_mask: np.ndarray, batch_size: int) -> tuple[np.ndarray, bool]:
  """(embeddings [N, D] L2-normalised, whether they were rebuilt)."""
  cached = load(folder, digest)
  if cached is not None and cached.shape[0] == item_tokens.shape[0]:
    return cached, False
  embeddings = retrieval.embed_catalogue(embed_fn, item_tokens, item_mask, batch_size,
                                         desc="indexing the catalogue")
  save(folder, embeddings, digest)
  return embeddings, True


def index_trained_run(trainer) -> pathlib.Path | None:
  """Indexes the catalogue with a finished run's decoder, where serving looks for it.

  Every process calls it (on several hosts the decoder's arrays are gathered);
  process 0 embeds and writes. The decoder is read as serving reads it (one
  device, the same fingerprint), so a session on the last checkpoint reuses it.
  """
  from langptune_jax.serve.ranker import Ranker
  if trainer.checkpointer is None:
    return None  # nothing to serve: recommend and serve read a checkpoint
  graphdef, state = nnx.split(trainer.ranker_state.model)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    state = multihost_utils.process_allgather(state, tiled=True)
  if jax.process_index() != 0:
    return None
  settings, data = trainer.settings, trainer.data
  ranker = Ranker(nnx.merge(graphdef, state), trainer.ranker_tokenizer,
                  settings.data.decoder_max_len)
  folder = fs.path(trainer.workdir) / INDEX_DIR  # a bucket address stays one
  digest = fingerprint(ranker.state, data.item_text, ranker.max_len)
  embeddings, _ = load_or_build(folder, digest, ranker.embed_rows, data.item_tokens,
                                data.item_mask, settings.decoder.embed_batch_size)
  print(f"catalogue index: {folder} ({embeddings.shape[0]} items)")
  return folder
