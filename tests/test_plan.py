"""The ahead-of-time memory plan (`langptune-jax plan`) on 8 emulated CPU devices."""

import json
import pathlib
import sys
import types

import jax
import pytest

from langptune_jax import flops, parallel, plan_models
from langptune_jax import plan as plan_lib
from langptune_jax.models import presets

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
sys.path.insert(0, str(CONFIGS))


def tiny_config(**mesh):
  import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.encoder.preset = "tiny-llama"
  c.decoder.preset = "tiny-bert"
  for axis, size in mesh.items():
    setattr(c.mesh, axis, size)
  return c


def paper_config():
  import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  c.encoder.preset = "gemma-2b-it"
  c.decoder.preset = "mxbai-embed-large-v1"
  return c


def _mesh(n, **axes):
  sizes = dict(data=1, fsdp=1, tensor=1)
  sizes.update(axes)
  return parallel.make_mesh(types.SimpleNamespace(**sizes), devices=jax.devices()[:n])


def test_plan_command_report_for_tiny_config(tmp_path, capsys):
  config = tiny_config(data=2, fsdp=2, tensor=2)
  assert plan_lib.run(config, tmp_path) == 0
  printed = capsys.readouterr().out
  report = json.loads((tmp_path / "plan.json").read_text())
  assert (tmp_path / "plan.txt").read_text().strip() == printed.strip()

  assert report["num_devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  names = [s["name"] for s in report["steps"]]
  assert names == ["sample", "rlso/logprobs", "rlso/update", "cl/update", "embed"]
  for step in report["steps"]:
    assert step["error"] is None, step
    assert step["temporaries"] > 0, step  # XLA's memory analysis was read
    assert step["total"] > report["resident_bytes"], step
  kv = {s["name"]: s["kv_cache"] for s in report["steps"]}
  assert kv["sample"] > 0 and kv["rlso/update"] == 0
  resident = report["resident"]
  assert resident["encoder params (frozen)"] > 0
  assert resident["encoder params (trainable: lora)"] > 0
  assert resident["encoder optimizer (AdamW)"] > 0 and resident["decoder optimizer (AdamW)"] > 0
  assert report["peak_bytes"] == max(s["total"] for s in report["steps"])
  assert all(report["fits"].values())  # a tiny model fits everywhere
  for chip in ("v4 (32 GiB", "v5e (16 GiB", "v5p (95 GiB", "H100 (80 GiB", "H200 (141 GiB"):
    assert f"fits on {chip}" in printed
  assert "rlso/update" in printed and "temporaries" in printed


def test_more_devices_lower_per_device_state():
  config = tiny_config()
  small = plan_lib.plan_config(config, _mesh(2, fsdp=2), compile_steps=False)
  large = plan_lib.plan_config(config, _mesh(8, fsdp=4, tensor=2), compile_steps=False)
  for key in ("encoder params (frozen)", "decoder params (trainable)",
              "decoder optimizer (AdamW)"):
    assert 0 < large.resident[key] < small.resident[key], key
  # The KV cache shrinks with data parallelism and kv-head sharding.
  assert 0 < large.steps[0].kv_cache < small.steps[0].kv_cache
  assert "analytic only" in large.format()


def test_state_bytes_match_the_real_model():
  """Per-device bytes from shapes alone equal those of materialised, sharded arrays."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from langptune_jax.models import transformer  # pylint: disable=g-import-not-at-top
  mesh = _mesh(8, data=2, fsdp=2, tensor=2)
  abstract = plan_models.encoder_model(tiny_config(), mesh)
  model = transformer.Decoder(abstract.config, rngs=nnx.Rngs(0))
  real = nnx.state(parallel.shard_module(model, mesh))
  real_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(real))
  frozen, _, _ = plan_models.split_state_bytes(abstract)
  assert frozen == real_bytes


def test_paper_config_does_not_fit_a_small_chip():
  """gemma-2b + LoRA r=1024 + mxbai on one device: too big for v5e, fine on H200."""
  p = plan_lib.plan_config(paper_config(), _mesh(1), compile_steps=False)
  assert not p.fits(flops.chip("v5e"))
  assert p.fits(flops.chip("h200"))
  text = p.format()
  assert "does NOT fit on v5e (16 GiB" in text and "fits on H200 (141 GiB" in text
  # 2.5B frozen gemma parameters in float32 (~9.3 GiB).
  assert 9 * plan_lib.GiB < p.resident["encoder params (frozen)"] < 10 * plan_lib.GiB
  # AdamW keeps two float32 moments per trainable parameter.
  trainable = p.resident["encoder params (trainable: lora)"]
  assert p.resident["encoder optimizer (AdamW)"] == pytest.approx(2 * trainable, rel=1e-3)


def test_model_dimensions_from_presets_and_paths(minilm_dir):
  assert presets.decoder_config("gemma-2b").num_layers == 18
  assert presets.decoder_config("", "/models/Meta-Llama-3-8B-Instruct-hf".replace(
      "Meta-", "")).num_kv_heads == 8
  assert presets.bert_config("", str(minilm_dir)).hidden_size == 384  # read from config.json
  with pytest.raises(ValueError, match="encoder.preset='gpt5': unknown"):
    presets.decoder_config("gpt5")
  with pytest.raises(ValueError, match="decoder.preset is empty and decoder.path=''"):
    presets.bert_config("", "")


def test_lora_report_names_the_adapters_training_adds():
  """tiny-llama ties its embeddings: the plan and training both adapt the output head."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from langptune_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from langptune_jax.models import transformer  # pylint: disable=g-import-not-at-top
  from langptune_jax.train import setup  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  assert "lm_head" in config.lora.targets
  mesh = _mesh(2, fsdp=2)
  abstract = plan_models.encoder_model(config, mesh)
  assert abstract.config.tie_embeddings
  real = setup.add_adapters(transformer.Decoder(abstract.config, rngs=nnx.Rngs(0)), config, 0)
  real_sites = lora_lib.adapter_sites(dict(nnx.to_flat_state(nnx.state(real))))
  assert "head_lora" in real_sites and len(real_sites) == 2 * 7 + 1  # 2 blocks x 7 linears
  planned = plan_models.lora_notes(config, abstract)
  assert planned == [f"LoRA r={config.lora.rank} on {len(real_sites)} layers; the encoder ties "
                     "its embeddings, so the lm_head adapter acts on the output head only (the "
                     "input embedding lookup is unchanged)"]
  assert abstract.trainable_params == sum(
      x.size for x in jax.tree.leaves(nnx.state(real, nnx.LoRAParam)))
  text = plan_lib.plan_config(config, mesh, compile_steps=False).format()
  assert "no adapter there" not in text and "lm_head adapter acts on the output head" in text


def test_per_host_memory_of_a_multi_host_mesh():
  config = tiny_config()
  mesh = _mesh(8, fsdp=4, tensor=2)
  one = plan_lib.plan_config(config, mesh, compile_steps=False, processes=1)
  two = plan_lib.plan_config(config, mesh, compile_steps=False, processes=2)
  assert two.peak_bytes == one.peak_bytes  # per device: the same mesh
  assert two.devices_per_host == 4
  report = two.to_dict()
  assert report["per_host"]["peak_bytes"] == 4 * two.peak_bytes
  assert report["per_host"]["resident_bytes"] == 4 * two.resident_bytes
  assert "per host (2 hosts x 4 devices)" in two.format()
  assert "per host" not in one.format()
  config.distributed.num_processes = 4  # the multi-host config's own count
  assert plan_lib.plan_config(config, mesh, compile_steps=False).devices_per_host == 2
  with pytest.raises(ValueError, match="3 processes do not split the mesh's 8 devices"):
    plan_lib.plan_config(config, mesh, compile_steps=False, processes=3)


def test_chip_gets_the_largest_micro_batch_that_fits():
  config = tiny_config()
  mesh = _mesh(2, fsdp=2)
  assert plan_lib.micro_batch_candidates(8, 2, 2) == [0, 4, 2, 1]
  assert plan_lib.micro_batch_candidates(8, 1, 2) == [0, 4, 2]
  roomy = plan_lib.largest_micro_batches(config, flops.chip("h200"), mesh)
  assert [(c.field, c.value, list(c.tried)) for c in roomy] == [
      ("rl.micro_batch_size", 0, [0]), ("cl.micro_batch_size", 0, [0])]  # the whole batch fits
  rl_only = ("rl.micro_batch_size",)
  nothing = flops.Chip("fake", 1.0, 1e-6)
  (choice,) = plan_lib.largest_micro_batches(config, nothing, mesh, fields=rl_only)
  assert choice.value is None and sorted(choice.tried) == [0, 1, 2, 4]  # every size compiled
  assert "rl.micro_batch_size: none fits" in plan_lib.format_choices([choice], nothing)
  rl = choice.tried
  smallest = min(rl.values())
  assert smallest < rl[0]  # micro-batches lower the peak of the RLSO steps
  expected = next(size for size in (0, 4, 2, 1) if rl[size] <= smallest)
  fake = flops.Chip("fake", 1.0, smallest / plan_lib.GiB / plan_lib.HEADROOM)
  (choice,) = plan_lib.largest_micro_batches(config, fake, mesh, fields=rl_only)
  assert choice.value == expected != 0 and choice.tried[expected] == smallest
  assert f"--config.rl.micro_batch_size={expected}" in plan_lib.format_choices([choice], fake)
