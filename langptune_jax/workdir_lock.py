"""One run per work directory: an advisory file lock naming its holder.

`train`, `evaluate`, `export` and `prepare` hold ``<workdir>/.langptune.lock``
(an ``fcntl.flock`` lock; the file records host, pid and command) while they
run. A second command on the same work directory fails at once with one line
naming the holder instead of colliding on checkpoint and dataset files.

The kernel drops a flock lock when its holder dies, so a lock file left by a
killed process is simply taken over. A lock still held although the recorded
process on this host is gone (a forked child kept the open file) is stale too:
the file is replaced and the new one locked. The file is removed on release;
a lock is only trusted once the locked file is still the one at the path.

On a bucket (``gs://...``) there is no flock: the lock is an object created
with create-if-absent (an upload that GCS refuses when the object exists, so
of two commands racing for it exactly one wins) and deleted on release. GCS
cannot tell whether its holder is alive, so a lock object left by a killed
process on another host stays until it is deleted by hand (the error names it);
one left by a dead process on this host is taken over as above.

In a multi-process run each process locks its own file (``.langptune.lock.<i>``
for process i > 0), so the processes of one run never block each other while
a second run's process 0 still finds process 0's lock taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys

from langptune_jax import fs

LOCK_NAME = ".langptune.lock"


class WorkdirLockedError(ValueError):
  """Another live process holds the work directory."""


def _process_index() -> int:
  jax = sys.modules.get("jax")  # only a run that already started JAX can be multi-process
  return int(jax.process_index()) if jax is not None else 0


def lock_path(workdir: str | os.PathLike):
  index = _process_index()
  base = fs.as_path(workdir)
  return base / (LOCK_NAME if index == 0 else f"{LOCK_NAME}.{index}")


def _holder(path) -> dict[str, str]:
  try:
    text = path.read_text()
  except (OSError, ValueError):
    return {}
  fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
  return fields


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _is_stale(holder: dict[str, str]) -> bool:
  """A holder recorded on this host whose process no longer exists."""
  pid = holder.get("pid", "")
  return holder.get("host") == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def _describe(holder: dict[str, str]) -> str:
  if not holder:
    return "another process (no holder recorded)"
  return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')})")


def _record(command: str) -> str:
  return f"host={socket.gethostname()} pid={os.getpid()} command={command}\n"


def _locked(path, holder: dict[str, str]) -> WorkdirLockedError:
  return WorkdirLockedError(
      f"workdir {path.parent} is in use by {_describe(holder)}; wait for it to finish or "
      f"use another --workdir (lock file {path})")


def _acquire_object(path, command: str) -> None:
  """Creates the lock object if it is absent (GCS: ifGenerationMatch=0)."""
  for _ in range(3):
    if path.exists():
      holder = _holder(path)
      if not _is_stale(holder):
        raise _locked(path, holder)
      print(f"warning: taking over the stale lock {path} of {_describe(holder)}",
            file=sys.stderr)
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
      fs.create_new(path, _record(command).encode())  # fails if another process made it since
      return
    except FileExistsError:
      continue
  raise WorkdirLockedError(f"workdir {path.parent}: could not take the lock {path}")


def acquire(workdir: str | os.PathLike, command: str) -> int | None:
  """Locks `workdir` for `command`; returns the open lock file descriptor (None on a bucket)."""
  path = lock_path(workdir)
  if fs.is_remote(workdir):
    _acquire_object(path, command)
    return None
  path.parent.mkdir(parents=True, exist_ok=True)
  for _ in range(10):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise ValueError(f"workdir {path.parent}: cannot lock {path} ({e.strerror})") from e
      holder = _holder(path)
      if _is_stale(holder):
        print(f"warning: taking over the stale lock {path} of {_describe(holder)}",
              file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
          path.unlink()
        continue
      raise _locked(path, holder) from None
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:  # released and removed between our open and our lock
      same = False
    if not same:
      os.close(fd)
      continue
    os.ftruncate(fd, 0)
    os.write(fd, _record(command).encode())
    return fd
  raise WorkdirLockedError(f"workdir {path.parent}: could not take the lock {path}")


def release(workdir: str | os.PathLike, fd: int | None) -> None:
  """Removes the lock file (while still holding it) and closes it."""
  if fd is None:  # a bucket's lock object
    with contextlib.suppress(FileNotFoundError):
      lock_path(workdir).unlink()
    return
  with contextlib.suppress(FileNotFoundError):
    path = lock_path(workdir)
    if os.stat(path).st_ino == os.fstat(fd).st_ino:
      path.unlink()
  os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, command: str):
  """Holds the lock of `workdir` for the duration of the block."""
  fd = acquire(workdir, command)
  try:
    yield
  finally:
    release(workdir, fd)
