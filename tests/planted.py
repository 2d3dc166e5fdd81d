"""A planted recommendation task for training tests, with tiny random models.

Items belong to one of a few genres and their text names the genre; each user
prefers one genre: every history item and the target are of that genre. A
profile that names the user's genre ranks the target well, so a policy that
learns to write the genre word earns a higher reward, and a decoder trained to
align profiles with targets improves recall. Everything is built in memory: a
word-level tokenizer, a tiny Llama-family encoder and a tiny BERT decoder.
"""

from __future__ import annotations

import numpy as np
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

from langptune_jax.models import bert as bert_lib
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.models import transformer
from langptune_jax.train.run_data import RunData, UserSplit

GENRES = ("action", "comedy", "drama", "horror")
FILLERS = ("film", "movie", "story", "about", "with", "the", "user", "likes", "watched", "a")
SPECIALS = ("<pad>", "<unk>", "<eos>", "<bos>")


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
  vocab = {w: i for i, w in enumerate(SPECIALS + GENRES + FILLERS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
      bos_token="<bos>")


def tiny_encoder(vocab_size: int, seed: int = 0, **overrides) -> transformer.Decoder:
  kwargs = dict(family="llama", vocab_size=vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, mlp_dim=64, tie_embeddings=False, eos_ids=(2,),
                pad_id=0)
  kwargs.update(overrides)
  return transformer.Decoder(transformer.DecoderConfig(**kwargs), rngs=nnx.Rngs(seed))


def tiny_decoder(vocab_size: int, seed: int = 1, num_layers: int = 1) -> embedder_lib.Embedder:
  cfg = bert_lib.BertConfig(vocab_size=vocab_size, hidden_size=32, num_layers=num_layers,
                            num_heads=4, intermediate_size=64, max_position_embeddings=64)
  return embedder_lib.Embedder(bert_lib.Bert(cfg, rngs=nnx.Rngs(seed)), family="bert",
                               pooling="mean", normalize=True)


def _left_pad(rows: list[list[int]], length: int, pad: int):
  tokens = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    r = r[-length:]
    tokens[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  return tokens, mask


def planted_data(tokenizer, *, users_per_split=(32, 16, 16), items_per_genre: int = 6,
                 history_len: int = 3, prompt_len: int = 16, item_len: int = 8,
                 seed: int = 0) -> RunData:
  rng = np.random.default_rng(seed)
  item_text, item_genre = [], []
  for g, genre in enumerate(GENRES):
    for j in range(items_per_genre):
      filler = FILLERS[(j + g) % len(FILLERS)]
      item_text.append(f"{genre} {filler}")
      item_genre.append(g)
  item_genre = np.asarray(item_genre)
  enc = tokenizer(item_text, padding="max_length", max_length=item_len, truncation=True)
  item_tokens = np.asarray(enc["input_ids"], np.int32)
  item_mask = np.asarray(enc["attention_mask"], np.int32)

  def split(n: int, offset: int) -> UserSplit:
    rows, hist, targets, texts = [], [], [], []
    for u in range(n):
      g = rng.integers(len(GENRES))
      items = rng.permutation(np.flatnonzero(item_genre == g))[:history_len + 1]
      hist.append(items[:history_len])
      targets.append(items[history_len])
      text = "user watched " + " ".join(item_text[i] for i in items[:history_len])
      texts.append(text)
      rows.append(tokenizer(text)["input_ids"])
    tokens, mask = _left_pad(rows, prompt_len, tokenizer.pad_token_id)
    return UserSplit(np.arange(offset, offset + n, dtype=np.int32), tokens, mask,
                     np.asarray(hist, np.int32), np.asarray(targets, np.int32), texts)

  ntr, nva, nte = users_per_split
  return RunData(split(ntr, 0), split(nva, ntr), split(nte, ntr + nva), item_tokens, item_mask,
                 item_text)
