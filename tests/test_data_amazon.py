"""Amazon Reviews 2023 pipeline: each filter against hand-computed outcomes (fixtures_data)."""

import gzip
import json
import pathlib
import types

import fixtures_data as fx
import numpy as np
import pytest

from langptune_jax.data import core, loader, prepare, prompts, review_scan
from langptune_jax.weights import tokenizer as tok_lib


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_gguf, minilm_dir):
  folder = tmp_path_factory.mktemp("amazon")
  config = fx.amazon_config(folder, smollm2_gguf, minilm_dir)
  path, stats = prepare.prepare(config)
  return config, path, stats


def _stage(stats, name):
  matches = [s for s in stats["filters"] if s["filter"] == name]
  assert matches, f"no filter stage {name!r} in {[s['filter'] for s in stats['filters']]}"
  return matches[0]


def test_kcore_rounds_hand_example():
  # k=2: u3 (1 review) goes in round 1, then i2 (left with u2 only), then u2.
  user = [0, 0, 1, 1, 2, 2, 3]
  item = [0, 1, 0, 1, 1, 2, 2]
  inter = core.Interactions.from_unsorted(user, item, np.arange(7), np.arange(7), np.ones(7))
  out, rounds = core.kcore(inter, 2)
  assert rounds == 3
  assert sorted(zip(out.user.tolist(), out.item.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
  same, zero_rounds = core.kcore(out, 2)
  assert zero_rounds == 0 and len(same) == 4


def test_time_order_and_first_users():
  # Same timestamp: file position breaks the tie.
  inter = core.Interactions.from_unsorted([1, 1, 0, 0], [5, 6, 7, 8], [20, 20, 30, 10],
                                          [4, 3, 2, 1], np.ones(4))
  assert inter.item.tolist() == [8, 7, 6, 5]
  assert inter.rank_in_user().tolist() == [0, 1, 0, 1]
  assert core.users_by_first_interaction(inter).tolist() == [0, 1]
  assert set(core.first_users(inter, 1).user.tolist()) == {0}


def test_item_text_and_prompt_format():
  text = prompts.amazon_item_text("Heat", 4.7, ["A heist.", "Classic."], ["Movies & TV", "Drama"],
                                  "9.99")
  assert text == ("Title: Heat\nDescription: (average rating: 4.7) A heist. Classic.\n"
                  "Category: Movies & TV, Drama\nPrice: 9.99")
  block = prompts.review_block(text, 5.0, "Loved it.")
  assert block.endswith("\nReview from the user: (rating: 5.0) Loved it.")
  assert prompts.prompt_content("Do X.", ["a", "b"]) == "Do X.\n\na\n\nb"


def _data(**fields):
  return types.SimpleNamespace(**fields)  # the two fields the data section is read for


def test_instruction_resolution():
  assert prompts.resolve_instruction(_data(domain="books", instruction="")) == \
      prompts.BOOKS_INSTRUCTION
  # The base config's default (the Movies & TV sentence) follows the domain...
  assert prompts.resolve_instruction(
      _data(domain="movielens", instruction=prompts.MOVIES_TV_INSTRUCTION)) == \
      prompts.MOVIELENS_INSTRUCTION
  # ... while a custom sentence wins.
  assert prompts.resolve_instruction(_data(domain="books", instruction="Mine.")) == "Mine."
  from langptune_jax import config as config_lib
  base = config_lib.load_config(fx.BASE_CONFIG)
  assert base.data.instruction == prompts.MOVIES_TV_INSTRUCTION


def test_gguf_tokenizer_chat_template(smollm2_gguf, minilm_dir):
  tok = tok_lib.load_tokenizer(smollm2_gguf)
  assert tok.chat_template == tok_lib.gguf_chat_template(smollm2_gguf)
  wrapped = prompts.wrap_chat(tok, "Hello")
  assert "<|im_start|>user\nHello<|im_end|>" in wrapped
  assert wrapped.endswith("<|im_start|>assistant\n")
  assert tok_lib.eos_ids(tok)[0] == tok.eos_token_id
  dec = tok_lib.load_tokenizer(minilm_dir)
  # MiniLM's tokenizer.json truncates at 128; the length filter must see true lengths.
  assert len(tok_lib.batch_encode(dec, ["word " * 300])[0]) == 302
  assert tok_lib.pad_id(dec) == 0


def test_tokenizer_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    tok_lib.load_tokenizer(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tok_lib.load_tokenizer(tmp_path)


def test_filters_match_hand_computed(built):
  _, _, stats = built
  assert _stage(stats, "meta rows without a title")["rows_after"] == 11
  kc = _stage(stats, "k-core(3)")
  assert (kc["users_before"], kc["users_after"], kc["rounds"]) == (25, 24, 1)
  long_items = _stage(stats, "item text > 64 decoder tokens")
  assert (long_items["users_after"], long_items["long_items"]) == (21, 1)
  assert _stage(stats, "k-core after item length(3)")["items_after"] == 9
  assert _stage(stats, "prompt > 512 encoder tokens")["users_after"] == 20
  unseen = _stage(stats, "held-out interactions on items unseen in training")
  assert unseen["interactions_before"] - unseen["interactions_after"] == 3  # T, thrice
  assert _stage(stats, "held-out users < 4 interactions")["users_after"] == 4
  assert _stage(stats, "train users without a target")["users_after"] == 14
  assert stats["users_before_split"] == {"train": 15, "held_out": 5}
  assert {k: v["users"] for k, v in stats["splits"].items() if k != "items"} == \
      {"train": 14, "val": 2, "test": 2}


def test_skipped_records_counted(built):
  _, _, stats = built
  skipped = {k: v["count"] for k, v in stats["skipped"].items()}
  assert skipped == {
      "blank line": 1, "invalid UTF-8": 1, "malformed JSON": 2,
      "meta: duplicate parent_asin": 1, "review: duplicate (user, item)": 1,
      "review: missing or null timestamp/rating/text": 2,
      "review: missing user_id/parent_asin": 1,
      "review: unknown item (no meta row with a title)": 2}
  assert all(w.split(":")[1].isdigit() for v in stats["skipped"].values() for w in v["first"])


def test_splits_users_histories_targets(built):
  config, path, _ = built
  train = loader.load_split(path, "train")
  assert train["user_key"] == fx.EXPECTED["train"]
  held = loader.load_split(path, "val")["user_key"] + loader.load_split(path, "test")["user_key"]
  assert sorted(held) == sorted(fx.EXPECTED["held_out"])
  items = loader.load_split(path, "items")
  assert items["item_key"] == fx.EXPECTED["items"]
  assert items["text"][7] == ("Title: Common Movie 7\nDescription: (average rating: 3.8) \n"
                              "Category: \nPrice: None")
  # R00 reviewed C0..C4 in order: history C0 C1 C2, target C3 (the duplicate C0 is gone).
  assert train["history"][0].tolist() == [0, 1, 2] and int(train["target"][0]) == 3
  for split in ("val", "test"):
    d = loader.load_split(path, split)
    for key, hist, tgt in zip(d["user_key"], d["history"], d["target"]):
      if key == "H0":  # T was dropped: history shifts to C0 C2 C4, target C6
        assert hist.tolist() == [0, 2, 4] and int(tgt) == 6
      assert int(tgt) not in hist.tolist()
  # Users are indexed by order of first interaction: train first.
  assert train["user"].tolist() == list(range(14))


def test_prompt_text_and_tokens(built, smollm2_gguf):
  config, path, _ = built
  train = loader.load_split(path, "train")
  tok = tok_lib.load_tokenizer(smollm2_gguf)
  meta = {r["parent_asin"]: r for r in fx.meta_rows()}
  r00 = [r for r in fx.review_rows() if r["user_id"] == "R00"][:3]
  blocks = [prompts.review_block(prompts.amazon_item_text(
      meta[r["parent_asin"]]["title"], meta[r["parent_asin"]]["average_rating"],
      meta[r["parent_asin"]]["description"], meta[r["parent_asin"]]["categories"],
      meta[r["parent_asin"]]["price"]), r["rating"], r["text"]) for r in r00]
  expected = prompts.wrap_chat(tok, "\n\n".join([prompts.MOVIES_TV_INSTRUCTION, *blocks]))
  assert train["prompt"][0] == expected
  tokens, mask = train["prompt_tokens"][0], train["prompt_mask"][0]
  assert tokens.shape == (512,) and tokens.dtype == np.int32
  n = int(mask.sum())
  assert mask[-n:].all() and not mask[:-n].any()  # left-padded
  assert tokens[-n:].tolist() == tok(expected, add_special_tokens=False)["input_ids"]
  assert (tokens[:-n] == tok_lib.pad_id(tok)).all()
  items = loader.load_split(path, "items")
  dmask = items["decoder_mask"]
  assert items["decoder_tokens"].shape == (9, 64)
  lengths = dmask.sum(1)
  assert all(dmask[i, :lengths[i]].all() and not dmask[i, lengths[i]:].any() for i in range(9))


def _assert_same_splits(path_a, path_b):
  for split in ("train", "val", "test", "items"):
    a, b = loader.load_split(path_a, split), loader.load_split(path_b, split)
    for key in a:
      if isinstance(a[key], np.ndarray):
        np.testing.assert_array_equal(a[key], b[key])
      else:
        assert a[key] == b[key]


def test_gzip_input_gives_same_dataset(built, tmp_path, smollm2_gguf, minilm_dir):
  _, path, stats = built
  config = fx.amazon_config(tmp_path, smollm2_gguf, minilm_dir, gz=True)
  gz_path, gz_stats = prepare.prepare(config)
  assert gz_stats["splits"] == stats["splits"]
  _assert_same_splits(path, gz_path)


def test_parallel_scan_gives_same_dataset(built, tmp_path, smollm2_gguf, minilm_dir):
  # Worker processes over byte ranges must reproduce one sequential scan exactly:
  # user order, line numbers in the skip examples, every split.
  _, path, stats = built
  config = fx.amazon_config(tmp_path, smollm2_gguf, minilm_dir, scan_workers=3)
  par_path, par_stats = prepare.prepare(config)
  assert par_stats["skipped"] == stats["skipped"]
  assert par_stats["filters"] == stats["filters"]
  _assert_same_splits(path, par_path)


def test_line_aligned_ranges_cover_the_file(tmp_path):
  lines = [b"{}\n", b"{\"a\": 1}\n", b"\n", b"[1, 2, 3]\n", b"{\"b\": \"x\"}"]
  path = tmp_path / "f.jsonl"
  path.write_bytes(b"".join(lines))
  starts = {sum(len(x) for x in lines[:k]) for k in range(len(lines))}
  for parts in (1, 2, 3, 7):
    ranges = review_scan.line_aligned_ranges(str(path), parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(a <= b for a, b in ranges)
    assert all(a in starts or a == b for a, b in ranges)  # no range starts mid-line
    seen = sum(review_scan.scan_range(str(path), a, b, {}, 5).num_lines
               for a, b in ranges if a < b)
    assert seen == len(lines)


def test_parse_line_reasons():
  assert review_scan.parse_line(b'{"a": 1.5}\n') == ({"a": 1.5}, None)
  assert review_scan.parse_line(b'{"a": NaN}')[1] is None  # accepted, as json does
  assert review_scan.parse_line(b"\xff{}")[1] == "invalid UTF-8"
  assert review_scan.parse_line(b"   \n")[1] == "blank line"
  assert review_scan.parse_line(b'{"a": }')[1] == "malformed JSON"


def test_wrap_chat_frame_equals_template(smollm2_gguf, gemma3_gguf):
  contents = ["Hello", "x\n\ny", "  padded \n", "\u00e9t\u00e9 {{ not jinja }}", ""]
  for path in (smollm2_gguf, gemma3_gguf):
    tok = tok_lib.load_tokenizer(path)
    for content in contents:
      full = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                     add_generation_prompt=True)
      assert prompts.wrap_chat(tok, content) == full, (path, content)


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file() and p.name != "stats.json"}


def test_rebuild_is_byte_identical(built, tmp_path):
  config, path, _ = built
  config.data.dataset_dir = str(tmp_path / "again")
  again, _ = prepare.prepare(config)
  first, second = _tree_bytes(path), _tree_bytes(again)
  assert sorted(first) == sorted(second) and len(first) >= 8
  assert all(first[k] == second[k] for k in first)
  s1 = json.loads((path / "stats.json").read_text())
  s2 = json.loads((again / "stats.json").read_text())
  s1["settings"]["data"].pop("dataset_dir"), s2["settings"]["data"].pop("dataset_dir")
  assert s1 == s2


def test_seed_changes_only_val_test_assignment(built, tmp_path):
  config, path, _ = built
  config.data.dataset_dir = str(tmp_path / "seeded")
  seeds = set()
  for seed in range(6):
    config.seed = seed
    other, _ = prepare.prepare(config)
    assert loader.load_split(other, "train")["user_key"] == fx.EXPECTED["train"]
    seeds.add(tuple(loader.load_split(other, "val")["user_key"]))
  assert len(seeds) > 1  # the held-out halving follows the seed


def test_missing_file_is_one_clear_error(tmp_path, smollm2_gguf, minilm_dir):
  config = fx.amazon_config(tmp_path, smollm2_gguf, minilm_dir,
                            reviews=str(tmp_path / "missing.jsonl"))
  with pytest.raises(core.DataError, match=r"data.reviews file not found: .*missing.jsonl"):
    prepare.prepare(config)
  assert not (tmp_path / "dataset").exists()


def test_filter_leaving_nothing_names_filter_and_counts(tmp_path, smollm2_gguf, minilm_dir):
  config = fx.amazon_config(tmp_path, smollm2_gguf, minilm_dir, k_core=30)
  with pytest.raises(core.DataError,
                     match=r"^k-core\(30\) left 0 of 25 users .*lower data.k_core$"):
    prepare.prepare(config)
  assert not (tmp_path / "dataset").exists()  # nothing half-written


def test_all_lines_bad_is_clear(tmp_path, smollm2_gguf, minilm_dir):
  reviews = tmp_path / "bad.jsonl.gz"
  with gzip.open(reviews, "wb") as f:
    f.write(b"not json\n{\"user_id\": null}\n")
  config = fx.amazon_config(tmp_path, smollm2_gguf, minilm_dir, reviews=str(reviews))
  with pytest.raises(core.DataError, match="no usable reviews"):
    prepare.prepare(config)


def test_gemma_fallback_template_renders_gemma_turns():
  import jinja2

  template = jinja2.Environment().from_string(tok_lib.GEMMA_CHAT_TEMPLATE)
  text = template.render(messages=[{"role": "user", "content": "Hi \n"}], bos_token="<bos>",
                         add_generation_prompt=True)
  assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gguf_metadata_reader_rejects_other_files(tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"NOTGGUF" + bytes(64))
  with pytest.raises(ValueError, match="not a GGUF file"):
    tok_lib.gguf_chat_template(bad)
