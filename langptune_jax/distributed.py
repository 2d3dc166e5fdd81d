"""Multi-host start-up and process-local helpers.

One JAX process runs per host (a TPU VM worker, a SLURM task, a GPU node).
:func:`initialize` connects them before any device is touched; afterwards
``jax.devices()`` lists every device of every process and jitted steps run
SPMD over all of them. Each process feeds only its own rows of a global batch
(``parallel.global_batch`` places only the rows of the process's own devices),
host-side results every process needs come back through :func:`to_host`, and
only the coordinator writes files (:func:`is_coordinator`).

Where the coordinator comes from, in order:

1. ``config.distributed.coordinator_address`` (with ``num_processes`` and
   ``process_id``), e.g. for a hand-launched cluster or a local test;
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
   and ``JAX_PROCESS_ID`` (what tpu_scripts/ and the SLURM script export);
3. JAX's own cluster detection (Cloud TPU metadata, SLURM, Open MPI), used when
   ``config.distributed.initialize`` is true and nothing above is set.

A process that dies takes the run down with it, in bounded time: the others
fail at their next collective (:func:`exit_on_lost_peer` turns that into one
line and exit status 3), and one blocked elsewhere is ended by JAX once the dead
process has sent no heartbeat for ``distributed.heartbeat_timeout_seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
LOST_PEER_EXIT = 3  # apart from a bad config (2), so launchers can restart on it


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """How to reach the coordinator; empty address means "let JAX detect the cluster"."""
  coordinator_address: str = ""
  num_processes: int | None = None
  process_id: int | None = None
  source: str = "auto"  # config | environment | auto


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def cluster_spec(dist_config=None) -> ClusterSpec | None:
  """The cluster to join, or None for a single-process run.

  Args:
    dist_config: ``config.distributed`` (fields initialize, coordinator_address,
      num_processes, process_id) or None.
  """
  address = str(getattr(dist_config, "coordinator_address", "") or "")
  if address:
    num = int(getattr(dist_config, "num_processes", 0) or 0)
    pid = int(getattr(dist_config, "process_id", -1))
    if num < 1:
      raise ValueError(f"distributed.num_processes={num}: must be >= 1 when "
                       f"distributed.coordinator_address={address!r} is set")
    if not 0 <= pid < num:
      raise ValueError(f"distributed.process_id={pid}: must be in [0, {num}) when "
                       f"distributed.coordinator_address={address!r} is set")
    return ClusterSpec(address, num, pid, "config")
  address = os.environ.get(ENV_ADDRESS, "").strip()
  if address:
    num, pid = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
    if num is None or pid is None:
      raise ValueError(f"{ENV_ADDRESS}={address!r} is set, so {ENV_NUM_PROCESSES} and "
                       f"{ENV_PROCESS_ID} must be set too")
    if not 0 <= pid < num:
      raise ValueError(f"{ENV_PROCESS_ID}={pid}: must be in [0, {ENV_NUM_PROCESSES}={num})")
    return ClusterSpec(address, num, pid, "environment")
  if bool(getattr(dist_config, "initialize", False)):
    return ClusterSpec(source="auto")
  return None


_initialized = False


def initialize(dist_config=None, *, log=logging.info) -> bool:
  """Joins the cluster described by the config or the environment; True if it did.

  Call once at start, before any other JAX call touches devices. Safe to call
  again (a no-op). On CPU the gloo collectives are selected, which makes
  multi-process CPU runs (tests, laptops) work.
  """
  global _initialized
  spec = cluster_spec(dist_config)
  if spec is None or _initialized:
    return _initialized
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs: dict[str, Any] = _timeouts(dist_config)
  if spec.coordinator_address:
    kwargs.update(coordinator_address=spec.coordinator_address,
                  num_processes=spec.num_processes, process_id=spec.process_id)
  # The preemption sync point (langptune_jax.preemption) needs JAX's preemption service.
  jax.config.update("jax_enable_preemption_service", True)
  jax.distributed.initialize(**kwargs)
  _initialized = True
  log(f"distributed: process {jax.process_index()} of {jax.process_count()} "
      f"({spec.source}), {jax.local_device_count()} local of {jax.device_count()} devices")
  return True


def _timeouts(dist_config) -> dict[str, int]:
  """jax.distributed.initialize's timeouts from ``config.distributed`` (JAX's defaults without)."""
  out = {}
  for field, arg in (("heartbeat_timeout_seconds", "heartbeat_timeout_seconds"),
                     ("initialization_timeout_seconds", "initialization_timeout")):
    value = getattr(dist_config, field, None)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"distributed.{field}={value!r}: must be an integer >= 1")
    out[arg] = value
  return out


# What a collective or the coordination service reports when another process is gone.
_LOST_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                    "heartbeat", "unhealthy", "task is set to error", "socket closed")


def lost_peer_message(error: BaseException) -> str | None:
  """One line for an error caused by another process of the run dying, else None."""
  if jax.process_count() < 2:
    return None
  text = str(error)
  if not any(sign in text.lower() for sign in _LOST_PEER_SIGNS):
    return None
  first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
  return (f"process {jax.process_index()} of {jax.process_count()}: another process of this "
          f"run died or became unreachable ({first[:200]}); stopping. Start every process "
          "again to resume from the last checkpoint")


@contextlib.contextmanager
def exit_on_lost_peer():
  """Ends this process with one line and LOST_PEER_EXIT when another process died.

  ``os._exit`` skips JAX's shutdown barrier at exit, which would wait for the
  dead process until the heartbeat timeout and then abort with a stack dump.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    message = lost_peer_message(e)
    if message is None:
      raise
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(LOST_PEER_EXIT)


