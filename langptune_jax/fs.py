"""File-system helpers for outputs that appear all at once and follow the umask.

`tempfile.mkdtemp` creates its folder with mode 0700 whatever the umask, so a
dataset or an export renamed into place from such a folder would be private
to its writer; `temp_dir` gives the folder the mode a plain `mkdir` would.
"""

from __future__ import annotations

import os
import pathlib
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
