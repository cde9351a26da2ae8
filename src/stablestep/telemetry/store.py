"""The run store: one SQLite file holding many runs' metrics, events and configuration.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    runs(id, name UNIQUE, config JSON, created_at)
    names(id, name UNIQUE)                      -- metric names, interned
    metrics(run_id, name_id, step, value REAL)  -- primary key (run_id, name_id, step)
    events(id, run_id, step, kind, data JSON)

The file is opened in WAL mode, so any number of readers (``open_run`` in another
process, a report, the diagnosis) can read while one writer appends. Only finite
metric values are ever stored: a NaN/Inf is *missing* in ``metrics`` and explained
by an event of kind :data:`stablestep.telemetry.names.EVENT_NONFINITE`.

Reading (the contract other subsystems rely on, see ``docs/architecture.md``)::

    run = open_run("runs.db", run="adam-eps1e-8")   # run=None: the only/latest run
    run.name, run.config                            # str, dict
    run.names()                                     # sorted metric names
    steps, values = run.series("loss")              # int64, float64 numpy arrays
    run.events                                      # list[Event(step, kind, data)]
    run.to_dataframe()                              # pandas, one column per metric
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
_INT64 = 2 ** 63
log = logging.getLogger("stablestep.telemetry.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL,
    name_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, name_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, step);
"""


@dataclass(frozen=True)
class Event:
    """Something that happened at a step: a non-finite value, a guard action, ...

    ``kind`` is one of the ``EVENT_*`` names in :mod:`stablestep.telemetry.names`;
    ``data`` is a JSON-serialisable dict whose keys depend on the kind.
    """

    step: int
    kind: str
    data: dict = field(default_factory=dict)


