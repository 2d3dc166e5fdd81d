"""Metrics, progress and profiling: what a run reports about itself.

* :class:`MetricsWriter` writes scalars to TensorBoard event files (tensorboardX)
  and to ``metrics.jsonl``; :func:`read_scalars` and :func:`read_jsonl` read them
  back (tests, plots).
* :func:`progress` is a tqdm bar on a terminal and a line every ~10% in logs.
* :class:`ProfileWindow` records an XLA trace (``jax.profiler``) for the steps
  named by ``config.profile``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import pathlib
import struct
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, TextIO

import numpy as np
import tqdm

from langptune_jax import fs

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"  # XLA traces: <workdir>/profile/plugins/profile/<run>/*.xplane.pb


# --- metrics -----------------------------------------------------------------

def _scalar(value: Any) -> float | None:
  """A Python float for scalar-like values (numbers, 0-d/size-1 arrays), else None."""
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, numbers.Number):
    return float(value)
  try:
    array = np.asarray(value)  # jax arrays come to host here
  except Exception:  # not array-like
    return None
  if array.size == 1 and array.dtype.kind in "biuf":
    return float(array.reshape(()))
  return None


def _is_main_process() -> bool:
  if "jax" not in sys.modules:  # don't start a backend just to ask
    return True
  from langptune_jax import distributed
  return distributed.is_coordinator()


class MetricsWriter:
  """Writes step metrics to TensorBoard and JSONL (on the main process only).

  Scalars go to both; strings go to TensorBoard as text and to JSONL as is.
  TensorBoard replaces characters outside ``[A-Za-z0-9_./-]`` in tags with ``_``
  (``ndcg@10`` -> ``ndcg_10``); JSONL keeps names as given.
  Each JSONL line is ``{"step": s, "time": unix_seconds, "<prefix/name>": value, ...}``
  and is flushed at once, so a crashed run keeps every line written.
  """

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, jsonl: bool = True,
               enabled: bool | None = None):
    self.workdir = fs.as_path(workdir)
    self.enabled = _is_main_process() if enabled is None else enabled
    self._tb = None
    self._jsonl: TextIO | None = None
    self._mirrors: list[fs.LocalMirror] = []
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    # On a bucket both are written locally and copied up at every flush.
    if tensorboard:
      import tensorboardX  # deferred: protobuf import is slow and only the writer needs it
      mirror = fs.LocalMirror(self.tensorboard_dir)
      self._mirrors.append(mirror)
      self._tb = tensorboardX.SummaryWriter(str(mirror.local))
    if jsonl:
      mirror = fs.LocalMirror(self.workdir, fetch=(JSONL_NAME,))  # the workdir itself if local
      self._mirrors.append(mirror)
      self._jsonl = open(mirror.local / JSONL_NAME, "a", encoding="utf-8")

  @property
  def jsonl_path(self):
    return self.workdir / JSONL_NAME

  @property
  def tensorboard_dir(self):
    return self.workdir / TENSORBOARD_DIR

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Writes one step's metrics; names become ``prefix/name`` when prefix is set."""
    if not self.enabled:
      return
    step = int(step)
    record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
    for name, value in metrics.items():
      tag = f"{prefix}/{name}" if prefix else str(name)
      if isinstance(value, str):
        record[tag] = value
        if self._tb is not None:
          self._tb.add_text(tag, value, step)
        continue
      scalar = _scalar(value)
      if scalar is None:
        raise ValueError(f"metric {tag!r}: expected a scalar or a string, got "
                         f"{type(value).__name__} of shape {np.shape(value)}")
      # JSON has no NaN/inf; keep them readable as strings.
      record[tag] = scalar if math.isfinite(scalar) else str(scalar)
      if self._tb is not None:
        self._tb.add_scalar(tag, scalar, step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    for mirror in self._mirrors:
      mirror.push()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Text such as sample profiles (TensorBoard text tab and JSONL)."""
    self.write(step, {tag: text})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    for mirror in self._mirrors:
      mirror.close()
    self._mirrors = []

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file (or a workdir containing one)."""
  path = fs.as_path(path)
  if path.is_dir():
    path = path / JSONL_NAME
  if not path.is_file():
    raise FileNotFoundError(f"metrics file {path} not found")
  with path.open("r", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _records(path: pathlib.Path) -> Iterator[bytes]:
  """Payloads of a TFRecord file: u64 length, u32 crc, data, u32 crc (CRCs unchecked)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      f.read(4)
      if len(data) < length:
        return  # a truncated last record of a live file
      yield data


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Scalars from every TensorBoard event file under `logdir`: tag -> [(step, value)]."""
  from tensorboardX.proto import event_pb2
  logdir = pathlib.Path(logdir)
  files = sorted(logdir.rglob("events.out.tfevents.*"))
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
  out: dict[str, list[tuple[int, float]]] = {}
  for file in files:
    for payload in _records(file):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
        elif value.HasField("tensor") and value.tensor.float_val:
          out.setdefault(value.tag, []).append((int(event.step), float(value.tensor.float_val[0])))
  return out


# --- progress ------------------------------------------------------------------

def _interactive(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class _LogProgress:
  """Non-interactive progress: one line per ~`every` of the total (or per 30 s)."""

  def __init__(self, iterable, desc: str, total: int | None, stream: TextIO, every: float):
    self.iterable, self.desc, self.total, self.stream = iterable, desc, total, stream
    self.every = every
    self.count = 0
    self.start = time.monotonic()
    self._next_fraction = every
    self._last_log = self.start
    self._closed = False

  def _log(self, final: bool = False) -> None:
    elapsed = time.monotonic() - self.start
    rate = self.count / elapsed if elapsed > 0 else 0.0
    if self.total:
      pct = 100.0 * self.count / self.total
      text = f"{self.desc}: {pct:3.0f}% {self.count}/{self.total}"
    else:
      text = f"{self.desc}: {self.count}"
    print(f"{text} [{elapsed:.1f}s, {rate:.2f} it/s]{' done' if final else ''}",
          file=self.stream, flush=True)
    self._last_log = time.monotonic()

  def update(self, n: int = 1) -> None:
    self.count += n
    if self.total:
      if self.count / self.total + 1e-9 >= self._next_fraction and self.count < self.total:
        self._log()
        while self._next_fraction <= self.count / self.total + 1e-9:
          self._next_fraction += self.every
    elif time.monotonic() - self._last_log >= 30.0:
      self._log()

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update()
    self.close()

  def close(self) -> None:
    """Logs the final line (manual use: ``bar = progress(total=n); bar.update(k); bar.close()``)."""
    if not self._closed:
      self._closed = True
      self._log(final=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, *,
             stream: TextIO | None = None, interactive: bool | None = None,
             log_every: float = 0.1, disable: bool = False):
  """Iterates with a progress display.

  On a terminal this is a tqdm bar. Otherwise (CI, log files) the bar is off and
  a plain line is printed every `log_every` of the total and at the end, so
  logs show progress without carriage-return spam. Without an iterable it
  returns a bar to drive by hand with ``update(n)`` and ``close()``.
  """
  stream = stream or sys.stderr
  if total is None and iterable is not None and hasattr(iterable, "__len__"):
    total = len(iterable)
  if disable:
    return iterable
  if interactive is None:
    interactive = _interactive(stream)
  if interactive:
    return tqdm.tqdm(iterable, desc=desc, total=total, file=stream, dynamic_ncols=True)
  bar = _LogProgress(iterable, desc, total, stream, log_every)
  return bar if iterable is None else iter(bar)


# --- profiling -------------------------------------------------------------------

class ProfileWindow:
  """Records an XLA trace for steps [start_step, start_step + num_steps).

  Call :meth:`step` before running each step. The trace (``*.xplane.pb`` under
  ``logdir/plugins/profile/<run>/``) opens in TensorBoard's profile plugin or
  xprof. Pass the previous step's outputs as `sync` so the trace is stopped only
  after their device work has finished.
  """

  def __init__(self, profile_config, logdir: str | os.PathLike):
    self.enabled = bool(profile_config.enabled)
    self.start_step = int(profile_config.start_step)
    self.num_steps = int(profile_config.num_steps)
    self.logdir = fs.as_path(logdir)
    self.active = False
    self.done = False
    self._mirror: fs.LocalMirror | None = None  # the trace is written locally, then copied

  def step(self, step: int, sync: Any = None) -> None:
    if not self.enabled or self.done:
      return
    if self.active and step >= self.start_step + self.num_steps:
      self.stop(sync)
    elif not self.active and self.start_step <= step < self.start_step + self.num_steps:
      import jax
      self._mirror = fs.LocalMirror(self.logdir)
      self._mirror.local.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self._mirror.local))
      self.active = True

  def annotate(self, step: int, name: str = "train"):
    """Marks one step in the trace (xprof's step-time view); a no-op when idle."""
    if not self.active:
      return contextlib.nullcontext()
    import jax
    return jax.profiler.StepTraceAnnotation(name, step_num=int(step))

  def stop(self, sync: Any = None) -> None:
    if not self.active:
      return
    import jax
    if sync is not None:
      jax.block_until_ready(sync)
    jax.profiler.stop_trace()
    self._mirror.close()
    self.active = False
    self.done = True

  def trace_files(self) -> list[pathlib.Path]:
    if fs.is_remote(self.logdir):  # a bucket lists no `**`
      return sorted(self.logdir.glob("plugins/profile/*/*.xplane.pb"))
    return sorted(self.logdir.rglob("*.xplane.pb"))

  def close(self) -> None:
    self.stop()

  def __enter__(self) -> "ProfileWindow":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
