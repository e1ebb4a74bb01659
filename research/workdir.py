"""Run directories that are locked while in use and whose stages are keyed by the config that made them.

Three things live here, all pure Python (no JAX), so the command line can use them before the
heavy imports:

* :class:`WorkdirLock`: an advisory lock (``fcntl.flock``) on ``WORKDIR/.lock`` holding the
  holder's pid, host, start time and command as JSON. A second process on the same directory
  gets :class:`WorkdirInUseError` ("workdir W is in use by pid N on HOST since T") at once; the
  lock of a process that died (kill -9, power loss) is released by the kernel, and the next run
  takes it over with a warning naming the dead holder. ``slimjax run`` and ``slimjax export``
  take it exclusively; reading a finished run (``load_run``: a distillation ``teacher_run``)
  takes it shared.
* Stage keys: stage ``i`` of a config is keyed by the SHA-256 of the canonical JSON of the config
  without its ``name`` and with ``stages[: i + 1]`` only (so data, model, seed, the other
  top-level fields and every stage up to and including ``i``). Each stage directory holds its
  key in ``key.json``. :func:`reconcile` compares a directory with a new config: stages whose key
  still matches are reused, the others are moved to ``WORKDIR/replaced/<label>-<key>/`` (and moved
  back if a later config has that key again); a config whose first stage differs is refused.
* :func:`read_json`: reads a JSON file of a run directory and, when it is missing or corrupt,
  raises an error that names the file and how to fix it.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from research import config as config_lib

LOCK_NAME = ".lock"
KEY_NAME = "key.json"
REPLACED_DIR = "replaced"
STAGES_DIR = "stages"


class WorkdirInUseError(RuntimeError):
    """Another live process holds the workdir's lock; the message names its pid, host and start time."""


class WorkdirWarning(UserWarning):
    """Something in a run directory was repaired or set aside (a stale lock, a replaced stage)."""


class RunFileError(OSError):
    """A file of a run directory is missing or unreadable; the message names the file and the fix."""


# ----------------------------------------------------------------------------- lock


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: Mapping[str, Any]) -> str:
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


#: The locks this process holds, by real path: a shared lock on a directory this process holds
#: (reading its own run) is a no-op instead of a self-deadlock; a second exclusive one is refused.
_HELD: dict[str, WorkdirLock] = {}


