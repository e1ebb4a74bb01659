"""Atomic file writes and on-disk size measurements for export artifacts."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

from research.workdir import pid_alive


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


_STAGING_PREFIX = ".export-staging-"


def staging_dir(out_dir: str | os.PathLike, name: str) -> str:
    """Creates an empty staging directory for one export inside ``out_dir`` and returns it.

    Staging directories left by exports whose process died (named with the owner's pid) are
    removed first, so a killed export does not leave its partial files behind for long.

    Args:
      out_dir: the export's destination directory (created if missing).
      name: the export's file name stem.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(out_dir):
        if not entry.startswith(_STAGING_PREFIX):
            continue
        pid = entry[len(_STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-{name}-", dir=out_dir)


def set_manifest_path(out_dir: str | os.PathLike, name: str) -> str:
    """Path of the manifest ``{name}.export.json`` that lists the files of an export set."""
    return os.path.join(os.fspath(out_dir), f"{name}.export.json")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_export_set(
    stage: str | os.PathLike, out_dir: str | os.PathLike, name: str, info: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Moves every file of a finished export from ``stage`` into ``out_dir`` as one set.

    Each file is renamed into place (atomic per file: same file system); then files that the
    previous set's manifest lists but this set lacks are removed, and the manifest
    ``{name}.export.json`` (file names, SHA-256 hashes, date, ``info``) is written last,
    atomically. Only files named in a previous manifest are ever removed. A process killed
    during the renames (a few milliseconds) leaves files whose hashes do not match the manifest,
    which :func:`check_export_set` reports.

    Args:
      stage: the staging directory (from :func:`staging_dir`), holding only this export's files.
      out_dir: the destination directory.
      name: the export's file name stem.
      info: JSON-ready facts to keep in the manifest (formats, quantization modes).

    Returns:
      ``{staged path: final path}`` for every file moved.
    """
    stage, out_dir = os.fspath(stage), os.fspath(out_dir)
    manifest_path = set_manifest_path(out_dir, name)
    previous: list[str] = []
    if os.path.exists(manifest_path):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(manifest_path) as f:
                previous = list(json.load(f)["files"])
    files = sorted(f for f in os.listdir(stage) if os.path.isfile(os.path.join(stage, f)))
    hashes = {f: _sha256(os.path.join(stage, f)) for f in files}
    moved = {}
    for f in files:
        src, dst = os.path.join(stage, f), os.path.join(out_dir, f)
        os.replace(src, dst)
        moved[src] = dst
    for f in previous:
        if f not in hashes and os.path.basename(f) == f:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, f))
    manifest = {
        "name": name,
        "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "files": hashes,
        **dict(info or {}),
    }
    write_bytes_atomic(manifest_path, json.dumps(manifest, indent=2).encode())
    _fsync_dir(out_dir)
    return moved


def check_export_set(out_dir: str | os.PathLike, name: str = "model") -> dict[str, Any]:
    """Checks that the files of the last export set in ``out_dir`` are the ones it wrote.

    Args:
      out_dir: an export directory.
      name: the export's file name stem.

    Returns:
      The set's manifest (``{"name", "exported_at", "files": {file: sha256}, ...}``).

    Raises:
      FileNotFoundError: no manifest (no export finished in ``out_dir``), or a listed file is
        missing.
      ValueError: a listed file's content differs from the export that wrote the manifest.
    """
    path = set_manifest_path(out_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: no export named {name!r} finished in {out_dir}")
    with open(path) as f:
        manifest = json.load(f)
    for f, digest in manifest["files"].items():
        p = os.path.join(os.fspath(out_dir), f)
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} is listed in {path} but missing; export again")
        if _sha256(p) != digest:
            raise ValueError(
                f"{p} is not the file the export of {manifest['exported_at']} wrote (SHA-256 differs); "
                "an export was interrupted while moving its files or the file was changed: export again"
            )
    return manifest
