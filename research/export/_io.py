"""Atomic file writes and on-disk size measurements for export artifacts."""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
from collections.abc import Callable
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on success moves it onto ``path`` atomically.

    The temporary file lives in the same directory (so ``os.replace`` is an atomic rename on
    POSIX). If the body raises, the temporary file is removed and ``path`` is left exactly as it
    was: a half-written or unverified artifact never replaces a good one.

    Args:
      path: the final destination.

    Yields:
      A temporary file path to write (and verify) the artifact at.

    Example:
      >>> import tempfile, os
      >>> d = tempfile.mkdtemp()
      >>> with atomic_path(os.path.join(d, "a.bin")) as tmp:
      ...     _ = open(tmp, "wb").write(b"ok")
      >>> open(os.path.join(d, "a.bin"), "rb").read()
      b'ok'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, verify: Callable[[str], None] | None = None) -> None:
    """Writes ``data`` to ``path`` atomically, after ``verify(tmp_path)`` (if given) succeeds.

    Args:
      path: destination file.
      data: the bytes to write.
      verify: optional check run on the written temporary file; if it raises, ``path`` is not
        touched and the error propagates.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        if verify is not None:
            verify(tmp)


def gzip_size(path: str | os.PathLike) -> int:
    """Returns the size in bytes of ``path`` compressed with gzip (level 9).

    For a masked (unstructured-sparse) model the zeros stay in the file, but compress well: the
    gzip size is what shipping the artifact compressed costs.
    """
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9, mtime=0))