def shutdown() -> None:
  global _initialized
  if _initialized:
    jax.distributed.shutdown()
    _initialized = False


def is_coordinator() -> bool:
  """True on process 0: the one that writes metrics, plots and exports."""
  return jax.process_index() == 0


def shard_indices(num_items: int, process_id: int | None = None,
                  num_processes: int | None = None) -> np.ndarray:
  """This process's contiguous, disjoint slice of range(num_items) (sizes differ by <= 1).

  Used to split work that is not a jitted batch, e.g. which users a process
  writes profiles for or which items it tokenizes.
  """
  pid = jax.process_index() if process_id is None else process_id
  n = jax.process_count() if num_processes is None else num_processes
  bounds = np.linspace(0, num_items, n + 1).round().astype(int)
  return np.arange(bounds[pid], bounds[pid + 1])


def local_rows(global_rows: int, mesh, rules=None) -> slice:
  """Rows of a global batch this process must provide to ``parallel.global_batch``.

  A process feeds exactly the rows that its own devices hold under the
  batch sharding; they are contiguous, so this is a slice.
  """
  from langptune_jax import parallel  # pylint: disable=g-import-not-at-top
  sharding = parallel.batch_sharding(mesh, 1, rules or parallel.DEFAULT_RULES)
  index_map = sharding.addressable_devices_indices_map((global_rows,))
  starts, stops = [], []
  for (row,) in index_map.values():
    start, stop, _ = row.indices(global_rows)
    starts.append(start)
    stops.append(stop)
  lo, hi = min(starts), max(stops)
  covered = sum(stop - start for start, stop in set(zip(starts, stops)))
  if covered != hi - lo:
    raise ValueError(f"global batch of {global_rows} rows: this process's rows are not "
                     "contiguous under the mesh's batch sharding")
  return slice(lo, hi)


def sync(name: str) -> None:
  """Barrier: every process waits here until all have arrived (no-op single-process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def broadcast_from_coordinator(tree: Any) -> Any:
  """Process 0's values of a pytree of host arrays/scalars, on every process."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.broadcast_one_to_all(tree)


def assert_same_on_all_processes(tree: Any, what: str = "value") -> None:
  """Raises if a host pytree differs between processes (e.g. configs, seeds)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.assert_equal(tree, fail_message=f"{what} differs between processes")


def process_allgather(tree: Any) -> Any:
  """Concatenates per-process host arrays along a new leading process axis."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(x)[None], tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=False)


def to_host(tree: Any) -> Any:
  """The full value of every array of a pytree as numpy, on every process.

  A global array spanning other processes' devices is gathered from all of them
  (``multihost_utils.process_allgather``); anything else is read locally.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def host_scalars(metrics: dict) -> dict[str, float]:
  """A step's metrics as host floats, the same on every process."""
  return {k: float(v) for k, v in to_host(metrics).items()}


def describe(devices: Sequence[jax.Device] | None = None) -> str:
  """One line about the processes and devices, for logs."""
  devices = list(devices or jax.devices())
  kinds = sorted({d.device_kind for d in devices})
  return (f"process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local / {len(devices)} global devices ({', '.join(kinds)})")
