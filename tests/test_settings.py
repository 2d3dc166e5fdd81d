"""The typed settings: every config field has a validation rule and a typed home."""

import dataclasses
import pathlib

import ml_collections
import pytest
import test_config

from configs import base
from langptune_jax import config as config_lib
from langptune_jax import settings as settings_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _leaves(settings, prefix=""):
  out = {}
  for field in dataclasses.fields(settings):
    value = getattr(settings, field.name)
    if dataclasses.is_dataclass(value):
      out.update(_leaves(value, f"{prefix}{field.name}."))
    else:
      out[f"{prefix}{field.name}"] = value
  return out


def test_every_base_field_has_a_validation_rule():
  fields = set(config_lib.flatten(base.get_config()))
  missing = sorted(fields - config_lib.ruled_fields(base.get_config(), 8))
  assert not missing, f"config fields without a validation rule in config.py: {missing}"


def test_the_rules_and_the_typed_fields_cover_the_same_schema():
  fields = set(config_lib.flatten(base.get_config()))
  assert set(settings_lib.field_names()) == fields
  assert config_lib.ruled_fields(base.get_config(), 8) == fields


def test_a_field_without_a_rule_is_found():
  config = base.get_config()
  config.data.new_knob = 3
  assert "data.new_knob" not in config_lib.ruled_fields(config, 8)
  assert "data.k_core" in config_lib.ruled_fields(config, 8)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_file_converts_field_for_field(path):
  config = config_lib.load_config(path)
  settings = settings_lib.from_config(
      config_lib.validate(config, test_config.CONFIG_DEVICES.get(path.stem, 8)))
  flat = config_lib.flatten(config)
  typed = _leaves(settings)
  assert set(typed) == set(flat)
  for key, value in flat.items():
    want = tuple(value) if isinstance(value, list) else value
    assert typed[key] == want, key
    assert type(typed[key]) is type(want) or isinstance(want, int), key


def test_numbers_are_converted_once_to_their_kind():
  config = base.get_config()
  config.rl.lr, config.eval.ks = 1, [5, 10]  # an int learning rate, a list of ks
  settings = settings_lib.from_config(config)
  assert type(settings.rl.lr) is float and settings.rl.lr == 1.0
  assert settings.eval.ks == (5, 10)
  assert settings.rl.num_generations == 2 and settings.rl.adam_b2 == 0.999


def test_sections_are_frozen():
  settings = settings_lib.from_config(base.get_config())
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.rl.lr = 1.0  # type: ignore[misc]
  assert settings_lib.of(settings) is settings


def test_a_field_the_typed_layer_lacks_is_one_clear_line():
  config = base.get_config()
  config.rl.new_knob = 1
  with pytest.raises(settings_lib.SettingsError) as info:
    settings_lib.from_config(config)
  assert str(info.value) == ("rl.new_knob: config field without a typed setting "
                             "(langptune_jax/settings.py RLSettings)")


@pytest.mark.parametrize("key,value,message", [
    ("rl.lr", "fast", "rl.lr='fast': must be a finite number"),
    ("cl.batch_size", 2.5, "cl.batch_size=2.5: must be an integer"),
    ("eval.greedy", 1, "eval.greedy=1: must be true or false"),
    ("lora.targets", ("q", 3), "lora.targets=('q', 3): must be a list of strings"),
])
def test_a_value_of_the_wrong_kind_is_one_clear_line(key, value, message):
  # A config built from base refuses most such values itself; a hand-built section does not.
  config = base.get_config()
  section, field = key.split(".")
  config[section] = ml_collections.ConfigDict(dict(config[section].to_dict(), **{field: value}))
  with pytest.raises(settings_lib.SettingsError) as info:
    settings_lib.from_config(config)
  assert str(info.value) == message


def test_a_missing_field_is_one_clear_line():
  config = base.get_config()
  del config.cl["group_size"]
  with pytest.raises(settings_lib.SettingsError, match=r"^cl.group_size: required field is "
                                                       r"missing$"):
    settings_lib.from_config(config)
