"""Test setup: 8 emulated CPU devices (set before jax is imported) and asset fixtures."""

import gc
import os
import tempfile

from cpu_devices import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Several tests build identical jitted steps (e.g. a run and its resumed copy):
# a persistent compilation cache lets them share compiled executables.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("LANGPTUNE_TEST_XLA_CACHE",
                                 os.path.join(tempfile.gettempdir(), "langptune_jax_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """After each test module, drop its objects and JAX's in-memory compiled programs.

  Every Trainer jits its own steps; without this the executables of all earlier
  modules stay in memory for the whole session (the persistent cache above
  still serves recompiles).
  """
  yield
  gc.collect()
  jax.clear_caches()


def _asset(name):
  from langptune_jax import assets
  try:
    return assets.asset_path(name)
  except FileNotFoundError as e:  # make test installs them first
    pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def minilm_dir():
  return _asset("minilm")


@pytest.fixture(scope="session")
def smollm2_gguf():
  return _asset("smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf():
  return _asset("gemma3_270m")


@pytest.fixture(scope="session")
def ml100k_dir():
  return _asset("ml100k")


# Fixtures that load real offline weights or data: a test that uses one is `slow`.
REAL_ASSET_FIXTURES = frozenset({"minilm_dir", "smollm2_gguf", "gemma3_gguf", "ml100k_dir"})


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if REAL_ASSET_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
# The trained run the recommend / serve / judge tests share (built on first use).
from serve_fixtures import served_run, served_session  # noqa: E402,F401
