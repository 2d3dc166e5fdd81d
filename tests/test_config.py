"""Config loading, overrides, helpers and every validation rule's message."""

import pathlib

import jax.numpy as jnp
import pytest

from langptune_jax import config as config_lib
from langptune_jax.config import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def tiny(**overrides):
  return config_lib.load_config(CONFIGS / "tiny.py", overrides)


def failures(config, num_devices=8, **kwargs):
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config, num_devices, **kwargs)
  return info.value.failures


# Devices each config is validated on: 8 (a host's worth), or 1 for the one-CPU demo, whose
# 4-row RL batch is smaller than 8 data-parallel shards.
CONFIG_DEVICES = {"demo": 1}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_is_valid(path):
  config = config_lib.load_config(path)
  assert config_lib.validate(config, CONFIG_DEVICES.get(path.stem, 8)) is config


@pytest.mark.parametrize("num_devices", [1, 2, 8])
def test_tiny_config_valid_on_device_counts(num_devices):
  config_lib.validate(tiny(), num_devices)


# (overrides, expected failure line prefix)
RULES = [
    ({"encoder.family": "gpt"}, "encoder.family='gpt': must be one of llama, gemma"),
    ({"decoder.family": "t5"}, "decoder.family='t5': must be one of bert, llama"),
    ({"encoder.dtype": "float8"}, "encoder.dtype='float8': must be one of float32"),
    ({"decoder.param_dtype": "int8"}, "decoder.param_dtype='int8': must be one of"),
    ({"encoder.training": "prefix"}, "encoder.training='prefix': must be one of lora, partial"),
    ({"lora.rank": 0}, "lora.rank=0: must be >= 1 when encoder.training='lora'"),
    ({"lora.targets": ("q", "attn")}, "lora.targets=('q', 'attn'): each target must be one of"),
    ({"lora.dropout": 1.0}, "lora.dropout=1.0: must be in [0, 1)"),
    ({"lora.alpha": 0.0}, "lora.alpha=0.0: must be > 0"),
    ({"rl.lr": 0.0}, "rl.lr=0.0: must be > 0"),
    ({"cl.lr": float("inf")}, "cl.lr=inf: must be finite"),
    ({"cl.lr": float("nan")}, "cl.lr=nan: must be finite"),
    ({"rl.num_generations": 1}, "rl.num_generations=1: must be >= 2"),
    ({"rl.prompts_per_update": 3},
     "rl.prompts_per_update=3: rl.prompts_per_update x rl.num_generations = 6 must be divisible "
     "by the data-parallel size 8"),
    ({"cl.batch_size": 12}, "cl.batch_size=12: must be divisible by the data-parallel size 8"),
    ({"cl.batch_size": 16, "cl.micro_batch_size": 5}, "cl.micro_batch_size=5: must divide "
     "cl.batch_size=16"),
    ({"cl.batch_size": 16, "cl.micro_batch_size": 4},
     "cl.micro_batch_size=4: micro-batch rows 4 must be divisible by the data-parallel size 8"),
    ({"rl.micro_batch_size": 3}, "rl.micro_batch_size=3: must divide rl.prompts_per_update=8"),
    ({"rl.micro_batch_size": -1}, "rl.micro_batch_size=-1: must be >= 0"),
    ({"rl.temperature": 0.0}, "rl.temperature=0.0: must be > 0"),
    ({"cl.temperature": -0.1}, "cl.temperature=-0.1: must be > 0"),
    ({"rl.top_p": 0.0}, "rl.top_p=0.0: must be in (0, 1]"),
    ({"rl.top_p": 1.5}, "rl.top_p=1.5: must be in (0, 1]"),
    ({"rl.top_k": -1}, "rl.top_k=-1: must be >= 0"),
    ({"rl.reward_type": "auc"}, "rl.reward_type='auc': must be one of ndcg, mrr"),
    ({"rl.eta": 0.0}, "rl.eta=0.0: must be > 0"),
    ({"rl.kl_coef": -0.2}, "rl.kl_coef=-0.2: must be >= 0"),
    ({"rl.lr_schedule": "step"}, "rl.lr_schedule='step': must be one of constant"),
    ({"rl.num_ppo_epochs": 0}, "rl.num_ppo_epochs=0: must be >= 1"),
    ({"encoder.cache_size": 70},
     "encoder.cache_size=70: must hold data.prompt_max_len + rl.response_length = 64 + 16 = 80"),
    ({"data.history_len": 0}, "data.history_len=0: must be >= 1"),
    ({"data.k_core": 0}, "data.k_core=0: must be >= 1"),
    ({"data.test_fraction": 1.0}, "data.test_fraction=1.0: must be in (0, 1)"),
    ({"data.test_fraction": 0.0}, "data.test_fraction=0.0: must be in (0, 1)"),
    ({"data.source": "yelp"}, "data.source='yelp': must be one of amazon, movielens"),
    ({"eval.ks": (5, 0)}, "eval.ks=(5, 0): each k must be a positive integer (bad: 0)"),
    ({"eval.ks": ()}, "eval.ks=(): must not be empty"),
    ({"eval.baselines": ("oracle",)}, "eval.baselines=('oracle',): each baseline must be one of"),
    ({"mesh.fsdp": 3}, "mesh.fsdp=3: 8 devices are not divisible by the fixed axes' product 3"),
    ({"mesh.data": 2}, "mesh.data=2: the mesh data=2 x fsdp=1 x tensor=1 needs 2 devices but 8"),
    ({"mesh.fsdp": -1}, "mesh: only one axis may be -1"),
    ({"mesh.tensor": 0}, "mesh.tensor=0: each mesh axis must be >= 1 or -1"),
    ({"checkpoint.max_to_keep": 0}, "checkpoint.max_to_keep=0: must be >= 1"),
    ({"profile.enabled": True, "profile.num_steps": 0}, "profile.num_steps=0: must be >= 1"),
    ({"profile.enabled": True, "profile.start_step": -1}, "profile.start_step=-1: must be >= 0"),
    ({"decoder.pooling": "max"}, "decoder.pooling='max': must be one of cls, mean, last"),
    ({"encoder.training": "partial", "encoder.num_layers_unfrozen": 0},
     "encoder.num_layers_unfrozen=0: must be >= 1 when encoder.training='partial'"),
    ({"distributed.num_processes": 2, "distributed.process_id": 2},
     "distributed.process_id=2: must be < distributed.num_processes=2"),
    ({"decoder.attention": "flash"}, "decoder.attention='flash': must be one of einsum, fused"),
    ({"decoder.remat": "dots"}, "decoder.remat='dots': must be one of none, full"),
    ({"encoder.preset": "gpt-9"}, "encoder.preset='gpt-9': must be empty (the shape from "
     "encoder.path) or one of gemma-2b-it"),
    ({"decoder.preset": "gemma-2b-it"}, "decoder.preset='gemma-2b-it': must be empty (the shape "
     "from decoder.path) or one of mxbai-embed-large-v1"),
    ({"eval.sasrec_steps": 0}, "eval.sasrec_steps=0: must be >= 1"),
    ({"encoder.num_layers_unfrozen": -1}, "encoder.num_layers_unfrozen=-1: must be >= 0"),
    ({"profile.num_steps": 0}, "profile.num_steps=0: must be >= 1"),
]


