"""The authors' data protocol (the config default) on the small Amazon files of fixtures_data.

fixtures_data's hand-computed outcomes follow the alternative protocol; here the
same files go through the defaults: repeated reviews kept, both length filters
applied together before one k-core, and a catalogue of training items only.
"""

import fixtures_data as fx
import pytest

from langptune_jax.data import loader, prepare, prompts
from langptune_jax.weights import tokenizer as tok_lib

AUTHORS = dict(filter_order="authors", keep_duplicate_reviews=True, catalogue="train_items")


@pytest.fixture(scope="module")
def authors_built(tmp_path_factory, smollm2_gguf, minilm_dir):
  folder = tmp_path_factory.mktemp("amazon_authors")
  config = fx.amazon_config(folder, smollm2_gguf, minilm_dir, **AUTHORS)
  path, stats = prepare.prepare(config)
  return path, stats


def test_defaults_are_the_authors_protocol():
  from langptune_jax import config as config_lib
  base = config_lib.load_config(fx.BASE_CONFIG)
  assert {k: base.data[k] for k in AUTHORS} == AUTHORS
  assert base.data.prompt_ending == "authors"


def test_length_filters_together_then_one_kcore(authors_built):
  _, stats = authors_built
  names = [s["filter"] for s in stats["filters"]]
  both = [s for s in stats["filters"] if s["filter"].startswith("item text > 64")]
  assert len(both) == 1 and "prompt > 512" in both[0]["filter"]
  # L0 L1 L2 (long item) and P0 (long prompt) leave in the same stage.
  assert (both[0]["users_before"] - both[0]["users_after"], both[0]["long_items"]) == (4, 1)
  assert both[0]["long_prompt_users"] == 1
  assert sum(n.startswith("k-core after") for n in names) == 1


def test_duplicates_kept_and_catalogue_is_train_items(authors_built):
  path, stats = authors_built
  assert "review: duplicate (user, item)" not in stats["skipped"]
  items = loader.load_split(path, "items")
  # T is reviewed by held-out users only: it is not a training item, so it is not ranked.
  assert items["item_key"] == fx.COMMONS
  train = loader.load_split(path, "train")
  assert train["user_key"] == fx.EXPECTED["train"]
  for split in ("train", "val", "test"):
    d = loader.load_split(path, split)
    assert d["target"].max() < len(fx.COMMONS) and d["history"].max() < len(fx.COMMONS)


def test_gemma_prompt_ending(gemma3_gguf, smollm2_gguf):
  gemma = tok_lib.load_tokenizer(gemma3_gguf)
  content = "  padded \n"
  authors = prompts.wrap_chat(gemma, content, "authors")
  trimmed = prompts.wrap_chat(gemma, content, "trimmed")
  assert authors.endswith("<start_of_turn>model") and trimmed.endswith("<start_of_turn>model\n")
  assert "user\n  padded \n<end_of_turn>" in authors
  assert "user\npadded<end_of_turn>" in trimmed
  # A ChatML template is the same under both endings.
  smol = tok_lib.load_tokenizer(smollm2_gguf)
  assert prompts.wrap_chat(smol, "Hi", "authors") == prompts.wrap_chat(smol, "Hi", "trimmed")
  with pytest.raises(ValueError, match="data.prompt_ending='x'"):
    prompts.wrap_chat(smol, "Hi", "x")
