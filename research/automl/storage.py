"""Trial storage: in memory, or a durable SQLite file.

The SQLite store uses the standard library's ``sqlite3`` in WAL mode with
``synchronous=FULL``: every ``tell`` is committed before it returns, so a study whose
process is killed loses nothing that was told, and asked-but-untold trials stay
visible as ``RUNNING``. Every write is one ``BEGIN IMMEDIATE`` transaction, so there is
one writer at a time; other processes wait (``busy_timeout``) and retry with back-off
instead of failing with "database is locked".
"""

from __future__ import annotations

import abc
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from research.automl.trial import Trial
from research.automl.trial import TrialState

__all__ = ["InMemoryStorage", "SQLiteStorage", "Storage", "make_storage"]


def _dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, allow_nan=True)


class Storage(abc.ABC):
    """Interface of a trial store. Implementations must be safe to call from threads."""

    @abc.abstractmethod
    def create_study(self, name: str, directions: Sequence[str], space: Mapping[str, Any], load_if_exists: bool) -> int:
        """Creates (or loads) a study and returns its id.

        Raises:
          ValueError: If the study exists with other directions or another space, or exists
            and ``load_if_exists`` is False.
        """

    @abc.abstractmethod
    def create_trial(
        self,
        study_id: int,
        params: Mapping[str, Any],
        budget: float | None = None,
        attrs: Mapping[str, Any] | None = None,
        cap: tuple[str, Any, int] | None = None,
    ) -> Trial | None:
        """Adds a ``RUNNING`` trial; its number is the next in the study.

        Args:
          cap: ``(attr, value, n)``: create the trial only if fewer than ``n`` trials of the
            study have ``attrs[attr] == value`` (checked and inserted in one transaction, so
            concurrent workers never overfill e.g. a Hyperband bracket).

        Returns:
          The new trial, or ``None`` when ``cap`` was reached.
        """

    @abc.abstractmethod
    def update_trial(
        self,
        trial_id: int,
        *,
        state: TrialState | None = None,
        values: Sequence[float] | None = None,
        budget: float | None = None,
        attrs: Mapping[str, Any] | None = None,
        intermediate: tuple[float, float] | None = None,
    ) -> None:
        """Updates a trial in one transaction (``attrs`` are merged)."""

    @abc.abstractmethod
    def transition(
        self,
        trial_id: int,
        from_state: TrialState,
        to_state: TrialState,
        *,
        expect_attrs: Mapping[str, Any] | None = None,
        budget: float | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> bool:
        """Atomically moves a trial from ``from_state`` to ``to_state`` (compare-and-set).

        The trial changes only if it is in ``from_state`` and its attributes hold every
        ``expect_attrs`` item; ``budget`` and ``attrs`` (merged) are written with the state.
        This is how a scheduler's promotion is claimed: of several workers that planned the
        same promotion, exactly one gets ``True`` and evaluates it.

        Returns:
          Whether this call changed the trial.

        Raises:
          KeyError: No trial with ``trial_id``.
        """

    @abc.abstractmethod
    def get_trials(self, study_id: int) -> list[Trial]:
        """All trials of a study ordered by number."""

    @abc.abstractmethod
    def get_trial(self, trial_id: int) -> Trial:
        """One trial by id."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources."""


def _check_study(name, row_dirs, row_space, directions, space):
    if list(row_dirs) != list(directions):
        raise ValueError(
            f"study {name!r} exists with directions {row_dirs}, not {list(directions)}; "
            "use another name or the same directions"
        )
    if row_space != json.loads(_dumps(space)):
        raise ValueError(
            f"study {name!r} exists with a different search space; use another study name, "
            "or reopen it with the space it was created with"
        )


class InMemoryStorage(Storage):
    """A process-local store (the default)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._studies: dict[str, tuple[int, list[str], Any]] = {}
        self._trials: dict[int, Trial] = {}
        self._by_study: dict[int, list[int]] = {}

    def create_study(self, name, directions, space, load_if_exists):
        with self._lock:
            if name in self._studies:
                if not load_if_exists:
                    raise ValueError(f"study {name!r} exists; pass load_if_exists=True to reopen it")
                sid, dirs, sp = self._studies[name]
                _check_study(name, dirs, sp, directions, space)
                return sid
            sid = len(self._studies) + 1
            self._studies[name] = (sid, list(directions), json.loads(_dumps(space)))
            self._by_study[sid] = []
            return sid

    def create_trial(self, study_id, params, budget=None, attrs=None, cap=None):
        with self._lock:
            if cap is not None and _count_with(
                (self._trials[i].attrs for i in self._by_study[study_id]), cap[0], cap[1]
            ) >= int(cap[2]):
                return None
            tid = len(self._trials) + 1
            t = Trial(
                id=tid,
                number=len(self._by_study[study_id]),
                params=dict(params),
                budget=budget,
                attrs=dict(attrs or {}),
            )
            self._trials[tid] = t
            self._by_study[study_id].append(tid)
            return t

    def update_trial(self, trial_id, *, state=None, values=None, budget=None, attrs=None, intermediate=None):
        with self._lock:
            t = self._trials[trial_id]
            changes: dict[str, Any] = {}
            if state is not None:
                changes["state"] = TrialState(state)
            if values is not None:
                changes["values"] = tuple(float(v) for v in values)
            if budget is not None:
                changes["budget"] = float(budget)
            if attrs:
                changes["attrs"] = {**t.attrs, **attrs}
            if intermediate is not None:
                changes["intermediate"] = {
                    **t.intermediate,
                    float(intermediate[0]): intermediate[1],
                }
            self._trials[trial_id] = _replace(t, **changes)

    def transition(self, trial_id, from_state, to_state, *, expect_attrs=None, budget=None, attrs=None):
        with self._lock:
            if trial_id not in self._trials:
                raise KeyError(f"no trial with id {trial_id}")
            t = self._trials[trial_id]
            if t.state != TrialState(from_state) or not _attrs_hold(t.attrs, expect_attrs):
                return False
            changes: dict[str, Any] = {"state": TrialState(to_state)}
            if budget is not None:
                changes["budget"] = float(budget)
            if attrs:
                changes["attrs"] = {**t.attrs, **attrs}
            self._trials[trial_id] = _replace(t, **changes)
            return True

    def get_trials(self, study_id):
        with self._lock:
            return [self._trials[i] for i in self._by_study[study_id]]

    def get_trial(self, trial_id):
        with self._lock:
            return self._trials[trial_id]


def _same(a: Any, b: Any) -> bool:
    """Attribute equality that survives a JSON round trip (``1 == 1.0``, tuples as lists)."""
    return json.loads(_dumps(a)) == json.loads(_dumps(b))


def _attrs_hold(attrs: Mapping[str, Any], expect: Mapping[str, Any] | None) -> bool:
    return all(k in attrs and _same(attrs[k], v) for k, v in (expect or {}).items())


def _count_with(all_attrs, key: str, value: Any) -> int:
    return sum(1 for a in all_attrs if key in a and _same(a[key], value))


def _replace(t: Trial, **changes) -> Trial:
    import dataclasses  # pylint: disable=import-outside-toplevel

    return dataclasses.replace(t, **changes)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT UNIQUE NOT NULL,
  directions TEXT NOT NULL,
  space TEXT NOT NULL,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  study_id INTEGER NOT NULL REFERENCES studies(id),
  number INTEGER NOT NULL,
  state TEXT NOT NULL,
  params TEXT NOT NULL,
  vals TEXT,
  budget REAL,
  attrs TEXT NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  UNIQUE (study_id, number)
);
CREATE TABLE IF NOT EXISTS intermediate (
  trial_id INTEGER NOT NULL REFERENCES trials(id),
  budget REAL NOT NULL,
  value REAL,
  PRIMARY KEY (trial_id, budget)
);
"""


class SQLiteStorage(Storage):
    """A durable store in one SQLite file (stdlib ``sqlite3``, WAL mode).

    Args:
      path: File path (created with its parent directory if missing).
      timeout_s: How long a writer waits for the lock before giving up.

    Example:
      >>> import tempfile, os
      >>> s = SQLiteStorage(os.path.join(tempfile.mkdtemp(), "study.db"))
      >>> sid = s.create_study("demo", ["minimize"], {}, load_if_exists=True)
    """

    def __init__(self, path: str | os.PathLike, timeout_s: float = 60.0):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._timeout = timeout_s
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"could not switch {self.path} to WAL mode (got {mode!r})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")

        def create_tables(c):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)

        self._write(create_tables)

    # One writer: each write is a BEGIN IMMEDIATE transaction, retried on lock contention.
    def _write(self, fn):
        deadline = time.monotonic() + self._timeout
        delay = 0.01
        with self._lock:
            while True:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise
                    if time.monotonic() > deadline:
                        raise sqlite3.OperationalError(
                            f"{self.path} stayed locked for {self._timeout}s; another process "
                            "holds a write transaction open; raise timeout_s or stop it"
                        ) from e
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                try:
                    out = fn(self._conn)
                    self._conn.execute("COMMIT")
                    return out
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise

    def _read(self, sql: str, args=()):
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def create_study(self, name, directions, space, load_if_exists):
        def fn(c):
            row = c.execute("SELECT id, directions, space FROM studies WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if not load_if_exists:
                    raise ValueError(f"study {name!r} exists in {self.path}; pass load_if_exists=True")
                _check_study(name, json.loads(row[1]), json.loads(row[2]), directions, space)
                return row[0]
            cur = c.execute(
                "INSERT INTO studies (name, directions, space, created) VALUES (?, ?, ?, ?)",
                (name, _dumps(list(directions)), _dumps(space), time.time()),
            )
            return cur.lastrowid

        return self._write(fn)

    def create_trial(self, study_id, params, budget=None, attrs=None, cap=None):
        params = dict(params)
        attrs = dict(attrs or {})

        def fn(c):
            if cap is not None:
                rows = c.execute("SELECT attrs FROM trials WHERE study_id = ?", (study_id,)).fetchall()
                if _count_with((json.loads(r[0]) for r in rows), cap[0], cap[1]) >= int(cap[2]):
                    return None
            number = c.execute(
                "SELECT COALESCE(MAX(number) + 1, 0) FROM trials WHERE study_id = ?", (study_id,)
            ).fetchone()[0]
            now = time.time()
            cur = c.execute(
                "INSERT INTO trials (study_id, number, state, params, vals, budget, attrs, created,"
                " updated) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (
                    study_id,
                    number,
                    TrialState.RUNNING.value,
                    _dumps(params),
                    budget,
                    _dumps(attrs),
                    now,
                    now,
                ),
            )
            return Trial(id=cur.lastrowid, number=number, params=params, budget=budget, attrs=attrs)

        return self._write(fn)

    def update_trial(self, trial_id, *, state=None, values=None, budget=None, attrs=None, intermediate=None):
        def fn(c):
            sets, args = ["updated = ?"], [time.time()]
            if state is not None:
                sets.append("state = ?")
                args.append(TrialState(state).value)
            if values is not None:
                sets.append("vals = ?")
                args.append(_dumps([float(v) for v in values]))
            if budget is not None:
                sets.append("budget = ?")
                args.append(float(budget))
            if attrs:
                old = c.execute("SELECT attrs FROM trials WHERE id = ?", (trial_id,)).fetchone()
                if old is None:
                    raise KeyError(f"no trial with id {trial_id}")
                sets.append("attrs = ?")
                args.append(_dumps({**json.loads(old[0]), **attrs}))
            cur = c.execute(f"UPDATE trials SET {', '.join(sets)} WHERE id = ?", (*args, trial_id))
            if cur.rowcount != 1:
                raise KeyError(f"no trial with id {trial_id}")
            if intermediate is not None:
                b, v = intermediate
                v = None if v is None or not math.isfinite(v) else float(v)
                c.execute(
                    "INSERT OR REPLACE INTO intermediate (trial_id, budget, value) VALUES (?, ?, ?)",
                    (trial_id, float(b), v),
                )

        self._write(fn)

    def transition(self, trial_id, from_state, to_state, *, expect_attrs=None, budget=None, attrs=None):
        def fn(c):
            # Inside BEGIN IMMEDIATE: no other writer can change the row between this read and
            # the conditional UPDATE below, so the check and the claim are one atomic step.
            row = c.execute("SELECT state, attrs FROM trials WHERE id = ?", (trial_id,)).fetchone()
            if row is None:
                raise KeyError(f"no trial with id {trial_id}")
            old_attrs = json.loads(row[1])
            if row[0] != TrialState(from_state).value or not _attrs_hold(old_attrs, expect_attrs):
                return False
            sets, args = ["state = ?", "updated = ?"], [TrialState(to_state).value, time.time()]
            if budget is not None:
                sets.append("budget = ?")
                args.append(float(budget))
            if attrs:
                sets.append("attrs = ?")
                args.append(_dumps({**old_attrs, **attrs}))
            cur = c.execute(
                f"UPDATE trials SET {', '.join(sets)} WHERE id = ? AND state = ?",
                (*args, trial_id, TrialState(from_state).value),
            )
            return cur.rowcount == 1

        return self._write(fn)

    def _rows_to_trials(self, rows, inter_rows) -> list[Trial]:
        inter: dict[int, dict[float, float]] = {}
        for tid, b, v in inter_rows:
            inter.setdefault(tid, {})[b] = float("nan") if v is None else v
        out = []
        for tid, number, state, params, vals, budget, attrs in rows:
            out.append(
                Trial(
                    id=tid,
                    number=number,
                    params=json.loads(params),
                    state=TrialState(state),
                    values=None if vals is None else tuple(json.loads(vals)),
                    budget=budget,
                    intermediate=inter.get(tid, {}),
                    attrs=json.loads(attrs),
                )
            )
        return out

    _COLS = "id, number, state, params, vals, budget, attrs"

    def get_trials(self, study_id):
        with self._lock:
            rows = self._read(f"SELECT {self._COLS} FROM trials WHERE study_id = ? ORDER BY number", (study_id,))
            inter = self._read(
                "SELECT i.trial_id, i.budget, i.value FROM intermediate i JOIN trials t "
                "ON i.trial_id = t.id WHERE t.study_id = ?",
                (study_id,),
            )
        return self._rows_to_trials(rows, inter)

    def get_trial(self, trial_id):
        rows = self._read(f"SELECT {self._COLS} FROM trials WHERE id = ?", (trial_id,))
        if not rows:
            raise KeyError(f"no trial with id {trial_id}")
        inter = self._read("SELECT trial_id, budget, value FROM intermediate WHERE trial_id = ?", (trial_id,))
        return self._rows_to_trials(rows, inter)[0]

    def close(self):
        with self._lock:
            self._conn.close()


def make_storage(storage: str | Storage | None) -> Storage:
    """``None`` -> in memory; ``"sqlite:///path.db"`` -> :class:`SQLiteStorage`; a Storage as is.

    Raises:
      ValueError: On an unknown URL scheme.
    """
    if storage is None:
        return InMemoryStorage()
    if isinstance(storage, Storage):
        return storage
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return SQLiteStorage(storage[len("sqlite:///") :])
    raise ValueError(f"storage={storage!r} is not supported; pass None, a Storage, or 'sqlite:///path/to/file.db'")