class WorkdirLock:
    """An advisory lock on a run (or sweep) directory, held for the life of one process's use.

    ``WORKDIR/.lock`` is locked with ``fcntl.flock``. The exclusive lock (``slimjax run``,
    ``slimjax export``) writes ``{"pid", "host", "started", "command"}`` into the file; on release
    it is emptied (never deleted, so two processes always lock the same file). The kernel releases
    the lock of a killed process, so a lock file that still names a holder when the lock is free
    was left by a process that died: it is taken over with a :class:`WorkdirWarning`. On a file
    system without ``flock`` the pid in the file decides (alive on this host: in use).

    A shared lock (``shared=True``: reading a finished run, e.g. a distillation ``teacher_run``)
    can be held by many readers at once and writes nothing; it is refused while a process holds
    the exclusive lock, and an exclusive lock is refused while readers hold it. A directory the
    reader may not write (another user's run) is read without a lock. A process that holds a
    lock on the directory may also read it (the shared lock is then a no-op); a second exclusive
    lock is refused, in this process too.

    Example:
      >>> with WorkdirLock("/tmp/runs/a"):   # doctest: +SKIP
      ...     ...  # a second process opening the same lock raises WorkdirInUseError
    """

    def __init__(self, workdir: str | os.PathLike, *, command: str | None = None, shared: bool = False):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.shared = shared
        if command is None:
            command = " ".join([os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]])
        self.command = command[:200]
        self._fd: int | None = None
        self._key: str | None = None

    def _read_holder(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable lock file {self.path}"}
        return holder if isinstance(holder, dict) else None

    def _in_use(self, holder: Mapping[str, Any] | None, extra: str = "") -> WorkdirInUseError:
        who = _describe(holder) if holder else "another process" if self.shared else "another process (reading it)"
        fix = (
            "wait for it to finish before reading the run"
            if self.shared
            else "wait for it to finish, or choose another --workdir"
        )
        return WorkdirInUseError(f"workdir {self.workdir} is in use by {who}; {fix}{extra}")

    def _open(self) -> int | None:
        if not self.shared:
            os.makedirs(self.workdir, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not os.path.isdir(self.workdir):
            return None  # nothing to read; the reader reports the missing directory itself
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # a read-only directory without a lock file: nobody can be writing through it

    def acquire(self) -> WorkdirLock:
        """Takes the lock.

        Raises:
          WorkdirInUseError: another live process holds it (the exclusive lock, or for an
            exclusive request any lock).
        """
        if self._fd is not None or self._key is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
        key = os.path.realpath(self.workdir)
        if self.shared and key in _HELD:
            self._key = ""  # reading a directory this process holds: nothing to take
            return self
        fd = self._open()
        if fd is None:
            self._key = ""
            return self
        try:
            holder = None
            try:
                import fcntl

                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                locked = True
            except (BlockingIOError, PermissionError):
                raise self._in_use(self._read_holder(fd)) from None
            except (ImportError, OSError) as e:  # no flock here (some network file systems)
                if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                locked = False
            holder = self._read_holder(fd)
            if holder:
                pid, host = holder.get("pid"), holder.get("host")
                if not locked and (host != socket.gethostname() or (isinstance(pid, int) and pid_alive(pid))):
                    raise self._in_use(holder, f" (if that process is gone, delete {self.path})")
                if not self.shared:
                    warnings.warn(
                        f"taking over the lock of {self.workdir} left by {_describe(holder)}, which is no longer running",
                        WorkdirWarning,
                        stacklevel=3,
                    )
            if not self.shared:
                me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": self.command}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._key = fd, key
        _HELD[key] = self
        return self

    def release(self) -> None:
        """Releases the lock (emptying the file first if exclusive); a no-op when not held or nested."""
        key, self._key = self._key, None
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(key, None)
        try:
            if not self.shared:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- stage keys


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _as_dict(config: config_lib.Config | Mapping[str, Any]) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return config_lib.to_dict(config)
    # A dict read back from config.json: normalise it the same way (tuples were lists already).
    return json.loads(_canonical(config))


def stage_prefix(config: config_lib.Config | Mapping[str, Any], index: int) -> dict[str, Any]:
    """What stage ``index``'s result depends on: the config without ``name``, stages up to ``index``."""
    d = _as_dict(config)
    d.pop("name", None)
    d["stages"] = list(d.get("stages", []))[: index + 1]
    return d


def stage_keys(config: config_lib.Config | Mapping[str, Any]) -> list[str]:
    """The SHA-256 (hex) key of every stage of ``config`` (a :class:`Config` or its ``config.json`` dict).

    Example:
      >>> from research.config import Config
      >>> from research.stages import TrainStage
      >>> a = stage_keys(Config(stages=(TrainStage(steps=10), TrainStage(steps=5))))
      >>> b = stage_keys(Config(name="other", stages=(TrainStage(steps=10), TrainStage(steps=6))))
      >>> a[0] == b[0], a[1] == b[1]
      (True, False)
    """
    d = _as_dict(config)
    n = len(d.get("stages", []))
    return [hashlib.sha256(_canonical(stage_prefix(d, i)).encode()).hexdigest() for i in range(n)]


def stage_labels(config: config_lib.Config | Mapping[str, Any]) -> list[str]:
    """``<index>_<kind>`` of every stage, the names of the stage directories."""
    return [f"{i}_{s['kind']}" for i, s in enumerate(_as_dict(config).get("stages", []))]


def config_diff(old: Any, new: Any, prefix: str = "", limit: int = 4) -> list[str]:
    """Up to ``limit`` ``"key: old -> new"`` lines between two config dicts (dotted keys, stages by index)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if len(out) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{key}.{k}" if key else k)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and key.endswith("stages"):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{key}.{i}")
        elif key.endswith("stages") and isinstance(a, list) and isinstance(b, list):
            for i in range(max(len(a), len(b))):
                walk(a[i] if i < len(a) else "<none>", b[i] if i < len(b) else "<none>", f"{key}.{i}")
        else:
            ra, rb = _short(a), _short(b)
            out.append(f"{key}: {ra} -> {rb}")

    walk(_as_dict(old) if isinstance(old, Mapping) else old, _as_dict(new) if isinstance(new, Mapping) else new, prefix)
    return out


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) and value.startswith("<") else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike, *, fix: str) -> Any:
    """The JSON content of ``path``.

    Raises:
      RunFileError: the file is missing, unreadable or not valid JSON; the message names the file,
        what is wrong and ``fix``.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise RunFileError(f"{path} does not exist; {fix}") from None
    except OSError as e:
        raise RunFileError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        state = "is empty" if not text.strip() else f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        raise RunFileError(f"{path} {state}; it may have been truncated; {fix}") from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON through a temporary file and a rename (never half-written)."""
    path = os.fspath(path)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- reconcile


def _replaced_path(workdir: str, label: str, key: str | None) -> str:
    base = os.path.join(workdir, REPLACED_DIR, f"{label}-{(key or 'unkeyed')[:12]}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _stage_key(sdir: str) -> str | None:
    try:
        with open(os.path.join(sdir, KEY_NAME), encoding="utf-8") as f:
            return json.load(f).get("key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def prepare_stage_dir(workdir: str, label: str, key: str, prefix: Mapping[str, Any]) -> list[str]:
    """Makes ``WORKDIR/stages/<label>/`` hold stage results for ``key`` and returns notes on what it did.

    An existing directory with the same key is kept (it is resumed or reused); a directory for
    this key set aside earlier under ``replaced/`` is moved back; otherwise a new directory is
    created with ``key.json`` (``{"key", "config"}``) written before anything else.
    """
    sdir = os.path.join(workdir, STAGES_DIR, label)
    if os.path.isdir(sdir) and _stage_key(sdir) == key:
        return []
    notes = []
    if os.path.exists(sdir):  # reconcile() moves mismatches aside first; this guards direct callers
        dest = _replaced_path(workdir, label, _stage_key(sdir))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(sdir, dest)
        notes.append(f"[{label}] results of a different config moved to {dest}")
    earlier = os.path.join(workdir, REPLACED_DIR, f"{label}-{key[:12]}")
    if os.path.isdir(earlier) and _stage_key(earlier) == key:
        os.makedirs(os.path.dirname(sdir), exist_ok=True)
        os.replace(earlier, sdir)
        notes.append(f"[{label}] this stage config ran here before; its results were moved back from {earlier}")
        return notes
    os.makedirs(sdir, exist_ok=True)
    write_json_atomic(os.path.join(sdir, KEY_NAME), {"key": key, "config": prefix})
    return notes


def _old_config(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    return read_json(
        path,
        fix="delete it (the stage directories' key.json files are enough to resume), "
        "or start over with --overwrite or a new --workdir",
    )


def reconcile(workdir: str, config: config_lib.Config) -> list[str]:
    """Makes ``workdir`` hold only stage results that ``config`` can reuse, and writes its ``config.json``.

    Call it with the workdir's :class:`WorkdirLock` held. Stage directories whose key matches the
    config's stage of the same label are kept; the others (a changed stage and every stage after
    it, stages the config no longer has) are moved to ``WORKDIR/replaced/<label>-<key>/``. A
    stage directory without ``key.json`` (a run directory from before stage keys) is adopted when
    ``config.json`` shows it was made by the same prefix.

    Returns:
      One note per directory moved or adopted (for the user).

    Raises:
      ConfigError: the workdir holds a run whose first stage (or data, model, seed) differs; the
        message says how to proceed (a new ``--workdir``, or ``--overwrite``).
      RunFileError: ``config.json`` is unreadable and no stage directory carries its key.
    """
    os.makedirs(workdir, exist_ok=True)
    keys = stage_keys(config)
    labels = stage_labels(config)
    new_dict = config_lib.to_dict(config)
    stages_root = os.path.join(workdir, STAGES_DIR)
    existing = (
        sorted(e for e in os.listdir(stages_root) if os.path.isdir(os.path.join(stages_root, e)))
        if os.path.isdir(stages_root)
        else []
    )
    try:
        old = _old_config(workdir)
    except RunFileError:
        if existing and all(_stage_key(os.path.join(stages_root, e)) for e in existing):
            old = None  # the key files still say what each stage directory holds
            warnings.warn(
                f"{workdir}/config.json is unreadable; using the stage directories' key.json files",
                WorkdirWarning,
                stacklevel=2,
            )
        else:
            raise
    old_keys = stage_keys(old) if old is not None else []
    old_labels = stage_labels(old) if old is not None else []

    def key_of(label: str) -> str | None:
        key = _stage_key(os.path.join(stages_root, label))
        if key is None and label in old_labels:  # legacy directory: config.json made it
            key = old_keys[old_labels.index(label)]
        return key

    if old_keys:
        first_old = old_keys[0]
    else:  # no config.json: the first stage directory's key.json tells
        first_old = next((key_of(e) for e in existing if e.split("_", 1)[0] == "0"), None)
    if first_old is not None and first_old != keys[0]:
        changed = config_diff(old, new_dict) if old is not None else []
        what = f" ({'; '.join(changed)})" if changed else ""
        raise config_lib.ConfigError(
            f"{workdir} holds a run of a different config{what}, which changes its first stage; "
            "use a new --workdir, or --overwrite to delete that run and start over"
        )
    notes = []
    for entry in existing:
        sdir = os.path.join(stages_root, entry)
        key = key_of(entry)
        if entry in labels and key == keys[labels.index(entry)]:
            if _stage_key(sdir) is None:
                write_json_atomic(
                    os.path.join(sdir, KEY_NAME), {"key": key, "config": stage_prefix(config, labels.index(entry))}
                )
            continue
        dest = _replaced_path(workdir, entry, key)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(sdir, dest)
        if entry in labels and old is not None:
            i = labels.index(entry)
            changed = config_diff(stage_prefix(old, i), stage_prefix(new_dict, i), limit=3)
            why = f"config changed ({'; '.join(changed)})" if changed else "config changed"
        elif entry in labels:
            why = "config changed"
        else:
            why = "the config has no such stage now"
        notes.append(f"[{entry}] {why}: its earlier results were moved to {dest}")
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(config) + "\n")
    os.replace(path + ".tmp", path)
    return notes


def clear(workdir: str, *, markers: Sequence[str]) -> list[str]:
    """Deletes everything in ``workdir`` except its lock file (for ``--overwrite``).

    Only a directory that holds one of ``markers`` (e.g. ``config.json``, ``stages``) or is empty
    is cleared, so a mistyped ``--workdir`` never wipes unrelated files.

    Returns:
      The names deleted.

    Raises:
      ConfigError: ``workdir`` is not empty and holds none of ``markers``.
    """
    if not os.path.isdir(workdir):
        return []
    entries = sorted(e for e in os.listdir(workdir) if e != LOCK_NAME)
    if entries and not any(m in entries for m in markers):
        raise config_lib.ConfigError(
            f"--overwrite refuses to delete {workdir}: it holds files but no {' or '.join(markers)}, so it is not "
            "a slimjax run directory; choose another --workdir"
        )
    for entry in entries:
        path = os.path.join(workdir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return entries


# ----------------------------------------------------------------------------- default workdir


def overrides_key(overrides: Sequence[str]) -> str:
    """A short hash of ``--set`` overrides (keys stripped, values parsed, the last of a repeated key wins)."""
    items: dict[str, Any] = {}
    for item in overrides:
        key, _, text = item.partition("=")
        items[key.strip()] = config_lib.parse_value(text.strip())
    return hashlib.sha256(_canonical(items).encode()).hexdigest()[:8]


def default_workdir(name: str, overrides: Sequence[str] = (), *, suffix: str = "") -> str:
    """``runs/<name><suffix>``, or ``runs/<name>-<hash of overrides><suffix>`` when ``--set`` was given.

    So a run with overrides never lands in (and collides with) the base config's directory, and
    the same overrides find the same directory again (to resume).

    Example:
      >>> default_workdir("quickstart")
      'runs/quickstart'
      >>> default_workdir("quickstart", ["seed=1"]) == default_workdir("quickstart", [" seed = 1 "])
      True
    """
    tag = f"-{overrides_key(overrides)}" if overrides else ""
    return os.path.join("runs", f"{name}{tag}{suffix}")
