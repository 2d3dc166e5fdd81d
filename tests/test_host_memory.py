"""host_memory: with LANGPTUNE_MALLOC=reuse a big block freed by a thread is kept and reused."""

import json
import os
import platform
import subprocess
import sys

import pytest

from langptune_jax import host_memory

# Only the probes of malloc's behaviour need glibc; parsing and the entry point do not.
needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc settings")

# Runs in a fresh process: the settings are process-wide and must precede threads.
_PROBE = r"""
import ctypes, json, threading
from langptune_jax import host_memory
applied = host_memory.apply_env_setting()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 256 << 20

def rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096

def block():
  # Like XLA:CPU's per-call temporaries: one big block, written, freed.
  p = libc.malloc(SIZE)
  libc.memset(p, 1, SIZE)
  touched = rss()
  libc.free(p)
  return touched

out = {"applied": applied}
def worker():
  start = rss()
  block()
  out["kept_after_free"] = rss() - start
  # Python's own small allocations may split the freed block once (a second
  # block then comes from fresh memory), so judge the steady state, as for a
  # step called again and again.
  touched = [block() for _ in range(4)]
  out["growth_later_calls"] = touched[-1] - touched[-3]
t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps(out))
"""
_SIZE = 256 << 20


def _probe(**env):
  proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=120, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_glibc
def test_reuse_keeps_the_freed_block_and_reuses_it():
  out = _probe(**{host_memory.ENV_VAR: "reuse"})
  assert out["applied"] is True
  assert out["kept_after_free"] > 0.9 * _SIZE  # not handed back to the OS
  assert out["growth_later_calls"] < 0.1 * _SIZE  # later blocks reuse it


@needs_glibc
@pytest.mark.parametrize("value", ["system", ""])
def test_default_keeps_glibc_behaviour(value):
  out = _probe(**{host_memory.ENV_VAR: value})
  assert out["applied"] is False
  # glibc's default: a block this size is its own mapping, unmapped on free.
  assert out["kept_after_free"] < 0.1 * _SIZE


def test_unknown_value_is_one_clear_error(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, "bogus")
  with pytest.raises(ValueError, match=r"LANGPTUNE_MALLOC='bogus': expected one of system, reuse"):
    host_memory.setting_from_env()
  proc = subprocess.run([sys.executable, "-m", "langptune_jax.main", "info"], capture_output=True,
                        text=True, env={**os.environ, host_memory.ENV_VAR: "bogus"}, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      "error: LANGPTUNE_MALLOC='bogus': expected one of system, reuse"]


def test_console_entry_applies_it_first(monkeypatch):
  from langptune_jax import main
  calls = []
  monkeypatch.setattr(host_memory, "apply_env_setting", lambda: calls.append("malloc"))
  monkeypatch.setattr(main, "_define_flags", lambda: calls.append("flags"))
  monkeypatch.setattr(sys, "argv", ["langptune-jax", "--help"])
  with pytest.raises(SystemExit):
    main.run()
  assert calls[:2] == ["malloc", "flags"]