@pytest.mark.parametrize("overrides,expected", RULES, ids=[e.split(":")[0] for _, e in RULES])
def test_rule_message(overrides, expected):
  got = failures(tiny(**overrides))
  assert len(got) == 1, got
  assert got[0].startswith(expected), got[0]
  assert "\n" not in got[0]


def test_partial_training_allows_rank_zero():
  config_lib.validate(tiny(**{"encoder.training": "partial", "lora.rank": 0}), 8)


def test_cache_size_zero_means_automatic():
  config_lib.validate(tiny(**{"encoder.cache_size": 0}), 8)
  config_lib.validate(tiny(**{"encoder.cache_size": 80}), 8)


def test_data_parallel_rules_use_fsdp_and_the_device_count():
  # 4 x 2 over data x fsdp: both split the batch, so the rule still needs 8.
  got = failures(tiny(**{"mesh.data": 4, "mesh.fsdp": 2, "cl.batch_size": 12}))
  assert got == ["cl.batch_size=12: must be divisible by the data-parallel size 8 "
                 "(the mesh axes the batch is split over)"]
  # Tensor parallelism does not split the batch: data-parallel size 2.
  config_lib.validate(tiny(**{"mesh.data": 2, "mesh.tensor": 4, "cl.batch_size": 6}), 8)
  assert config_lib.data_parallel_size(tiny(**{"mesh.data": 2, "mesh.tensor": 4}), 8) == 2
  # On one device anything divides.
  config_lib.validate(tiny(**{"cl.batch_size": 3, "rl.prompts_per_update": 3}), 1)


def test_custom_rules_change_the_data_parallel_size():
  config = tiny(**{"mesh.data": 2, "mesh.fsdp": 4})
  config.mesh.rules = [["batch", "data"], ["embed", "fsdp"]]
  assert config_lib.data_parallel_size(config, 8) == 2
  config.mesh.rules = [["batch", "model"]]
  assert failures(config)[0].startswith("mesh.rules=[['batch', 'model']]: mesh axes must be")


