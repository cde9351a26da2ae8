"""Runs of a stablestep run store (the SQLite file the Monitor writes)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stablestep.diagnosis.sources._common import (
    ReadInfo,
    SourceError,
    build_trace,
    report,
    warn,
)
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names


def from_run(run: Any, *, source: str = "", infos: list[ReadInfo] | None = None) -> Trace:
    """A stored run (:func:`stablestep.open_run`) as a trace: every metric, the optimizer's
    hyperparameters from ``run.config["hyper"]`` and the steps of non-finite events."""
    available = list(run.names())
    nonfinite = [int(e.step) for e in run.events if e.kind == names.EVENT_NONFINITE]
    if names.LOSS not in available and not nonfinite:
        raise SourceError(f"{source or run.name}: the run {run.name!r} has no "
                          f"'{names.LOSS}' metric")
    per_layer = (names.ATTN_LOGIT_MAX + "/",)  # the diagnosis names the layers it blames
    wanted = [n for n in available if "/" not in n or n.startswith(per_layer)]
    series = {n: run.series(n) for n in wanted}
    if names.LOSS in series:
        steps, loss = series.pop(names.LOSS)
    else:
        steps, loss = np.zeros(0, dtype=np.int64), np.zeros(0)
    metrics = series
    config = run.config if isinstance(run.config, dict) else {}
    hyper = config.get("hyper")
    hyper = dict(hyper) if isinstance(hyper, dict) else {}
    for key in ("dtypes", "batch_size", "full_batch"):  # what the remedies must fit (#11)
        if config.get(key) is not None:
            hyper[key] = config[key]
    # the guard's actions (and other events) go with the trace: diagnose shows them
    events = [{"step": int(e.step), "kind": e.kind, "data": e.data} for e in run.events
              if e.kind != names.EVENT_NONFINITE]
    trace = build_trace(steps, loss, metrics=metrics, hyper=hyper, nonfinite_steps=nonfinite,
                        name=str(getattr(run, "name", "")), source=source, events=events)
    report(ReadInfo(source or str(getattr(run, "path", "")), trace.name, names.LOSS, "step",
                    len(trace), int(trace.steps[0]) if len(trace) else None,
                    int(trace.steps[-1]) if len(trace) else None,
                    int((~np.isfinite(trace.loss)).sum())), infos)
    return trace


STORE_FILES = ("run.sqlite", "stablestep.db")
"""The store's file name inside a directory: the lab's output directory, and the Lightning,
HF and Keras callbacks' default (their framework's log or output directory)."""


def store_path(path: str) -> str | None:
    """The store file of ``path``: itself if a SQLite file, ``DIR/run.sqlite`` (a lab
    output directory) or ``DIR/stablestep.db`` (a callback's log directory) for a
    directory, else ``None``."""
    if os.path.isdir(path):
        return next((p for p in (os.path.join(path, f) for f in STORE_FILES) if is_sqlite(p)),
                    None)
    return path if is_sqlite(path) else None


def is_sqlite(path: str) -> bool:
    """Whether ``path`` is a regular file starting with the SQLite header."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def read_store(path: str, run: str | None, *, infos: list[ReadInfo] | None = None
               ) -> list[Trace]:
    """Every run of the store (or only ``run``). A run with no loss and no non-finite
    event (a crash before its first flush) is skipped with a warning, so it does not
    hide the other runs; asking for it by name is an error."""
    from stablestep.telemetry.store import RunNotFoundError, StoreError, list_runs, open_run

    try:
        runs = list_runs(path)
        if run is not None and run not in runs:
            raise RunNotFoundError(path, run, runs)
        chosen = [run] if run is not None else runs
        if not chosen:
            raise SourceError(f"{path}: the run store holds no runs")
        out, empty = [], []
        for name in chosen:
            r = open_run(path, name)
            try:
                out.append(from_run(r, source=path, infos=infos))
            except SourceError:
                if run is not None:
                    raise
                empty.append(name)
    except RunNotFoundError as exc:
        raise SourceError(str(exc)) from None
    except (StoreError, FileNotFoundError) as exc:
        raise SourceError(str(exc).splitlines()[0]) from None
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        warn(f"{path}: skipped {len(empty)} run(s) with no loss recorded ({shown}; "
             "a crash before the first flush leaves that)")
    if not out:
        raise SourceError(f"{path}: no run in the store has a '{names.LOSS}' metric")
    return out
