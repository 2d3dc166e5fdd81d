"""Preemption: stop at a step every process agrees on, after a SIGTERM.

Cloud TPU maintenance events, spot and preemptible VMs and SLURM (before its
kill) announce the end of a job with SIGTERM, to one host or to all. The run
must then stop at the same step boundary on every process, checkpoint there
and exit, so that the next ``train`` resumes exactly.

With ``jax.distributed`` initialized, JAX's preemption service catches the
signal on whichever process receives it and shares the notice through the
coordination service; ``multihost_utils.reached_preemption_sync_point(step)``
then returns True on every process at the same step. A single process without
``jax.distributed`` has nobody to agree with: a SIGTERM handler sets a flag,
read at the next step boundary.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


def _sync_service() -> bool:
  """Whether JAX's preemption service is running (jax.distributed with the service on)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Watch:
  """Answers "stop here?" at each step boundary; a context manager around the run.

  Every process must call :meth:`reached` at every step boundary with the same
  increasing step numbers (the global step), as JAX's sync point requires.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None
    self._installed = False

  def __enter__(self) -> "Watch":
    # JAX's notifier owns SIGTERM when its service runs; a Python handler would replace it.
    if not _sync_service() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """True when the run must checkpoint after `step` and stop (on every process at once)."""
    if _sync_service():
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._signalled.is_set()