def test_all_failures_are_reported_one_per_line():
  config = tiny(**{"rl.top_p": 0.0, "cl.temperature": 0.0, "encoder.family": "gpt"})
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config, 8)
  lines = str(info.value).splitlines()
  assert [ln.split("=")[0] for ln in lines] == ["encoder.family", "rl.top_p", "cl.temperature"]
  assert isinstance(info.value, ValueError)


def test_wrong_types_are_named():
  config = tiny()
  with config.unlocked():
    # A config file may define a field with any type; replace the fields to mimic one.
    for section, key, value in (("rl", "num_generations", 2.0), ("decoder", "normalize", "yes"),
                                ("rl", "top_k", True)):
      del config[section][key]
      config[section][key] = value
  got = failures(config)
  assert "rl.num_generations=2.0: must be an integer" in got
  assert "decoder.normalize='yes': must be true or false" in got
  assert "rl.top_k=True: must be an integer" in got


def test_missing_field_is_named():
  config = tiny()
  with config.unlocked():
    del config.rl["eta"]
  assert failures(config) == ["rl.eta=<missing>: required field is missing"]


def test_require_data_for_amazon():
  config = tiny(**{"data.source": "amazon", "data.domain": "movies_tv"})
  config_lib.validate(config, 8)  # paths are only needed by commands that read raw data
  got = failures(config, require_data=True)
  assert got == [
      "data.reviews='': data.source='amazon' needs the Amazon Reviews 2023 JSONL path",
      "data.meta='': data.source='amazon' needs the Amazon Reviews 2023 JSONL path"]
  config_lib.validate(tiny(), 8, require_data=True)  # movielens falls back to the asset


def test_check_paths(tmp_path):
  config = tiny(**{"encoder.path": str(tmp_path / "missing.gguf"), "decoder.path": str(tmp_path)})
  config_lib.validate(config, 8)
  got = failures(config, check_paths=True)
  assert got == [f"encoder.path='{tmp_path / 'missing.gguf'}': path does not exist"]


def test_overrides_and_unknown_fields():
  config = tiny(**{"rl.lr": 1e-6, "mesh.data": 4, "mesh.fsdp": 2})
  assert config.rl.lr == 1e-6 and config.mesh.fsdp == 2
  with pytest.raises(ValueError, match=r"^rl.learning_rate: no such config field$"):
    tiny(**{"rl.learning_rate": 1e-6})
  with pytest.raises(ValueError, match=r"^rlx: no such config section$"):
    tiny(**{"rlx.lr": 1e-6})
  with pytest.raises(FileNotFoundError, match="missing.py not found"):
    config_lib.load_config(CONFIGS / "missing.py")


def test_get_field_and_flatten():
  config = tiny()
  assert config_lib.get_field(config, "rl.lr") == config.rl.lr
  assert config_lib.get_field(config, "rl.nope", "d") == "d"
  flat = config_lib.flatten(config)
  assert flat["rl.prompts_per_update"] == 8 and flat["mesh.data"] == -1
  assert not any(isinstance(v, dict) for v in flat.values())


def test_dtype_names():
  assert config_lib.dtype("bfloat16") == jnp.bfloat16
  assert config_lib.dtype("float32") == jnp.float32
  with pytest.raises(ValueError, match="dtype 'fp8' unknown"):
    config_lib.dtype("fp8")


def test_resolve_workdir(tmp_path, monkeypatch):
  config = tiny()
  monkeypatch.chdir(tmp_path)
  assert config_lib.resolve_workdir(config, None, "configs/tiny.py:arg") == tmp_path / "runs" / "tiny"
  config.workdir = str(tmp_path / "from_config")
  assert config_lib.resolve_workdir(config, None, "configs/tiny.py") == tmp_path / "from_config"
  flag = tmp_path / "from_flag"
  assert config_lib.resolve_workdir(config, str(flag)) == flag and flag.is_dir()
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="cannot create it"):
    config_lib.resolve_workdir(config, str(tmp_path / "file" / "sub"))


def test_cl_users_must_cover_a_cl_batch():
  assert failures(tiny(**{"train.cl_users": 4})) == [  # tiny's cl.batch_size is 8
      "train.cl_users=4: must be >= cl.batch_size=8 (each CL step draws a batch from these users)"]


def test_a_field_base_does_not_have_is_one_clear_line():
  config = tiny()
  config.rl.lrr = 1e-6  # a typo of rl.lr in a config file
  assert failures(config) == ["rl.lrr=1e-06: no such config field (configs/base.py lists every "
                              "field)"]
