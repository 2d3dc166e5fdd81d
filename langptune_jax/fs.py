"""Paths of run outputs, local or in a bucket, and writes that appear all at once.

`path` is the one way a work directory and everything under it is named:
a ``gs://`` (or other ``scheme://``) address becomes an `etils.epath.Path`,
which reads and writes the bucket through fsspec (gcsfs); anything else stays
a `pathlib.Path`, expanded and made absolute as before. Both share the
pathlib API this package uses (``/``, open, read/write_text, exists, is_dir,
iterdir, glob, mkdir, unlink, replace).

A bucket has no rename, no append and no file that native code (array_record,
TensorBoard, the XLA profiler) can open, so `LocalMirror` gives such writers a
local folder that `push` copies to the bucket, and `local_copy` fetches a
remote folder for readers that need local files.

`tempfile.mkdtemp` creates its folder with mode 0700 whatever the umask, so a
dataset or an export renamed into place from such a folder would be private
to its writer; `temp_dir` gives the folder the mode a plain `mkdir` would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile
import threading

_UMASK_LOCK = threading.Lock()

def umask() -> int:
  """The process umask (read by setting and restoring it)."""
  with _UMASK_LOCK:
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def temp_dir(parent: str | os.PathLike, prefix: str) -> pathlib.Path:
  """A new empty folder in `parent` with the mode `mkdir` gives under the umask."""
  path = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
  os.chmod(path, 0o777 & ~umask())
  return path


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` names an object store (``gs://bucket/...``) rather than a local path."""
  return "://" in os.fspath(p)


def path(p: str | os.PathLike):
  """`p` as a path object: epath for ``scheme://`` addresses, else an absolute pathlib.Path."""
  if is_remote(p):
    from etils import epath  # deferred: only bucket paths need fsspec
    return epath.Path(os.fspath(p))
  return pathlib.Path(p).expanduser().resolve()


def as_path(p: str | os.PathLike):
  """Like `path`, but a local path is kept as given (relative, with ``~``)."""
  return path(p) if is_remote(p) else pathlib.Path(p)


def join(p: str | os.PathLike, *parts: str) -> str:
  """`p / parts` as a string, for APIs that take strings (`os.path.join` is fine for both)."""
  return os.fspath(path(p).joinpath(*parts)) if is_remote(p) else os.path.join(p, *parts)


def makedirs(p: str | os.PathLike) -> None:
  """Creates folder `p` (a no-op on a bucket, where folders are name prefixes)."""
  path(p).mkdir(parents=True, exist_ok=True)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes `data` so that readers see the old file or the whole new one.

  Locally through a temporary file renamed over `p`; a bucket object is
  replaced in one upload anyway.
  """
  target = path(p)
  if is_remote(p):
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(p: str | os.PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(p, text.encode("utf-8"))


def create_new(p: str | os.PathLike, data: bytes) -> None:
  """Writes file `p` only if it does not exist yet, else FileExistsError.

  On GCS this is one upload with ``ifGenerationMatch=0``: of two processes
  racing to create the object, exactly one succeeds.
  """
  if not is_remote(p):
    with open(path(p), "xb") as f:
      f.write(data)
    return
  import fsspec  # epath's open has no exclusive mode; gcsfs has ("xb")
  filesystem, name = fsspec.core.url_to_fs(os.fspath(p))
  with filesystem.open(name, "xb") as f:
    f.write(data)


def rmtree(p: str | os.PathLike) -> None:
  """Removes folder `p` and everything under it, if it exists."""
  target = path(p)
  if is_remote(p):
    if target.exists():
      target.rmtree()
  else:
    shutil.rmtree(target, ignore_errors=True)


def upload_tree(local: str | os.PathLike, remote: str | os.PathLike,
                last: tuple[str, ...] = ()) -> None:
  """Copies the files under local folder `local` to `remote`; names in `last` go last.

  Readers that wait for a marker file (a dataset's stats.json) then never see
  a partial folder.
  """
  local = pathlib.Path(local)
  target = path(remote)
  files = sorted(f for f in local.rglob("*") if f.is_file())
  files.sort(key=lambda f: f.relative_to(local).as_posix() in last)
  for f in files:
    dest = target.joinpath(*f.relative_to(local).parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(f.read_bytes())


def download_tree(remote: str | os.PathLike, local: str | os.PathLike) -> None:
  """Copies every file under `remote` into local folder `local`."""
  source = path(remote)
  local = pathlib.Path(local)
  pending = [source]
  while pending:
    folder = pending.pop()
    for entry in folder.iterdir():
      if entry.is_dir():
        pending.append(entry)
        continue
      rel = os.fspath(entry)[len(os.fspath(source)):].lstrip("/")
      dest = local / rel
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_bytes(entry.read_bytes())


def local_copy(p: str | os.PathLike, marker: str) -> pathlib.Path:
  """`p` itself when local; a remote folder is downloaded once into the temp directory.

  The copy is keyed by the address and the content of `marker` (a file in the
  folder that changes whenever the folder does), so a rebuilt folder is fetched again.
  """
  if not is_remote(p):
    return path(p)
  source = path(p)
  key = hashlib.sha256(os.fspath(source).encode() + b"\0" + (source / marker).read_bytes())
  local = pathlib.Path(tempfile.gettempdir()) / f"langptune-{key.hexdigest()[:16]}"
  if (local / marker).is_file():
    return local
  staging = temp_dir(local.parent, prefix=f".{local.name}.tmp-")
  try:
    download_tree(source, staging)
    os.replace(staging, local)
  except OSError:
    if not (local / marker).is_file():  # another process won the rename: use its copy
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return local


class LocalMirror:
  """A local folder for writers that need one; `push` copies new and grown files to `remote`.

  For a local `remote` the folder is `remote` itself and `push` does nothing.
  The files named in `fetch` that already exist at `remote` are downloaded
  first (so appending to a metrics file continues it); only files in the
  local folder are ever pushed.
  """

  def __init__(self, remote: str | os.PathLike, fetch: tuple[str, ...] = ()):
    self.remote = remote
    self.mirrored = is_remote(remote)
    self._sent: dict[str, tuple[int, int]] = {}
    if not self.mirrored:
      self.local = path(remote)
      return
    self.local = pathlib.Path(tempfile.mkdtemp(prefix="langptune-mirror-"))
    for name in fetch:
      source = path(remote) / name
      if source.exists():
        (self.local / name).write_bytes(source.read_bytes())
    self._sent = self._stamps()

  def _stamps(self) -> dict[str, tuple[int, int]]:
    return {f.relative_to(self.local).as_posix(): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in self.local.rglob("*") if f.is_file()}

  def push(self) -> None:
    if not self.mirrored:
      return
    stamps = self._stamps()
    target = path(self.remote)
    for rel, stamp in sorted(stamps.items()):
      if self._sent.get(rel) != stamp:
        dest = target.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((self.local / rel).read_bytes())
    self._sent = stamps

  def close(self) -> None:
    """Pushes what is left and removes the local folder."""
    if self.mirrored:
      self.push()
      shutil.rmtree(self.local, ignore_errors=True)
