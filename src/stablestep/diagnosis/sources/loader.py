"""``load()``: pick the reader for a source (a path, a ``Run``, a :class:`Trace`, an
in-memory log) and apply the run selection."""

from __future__ import annotations

import os
from typing import Any

from stablestep.diagnosis.sources._common import ReadInfo, SourceError, check_path
from stablestep.diagnosis.sources.jsonlogs import read_json
from stablestep.diagnosis.sources.objects import from_object
from stablestep.diagnosis.sources.stored import from_run, read_store, store_path
from stablestep.diagnosis.sources.tabular import read_csv
from stablestep.diagnosis.sources.tensorboard import event_dirs, read_tensorboard
from stablestep.diagnosis.sources.textlog import read_text_log
from stablestep.diagnosis.trace import Trace


def _read_file(path: str, infos: list[ReadInfo] | None) -> list[Trace]:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv"):
        return read_csv(path, infos=infos)
    if ext in (".json", ".jsonl"):
        return read_json(path, infos=infos)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise SourceError(f"{path}: the file is empty")
    if b"\x00" in head:
        raise SourceError(f"{path}: binary data, not a training log")
    lead = head.lstrip()
    if lead[:1] in (b"{", b"["):
        return read_json(path, infos=infos)
    first = lead.split(b"\n", 1)[0]
    if any(d in first for d in (b",", b"\t", b";")) and b":" not in first and b"=" not in first:
        return read_csv(path, infos=infos)
    return read_text_log(path, infos=infos)


def load(source: Any, *, run: str | None = None,
         infos: list[ReadInfo] | None = None) -> list[Trace]:
    """Read ``source`` (a path, a ``Run``, a :class:`Trace`, or an in-memory log) into one
    trace per run.

    ``run`` selects one run of a multi-run source (a store, a CSV with a ``run`` column,
    a TensorBoard directory with several runs, a W&B chart export); an unknown name is
    a :class:`SourceError` listing the runs there are. ``infos``, when given, receives
    one :class:`ReadInfo` per trace read.
    """
    from stablestep.telemetry.store import missing_run_message

    if isinstance(source, Trace):
        traces = [source]
    elif hasattr(source, "series") and hasattr(source, "names"):
        traces = [from_run(source, infos=infos)]
    elif isinstance(source, (str, bytes, os.PathLike)):
        path = os.fsdecode(source)
        check_path(path)
        store = store_path(path)
        if store is not None:
            return read_store(store, run, infos=infos)
        if os.path.isdir(path):
            if not event_dirs(path):
                raise SourceError(f"{path}: a directory with neither TensorBoard event files "
                                  "nor a run store (run.sqlite or stablestep.db)")
            traces = read_tensorboard(path, infos=infos)
        else:
            traces = _read_file(path, infos)
    else:
        traces = from_object(source, infos=infos)
        if traces is None:
            raise SourceError(f"cannot read a {type(source).__name__} as a training log "
                              "(expected a path, a Run, a DataFrame, a Series, a dict, an "
                              "ndarray or a list)")
    if run is None:
        return traces
    chosen = [t for t in traces if t.name == run]
    if not chosen and len(traces) == 1 and traces[0].name == "":
        only = traces[0]
        label = os.path.basename(os.path.normpath(str(only.source))) if only.source else ""
        if run == label:
            chosen = traces
    if not chosen:
        where = traces[0].source if traces and traces[0].source else type(source).__name__
        named = [t.name for t in traces if t.name]
        raise SourceError(missing_run_message(where, run, named, unnamed=not named))
    return chosen
