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

import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1

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


def _connect(path: str | os.PathLike, *, create: bool) -> sqlite3.Connection:
    path = os.fspath(path)
    if not create and not os.path.exists(path):
        raise FileNotFoundError(f"no run store at {path}")
    con = sqlite3.connect(path, timeout=30.0)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"run store {path} has schema version {version}, newer than this "
                f"stablestep understands ({SCHEMA_VERSION})"
            )
        if create and version < SCHEMA_VERSION:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.commit()
        elif version == 0:
            raise ValueError(f"{path} is not a stablestep run store")
    except sqlite3.DatabaseError as exc:
        con.close()
        raise ValueError(f"{path} is not a stablestep run store ({exc})") from None
    except BaseException:
        con.close()
        raise
    return con


def list_runs(path: str | os.PathLike) -> list[str]:
    """Names of the runs in the store at ``path``, in creation order."""
    con = _connect(path, create=False)
    try:
        return [r[0] for r in con.execute("SELECT name FROM runs ORDER BY id")]
    finally:
        con.close()


class Run:
    """A read-only view of one stored run (see the module docstring for the contract).

    Every accessor queries the file afresh, so a reader sees the steps a concurrent
    writer has flushed so far.
    """

    def __init__(self, path: str | os.PathLike, run_id: int, name: str, config: dict):
        self.path = os.fspath(path)
        self.name = name
        self.config = config
        self._id = run_id

    def __repr__(self) -> str:
        return f"Run({self.path!r}, name={self.name!r})"

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        con = _connect(self.path, create=False)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def names(self) -> list[str]:
        """Sorted names of the metrics this run has at least one value for."""
        rows = self._query(
            "SELECT DISTINCT n.name FROM metrics m JOIN names n ON n.id = m.name_id "
            "WHERE m.run_id = ? ORDER BY n.name",
            (self._id,),
        )
        return [r[0] for r in rows]

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of metric ``name``: int64 and float64 arrays sorted by step.

        Steps where the value was non-finite are absent (see :attr:`events`). Raises
        ``KeyError`` when the run has no value at all for ``name``.
        """
        rows = self._query(
            "SELECT m.step, m.value FROM metrics m JOIN names n ON n.id = m.name_id "
            "WHERE m.run_id = ? AND n.name = ? ORDER BY m.step",
            (self._id, name),
        )
        if not rows:
            raise KeyError(f"run {self.name!r} has no metric {name!r}")
        arr = np.array(rows, dtype=np.float64)
        return arr[:, 0].astype(np.int64), arr[:, 1]

    @property
    def events(self) -> list[Event]:
        """Events of the run in step order (ties in recording order)."""
        rows = self._query(
            "SELECT step, kind, data FROM events WHERE run_id = ? ORDER BY step, id",
            (self._id,),
        )
        return [Event(int(s), k, json.loads(d)) for s, k, d in rows]

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
        rows = self._query(
            "SELECT m.step, n.name, m.value FROM metrics m JOIN names n ON n.id = m.name_id "
            "WHERE m.run_id = ?",
            (self._id,),
        )
        long = pd.DataFrame(rows, columns=["step", "name", "value"])
        wide = long.pivot(index="step", columns="name", values="value").sort_index()
        wide.columns.name = None
        return wide


def open_run(path: str | os.PathLike, run: str | None = None) -> Run:
    """Open run ``run`` of the store at ``path`` for reading.

    With ``run=None`` the store must hold exactly one run, or the most recently
    created one is returned when it holds several. Raises ``FileNotFoundError`` for
    a missing file, ``ValueError`` for a file that is not a run store, and ``KeyError``
    (listing the available runs) for an unknown run name.
    """
    con = _connect(path, create=False)
    try:
        if run is None:
            row = con.execute(
                "SELECT id, name, config FROM runs ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if row is None:
                raise KeyError(f"run store {os.fspath(path)} holds no runs")
        else:
            row = con.execute("SELECT id, name, config FROM runs WHERE name = ?", (run,)).fetchone()
            if row is None:
                have = [r[0] for r in con.execute("SELECT name FROM runs ORDER BY id")]
                raise KeyError(f"no run {run!r} in {os.fspath(path)}; runs: {have}")
    finally:
        con.close()
    return Run(path, int(row[0]), row[1], json.loads(row[2]))


class RunWriter:
    """Buffered writer of one run: the Monitor's side of the store.

    ``add``/``event`` only append to memory; :meth:`flush` writes the buffer in one
    transaction. ``resume_from=step`` reopens an existing run and first deletes
    everything recorded at ``step`` or later (the abandoned part of a run resumed
    from an earlier checkpoint), so the stored run has neither duplicated nor
    missing steps. Without ``resume_from`` an existing run name is an error.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        run: str,
        *,
        config: dict,
        resume_from: int | None = None,
    ):
        self.path = os.fspath(path)
        self.run = run
        self._con = _connect(self.path, create=True)
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._names: dict[str, int] = {}
        self._metrics: list[tuple[int, int, int, float]] = []
        self._events: list[tuple[int, int, str, str]] = []
        self._closed = False
        row = self._con.execute("SELECT id FROM runs WHERE name = ?", (run,)).fetchone()
        if row is not None and resume_from is None:
            self._con.close()
            raise ValueError(
                f"run {run!r} already exists in {self.path}; choose another run name "
                "or resume it with Monitor.load_state_dict()"
            )
        with self._con:
            if row is None:
                cur = self._con.execute(
                    "INSERT INTO runs (name, config, created_at) VALUES (?, ?, ?)",
                    (run, json.dumps(config, default=str), time.time()),
                )
                self.run_id = int(cur.lastrowid)
            else:
                self.run_id = int(row[0])
                self._con.execute(
                    "DELETE FROM metrics WHERE run_id = ? AND step >= ?", (self.run_id, resume_from)
                )
                self._con.execute(
                    "DELETE FROM events WHERE run_id = ? AND step >= ?", (self.run_id, resume_from)
                )

    def _name_id(self, name: str) -> int:
        nid = self._names.get(name)
        if nid is None:
            self._con.execute("INSERT OR IGNORE INTO names (name) VALUES (?)", (name,))
            nid = int(
                self._con.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()[0]
            )
            self._names[name] = nid
        return nid

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer the metrics of one step; non-finite values are dropped (the caller
        records the event explaining them)."""
        for name, value in metrics.items():
            if math.isfinite(value):
                self._metrics.append((self.run_id, name, int(step), float(value)))  # type: ignore[arg-type]

    def event(self, step: int, kind: str, data: dict | None = None) -> None:
        """Buffer an event."""
        self._events.append((self.run_id, int(step), kind, json.dumps(data or {}, default=str)))

    @property
    def pending(self) -> int:
        """Number of buffered metric values and events not yet written."""
        return len(self._metrics) + len(self._events)

    def flush(self) -> None:
        """Write everything buffered in one transaction (visible to readers after it)."""
        if self._closed or not self.pending:
            return
        with self._con:
            rows = [(r, self._name_id(n), s, v) for r, n, s, v in self._metrics]
            self._con.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, name_id, step, value) VALUES (?, ?, ?, ?)",
                rows,
            )
            self._con.executemany(
                "INSERT INTO events (run_id, step, kind, data) VALUES (?, ?, ?, ?)", self._events
            )
        self._metrics.clear()
        self._events.clear()

    def close(self) -> None:
        """Flush and close the file; further calls do nothing."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._con.close()