def _one_line(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


class StoreError(ValueError):
    """A path that is not a readable stablestep run store (a directory, a foreign or
    corrupt SQLite file, a newer schema); the message is one line."""

    def __init__(self, message: str = ""):
        super().__init__(_one_line(message))


class RunNotFoundError(KeyError):
    """No run of that name in the store; the message lists the runs there are.

    A ``KeyError`` (for code that caught the old error) whose ``str`` is the plain
    message, the same for every command that names a run.
    """

    def __init__(self, path: str | os.PathLike, run: str, available: list[str]):
        super().__init__(missing_run_message(os.fspath(path), run, available))
        self.path, self.run, self.available = os.fspath(path), run, list(available)

    def __str__(self) -> str:
        return str(self.args[0])


def missing_run_message(where: str, run: str, available: list[str], *,
                        unnamed: bool = False) -> str:
    """The one message for a run name that is not there, whatever the command or source:
    ``no run 'x' in PATH; runs: a, b`` (the first 20 names); ``unnamed``: the source
    holds one run without a name (a plain CSV or TensorBoard directory)."""
    names = [_one_line(n)[:80] for n in available]
    shown = ", ".join(names[:20]) + (f" ... ({len(names)} in all)" if len(names) > 20 else "")
    rest = (f"runs: {shown}" if names else
            "it holds one run without a name (leave out the run name)" if unnamed else
            "it holds no runs")
    return _one_line(f"no run {str(run)[:200]!r} in {where}; {rest}")


def _check_file(path: str) -> None:
    if os.path.exists(path) and not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        raise StoreError(f"{path} is {kind}, not a run store")


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken first (waiting up to the
    connection's timeout), so a check and the write that depends on it are atomic."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _retry_locked(fn, timeout: float = 30.0):  # noqa: ANN001, ANN202 - tiny helper
    """Retry ``fn`` while SQLite says the database is locked (``journal_mode`` changes do
    not wait on the busy timeout)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _connect(path: str | os.PathLike, *, create: bool) -> sqlite3.Connection:
    """An autocommit connection to the store at ``path`` (created when ``create``).

    Creation is safe when several processes start at once: the schema is written inside
    one ``BEGIN IMMEDIATE`` transaction after re-reading the schema version under the
    write lock, so exactly one process creates it and the others see it done.
    """
    path = os.fspath(path)
    _check_file(path)
    if not create and not os.path.exists(path):
        raise FileNotFoundError(f"no run store at {path}")
    try:
        con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the run store ({exc})") from None
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"run store {path} has schema version {version}, newer than this "
                f"stablestep understands ({SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return con
        if not create:
            raise StoreError(f"{path} is not a stablestep run store")
        _retry_locked(lambda: con.execute("PRAGMA journal_mode=WAL").fetchone())
        with _transaction(con):
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                foreign = con.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT IN "
                    "('runs', 'names', 'metrics', 'events', 'events_by_run')").fetchone()[0]
                if foreign:
                    raise StoreError(f"{path} is an SQLite database but not a stablestep "
                                     "run store")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreError(f"run store {path} has schema version {version}, not "
                                 f"{SCHEMA_VERSION}")
    except sqlite3.DatabaseError as exc:
        con.close()
        raise StoreError(f"{path} is not a stablestep run store ({exc})") from None
    except BaseException:
        con.close()
        raise
    return con


def _guard(path: str):  # noqa: ANN202 - a context manager
    """Turn SQLite's errors on a damaged file into one-line :class:`StoreError`."""
    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: unreadable run store ({exc})") from None
    return cm()


def list_runs(path: str | os.PathLike) -> list[str]:
    """Names of the runs in the store at ``path``, in creation order."""
    con = _connect(path, create=False)
    try:
        with _guard(os.fspath(path)):
            return [str(r[0]) for r in con.execute("SELECT name FROM runs ORDER BY id")]
    finally:
        con.close()


def _json_dict(text: str, what: str, where: str) -> dict:
    """A stored JSON object; damaged or non-object JSON becomes ``{}`` (logged), so a
    hand-edited config or event never stops a reader."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        log.warning("%s: %s is not valid JSON; read as empty", where, what)
        return {}
    if not isinstance(data, dict):
        log.warning("%s: %s is a JSON %s, not an object; read as empty", where, what,
                    type(data).__name__)
        return {}
    return data


class Run:
    """A read-only view of one stored run (see the module docstring for the contract).

    Every accessor queries the file afresh, so a reader sees the steps a concurrent
    writer has flushed so far.
    """

    def __init__(self, path: str | os.PathLike, run_id: int, name: str, config: dict):
        self.path = os.fspath(path)
        self.name = name
        self.config = config if isinstance(config, dict) else {}
        self._id = run_id

    def __repr__(self) -> str:
        return f"Run({self.path!r}, name={self.name!r})"

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        con = _connect(self.path, create=False)
        try:
            with _guard(self.path):
                return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def names(self) -> list[str]:
        """Sorted names of the metrics this run has at least one value for."""
        rows = self._query(
            "SELECT n.name FROM names n WHERE EXISTS (SELECT 1 FROM metrics m WHERE "
            "m.run_id = ? AND m.name_id = n.id) ORDER BY n.name",
            (self._id,),
        )
        return [str(r[0]) for r in rows]

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of metric ``name``: int64 and float64 arrays sorted by step.

        Steps where the value was non-finite are absent (see :attr:`events`). Raises
        ``KeyError`` when the run has no value at all for ``name``. Streams one column at
        a time into the arrays (16 bytes a step, no per-row Python objects kept); steps
        that are every integer from the first to the last (the primary key makes them
        unique, so the count proves it) are not read at all. One read transaction: a
        concurrent writer's flush lands wholly before or after.
        """
        con = _connect(self.path, create=False)
        try:
            with _guard(self.path):
                con.execute("BEGIN")
                try:
                    steps, values = self._series(con, name)
                finally:
                    con.execute("COMMIT")
        finally:
            con.close()
        if steps.size == 0:
            raise KeyError(f"run {self.name!r} has no metric {name!r}")
        return steps, values

    def _series(self, con: sqlite3.Connection, name: str) -> tuple[np.ndarray, np.ndarray]:
        row = con.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()
        if row is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        key = (self._id, row[0])
        where = "FROM metrics WHERE run_id = ? AND name_id = ?"
        try:  # the fast path: one column flattened in C
            values = np.fromiter(itertools.chain.from_iterable(
                con.execute(f"SELECT value {where} ORDER BY step", key)), dtype=np.float64)
        except (ValueError, TypeError):  # a hand-edited value that is text
            values = np.fromiter((_as_float(v) for (v,) in con.execute(
                f"SELECT value {where} ORDER BY step", key)), dtype=np.float64)
        count = values.size
        if not count:
            return np.zeros(0, dtype=np.int64), values
        # one index lookup each (min and max alone in a query)
        lo = con.execute(f"SELECT min(step) {where}", key).fetchone()[0]
        hi = con.execute(f"SELECT max(step) {where}", key).fetchone()[0]
        if isinstance(lo, int) and isinstance(hi, int) and hi - lo + 1 == count:
            steps = np.arange(lo, hi + 1, dtype=np.int64)
        else:
            steps = np.fromiter(itertools.chain.from_iterable(
                con.execute(f"SELECT step {where} ORDER BY step", key)), dtype=np.float64,
                count=count).astype(np.int64)
        return steps, values

    @property
    def events(self) -> list[Event]:
        """Events of the run in step order (ties in recording order)."""
        rows = self._query(
            "SELECT step, kind, data FROM events WHERE run_id = ? ORDER BY step, id",
            (self._id,),
        )
        return [Event(int(s), str(k), _json_dict(d, f"event {k!r} at step {s}", self.path))
                for s, k, d in rows]

    def last_step(self) -> int | None:
        """The largest step with a metric or an event, ``None`` for an empty run."""
        row = self._query(
            "SELECT max(s) FROM (SELECT max(step) AS s FROM metrics WHERE run_id = ?1 "
            "UNION ALL SELECT max(step) FROM events WHERE run_id = ?1)",
            (self._id,),
        )
        return None if row[0][0] is None else int(row[0][0])

    def to_dataframe(self):
        """All metrics as a ``pandas.DataFrame``: index ``step``, one column per name.

        Missing values (not recorded at that step, or non-finite) are NaN in the frame.
        Requires pandas (``pip install stablestep[pandas]``).
        """
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas is in the dev extra
            raise ImportError("Run.to_dataframe() needs pandas: pip install pandas") from None
        cols = {n: pd.Series(v, index=s) for n in self.names() for s, v in [self.series(n)]}
        wide = pd.DataFrame(cols).sort_index() if cols else pd.DataFrame()
        wide.index.name = "step"
        return wide


def _as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def open_run(path: str | os.PathLike, run: str | None = None) -> Run:
    """Open run ``run`` of the store at ``path`` for reading.

    With ``run=None`` the store must hold exactly one run, or the most recently
    created one is returned when it holds several. Raises ``FileNotFoundError`` for
    a missing file, :class:`StoreError` (a ``ValueError``) for a file that is not a run
    store, and :class:`RunNotFoundError` (a ``KeyError``, listing the available runs)
    for an unknown run name.
    """
    con = _connect(path, create=False)
    try:
        with _guard(os.fspath(path)):
            if run is None:
                row = con.execute(
                    "SELECT id, name, config FROM runs ORDER BY id DESC LIMIT 1"
                ).fetchone()
            else:
                row = con.execute("SELECT id, name, config FROM runs WHERE name = ?",
                                  (run,)).fetchone()
            if row is None:
                have = [str(r[0]) for r in con.execute("SELECT name FROM runs ORDER BY id")]
                raise RunNotFoundError(path, run if run is not None else "(latest)", have)
    finally:
        con.close()
    name = str(row[1])
    return Run(path, int(row[0]), name,
               _json_dict(row[2], f"the config of run {name!r}", os.fspath(path)))


def _free_name(con: sqlite3.Connection, run: str) -> str:
    """``run`` if unused, else ``run-2``, ``run-3``... (the first free one)."""
    taken = {str(r[0]) for r in con.execute(
        "SELECT name FROM runs WHERE name = ? OR substr(name, 1, ?) = ?",
        (run, len(run) + 1, run + "-"))}
    if run not in taken:
        return run
    k = 2
    while f"{run}-{k}" in taken:
        k += 1
    return f"{run}-{k}"


class RunWriter:
    """Buffered writer of one run: the Monitor's side of the store.

    ``add``/``event`` only append to memory; :meth:`flush` writes the buffer in one
    transaction. What happens when run ``run`` already exists in the store:

    - by default a *new* run is started under the first free name ``run-2``,
      ``run-3``... (logged; :attr:`run` holds the name actually used), so running a
      script twice never crashes and never mixes two runs;
    - ``overwrite=True`` deletes the old run and starts it afresh under ``run``;
    - ``resume_from=step`` reopens it and first deletes everything recorded at ``step``
      or later (the abandoned part of a run resumed from an earlier checkpoint), so the
      stored run has neither duplicated nor missing steps.

    Several processes may create the same new store and claim names at once: each claim
    is one ``BEGIN IMMEDIATE`` transaction.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        run: str,
        *,
        config: dict,
        resume_from: int | None = None,
        overwrite: bool = False,
    ):
        if resume_from is not None and overwrite:
            raise ValueError("RunWriter: resume_from and overwrite=True exclude each other")
        if resume_from is not None and not (-_INT64 <= int(resume_from) < _INT64):
            raise ValueError(f"RunWriter: resume_from={resume_from} is beyond int64")
        self.path = os.fspath(path)
        self.requested = run
        self._con = _connect(self.path, create=True)
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._names: dict[str, int] = {}
        self._metrics: list[tuple[int, str, int, float]] = []
        self._events: list[tuple[int, int, str, str]] = []
        self._closed = False
        self._skipped = 0
        try:
            config_text = json.dumps(config if isinstance(config, dict) else {"value": config},
                                     default=str, allow_nan=False)
        except ValueError:
            config_text = json.dumps(json.loads(json.dumps(config, default=str)), default=str)
        try:
            with _transaction(self._con):
                row = self._con.execute("SELECT id FROM runs WHERE name = ?", (run,)).fetchone()
                if row is not None and resume_from is not None:
                    self.run, self.run_id = run, int(row[0])
                    for table in ("metrics", "events"):
                        self._con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step >= ?",
                                          (self.run_id, int(resume_from)))
                    return
                if row is not None and overwrite:
                    for table in ("metrics", "events"):
                        self._con.execute(f"DELETE FROM {table} WHERE run_id = ?", (row[0],))
                    self._con.execute("DELETE FROM runs WHERE id = ?", (row[0],))
                    log.info("run %r in %s overwritten", run, self.path)
                self.run = run if row is None or overwrite else _free_name(self._con, run)
                cur = self._con.execute(
                    "INSERT INTO runs (name, config, created_at) VALUES (?, ?, ?)",
                    (self.run, config_text, time.time()),
                )
                self.run_id = int(cur.lastrowid)
        except BaseException:
            self._con.close()
            raise
        if self.run != run:
            log.info("run %r already exists in %s; recording this one as %r "
                        "(overwrite=True replaces it, resuming continues it)",
                        run, self.path, self.run)

    def _name_id(self, name: str) -> int:
        nid = self._names.get(name)
        if nid is None:
            self._con.execute("INSERT OR IGNORE INTO names (name) VALUES (?)", (name,))
            nid = int(
                self._con.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()[0]
            )
            self._names[name] = nid
        return nid

    @staticmethod
    def _step(step: int) -> int:
        s = int(step)
        if not -_INT64 <= s < _INT64:
            raise ValueError(f"step {step} is beyond int64, the store's step type")
        return s

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer the metrics of one step; non-finite values are dropped (the caller
        records the event explaining them), and so are values that are not numbers
        (logged once)."""
        s = self._step(step)
        for name, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                if not self._skipped:
                    log.warning("run %r: metric %r at step %d is not a number (%.40r); "
                                "not stored", self.run, name, s, value)
                self._skipped += 1
                continue
            if math.isfinite(v):
                self._metrics.append((self.run_id, str(name), s, v))

    def event(self, step: int, kind: str, data: dict | None = None) -> None:
        """Buffer an event."""
        self._events.append((self.run_id, self._step(step), str(kind),
                             json.dumps(data or {}, default=str)))

    @property
    def pending(self) -> int:
        """Number of buffered metric values and events not yet written."""
        return len(self._metrics) + len(self._events)

    def flush(self) -> None:
        """Write everything buffered in one transaction (visible to readers after it)."""
        if self._closed or not self.pending:
            return
        try:
            self._write()
        except BaseException:
            self._names.clear()  # ids inserted by the rolled-back transaction are gone
            raise
        self._metrics.clear()
        self._events.clear()

    def _write(self) -> None:
        with _transaction(self._con):
            rows = [(r, self._name_id(n), s, v) for r, n, s, v in self._metrics]
            self._con.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, name_id, step, value) VALUES (?, ?, ?, ?)",
                rows,
            )
            self._con.executemany(
                "INSERT INTO events (run_id, step, kind, data) VALUES (?, ?, ?, ?)", self._events
            )

    def close(self) -> None:
        """Flush and close the file; further calls do nothing."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._con.close()
