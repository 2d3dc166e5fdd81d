"""Optional glibc malloc settings that keep freed host memory for the next jitted call.

XLA:CPU allocates the temporaries of one call to a jitted step as a single
block, gigabytes for a training step, from one of its worker threads. glibc
serves a block that size with a fresh ``mmap`` and unmaps it on ``free``, so
every call page-faults the whole block in again: about 15% of a SmolLM2 LoRA
training step on a 2-core host. With one malloc arena, no ``mmap`` and no
trimming, a freed block stays in the heap and the next call reuses it.

What that costs (``bench/host_memory.py``): small allocations made between
two calls can split the freed block, and the next call then takes a second
block from fresh memory, which stays; in one of two measured processes peak
RSS reached 11.4 GiB against about 8 GiB with glibc's defaults. The sampler's
speed moved both ways between runs, within the shared host's noise. So the
settings are opt-in:
``LANGPTUNE_MALLOC=reuse`` turns them on for the ``langptune-jax`` command
and the benchmarks; ``system`` (the default) keeps glibc's.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "LANGPTUNE_MALLOC"
CHOICES = ("system", "reuse")
# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main heap ...
    (_M_MMAP_MAX, 0),  # ... never from a private mapping ...
    (_M_TRIM_THRESHOLD, -1),  # ... and freed memory is never handed back (-1: no trimming).
)


def reuse_freed_memory() -> bool:
  """Applies the settings above to this process; True if they were applied.

  Call it before JAX (or anything else that starts threads) allocates: a
  thread keeps the malloc arena it first used. Does nothing off glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # another C library (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


def setting_from_env() -> str:
  """The ``LANGPTUNE_MALLOC`` choice: 'system' (unset) or 'reuse'; anything else is an error."""
  value = os.environ.get(ENV_VAR, "").strip().lower() or "system"
  if value not in CHOICES:
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(CHOICES)}")
  return value


def apply_env_setting() -> bool:
  """Applies ``LANGPTUNE_MALLOC``; True if the reuse settings are now in force."""
  return setting_from_env() == "reuse" and reuse_freed_memory()
