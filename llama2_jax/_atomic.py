"""Writing output files and directories so that readers find all of them or none."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import uuid


@contextlib.contextmanager
def atomic_file(path: str | pathlib.Path, *, binary: bool = False, permissions: int = 0o644):
  """Yields an open temporary file that is renamed to `path` when the block succeeds.

  The file is a hidden sibling of `path`, flushed to disk before the rename, so a reader sees
  the old file or the whole new one. If the block raises, the temporary file is deleted.

  Args:
    path: the file to write; its directory is created if missing.
    binary: open the file in binary mode instead of UTF-8 text.
    permissions: mode bits of the new file (mkstemp alone would make it owner-only).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                           suffix=".tmp")
  try:
    os.chmod(temporary, permissions)
    mode, encoding = ("wb", None) if binary else ("w", "utf-8")
    with os.fdopen(descriptor, mode, encoding=encoding) as file:
      yield file
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_directory(path: str | pathlib.Path, overwrite: bool = False):
  """Yields an empty temporary directory that is renamed to `path` when the block succeeds.

  The temporary directory is a hidden sibling of `path`, on the same file system, so publishing
  it is one `os.rename`. If the block raises, the temporary directory is deleted and `path` is
  left as it was. With `overwrite`, an existing `path` is first renamed aside and deleted after
  the new one is in place, so `path` is briefly absent but never partly written.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(
        f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(temporary)  # Unlike tempfile.mkdtemp, honours the umask (mkdtemp makes it 0700).
  try:
    yield temporary
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise

  previous = None
  if path.exists():
    previous = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, previous)
  os.rename(temporary, path)
  if previous is not None:
    if previous.is_dir():
      shutil.rmtree(previous)
    else:
      previous.unlink()
