"""Assemble reports: a store's runs (:func:`write_report`), a lab scenario with its story
and scores (:func:`write_scenario_report`), and an index of scenarios (:func:`write_index`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stablestep.report import plots
from stablestep.report.html import (
    fmt,
    incident_list,
    incidents_for,
    missing_note,
    page,
    panels,
    render,
    table,
)
from stablestep.text import printable


def _spike_findings(spikes: Sequence[int], diverged_at: int | None) -> list[dict]:
    """Stand-in findings from the lab's own scoring when no diagnosis is available."""
    out = [{"step": int(s), "kind": "spike", "mechanism": "not diagnosed"} for s in spikes]
    if diverged_at is not None:
        out.append({"step": int(diverged_at), "kind": "non-finite", "mechanism": "not diagnosed"})
    return out


def fmt_spikes(spikes: Sequence[int] | None) -> str:
    """A spike count for tables: ``-`` when spikes are not counted."""
    return "-" if spikes is None else str(len(spikes))


def _write(text: str, out: str | os.PathLike) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _hyper_cell(hyper: dict, optimizer: str | None = None) -> str:
    """"AdamW: lr=1, eps=1e-08, ..., weight_decay=0.01": the optimizer's class when the
    store recorded it (``kind`` alone reads "adam" for an AdamW), then its settings."""
    h = hyper or {}
    keys = (("kind", "lr", "momentum", "nesterov") if h.get("kind") == "sgd"
            else ("kind", "lr", "eps", "eps_mode", "amsgrad", "beta1", "beta2"))
    if optimizer:
        keys = keys[1:]
    if h.get("weight_decay"):
        keys += ("weight_decay",)
    cell = ", ".join(f"{k}={fmt(h[k])}" for k in keys if k in h)
    return f"{printable(optimizer, limit=60)}: {cell}" if optimizer else cell


def _is_store(path: str) -> bool:
    """Whether ``path`` is a regular file starting with SQLite's header (a FIFO or a
    device is never opened: reading one would block)."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return False


def load_runs(source: Any, runs: Sequence[str] | None = None
              ) -> tuple[list[Any], list[tuple[str, str]], dict[str, dict]]:
    """Read ``source`` (anything :func:`stablestep.diagnosis.sources.load` reads: a run
    store, CSV, TensorBoard dir, Keras history, HF ``trainer_state.json``, ...) into
    traces, one per run (``runs``: only these). A run of a store that cannot be read
    (e.g. no metrics: a crash before the first flush) is left out with its reason instead
    of blocking the others. Returns ``(traces, skipped, configs)``: ``skipped`` as
    ``(run, reason)``, ``configs`` the stored run configs by name (stores only).
    ``SourceError`` when nothing is readable."""
    from stablestep.diagnosis.sources import SourceError, load

    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    traces, skipped, configs = [], [], {}
    if path is not None and _is_store(path):
        from stablestep.telemetry import list_runs, open_run

        for name in (list(runs) if runs else list_runs(path)):
            try:
                traces.extend(load(path, run=name))
            except SourceError as exc:
                if runs:  # asked for by name: say why not
                    raise
                skipped.append((name, str(exc).split(": ", 1)[-1]))
                continue
            try:
                configs[name] = dict(open_run(path, name).config or {})
            except Exception:  # the config only adds labels
                configs[name] = {}
        if not traces:
            why = f" ({skipped[0][1]})" if skipped else ""
            raise SourceError(f"{path}: no run with metrics to report{why}")
        return traces, skipped, configs
    if runs:
        for name in runs:
            traces.extend(load(source, run=name))
    else:
        traces = list(load(source))
    return traces, skipped, configs


def write_report(source: Any, out: str | os.PathLike, *,
                 title: str | None = None, runs: Sequence[str] | None = None) -> Path:
    """Write the HTML report of the runs in ``source`` (a run store or any log
    :func:`load_runs` reads; default all runs, on shared axes) to ``out``; the diagnosis
    numbers and explains the incidents. Panels a log cannot fill (a CSV has no optimizer
    state) are named, with how to record them."""
    from stablestep.diagnosis.core import diagnose_trace

    traces, skipped, configs = load_runs(source, runs)
    series, rows, number = [], [], 1
    for trace in traces:
        try:
            found = [f.to_dict() for f in diagnose_trace(trace)]
        except Exception:  # a report without a diagnosis beats no report
            found = None
        incs = incidents_for(found or [], number)
        number += len(incs)
        cfg = configs.get(trace.name, {})
        name = trace.name or "run"
        s = plots.from_trace(trace, label=printable(cfg.get("label") or name, limit=120),
                             incidents=incs)
        series.append(s)
        steps, loss = s.get("loss")
        rows.append([printable(name, limit=120), _hyper_cell(trace.hyper, cfg.get("optimizer")),
                     int(steps[-1]) if len(steps) else "-",
                     float(loss[-1]) if len(loss) else float("nan"),
                     "not available" if found is None else
                     (", ".join(sorted({f["mechanism"] for f in found})) or "none")])
    src = (os.fspath(source) if isinstance(source, (str, os.PathLike))
           else str(getattr(source, "source", "") or type(source).__name__))
    kind = "Run store" if isinstance(source, (str, os.PathLike)) and _is_store(src) else "Log"
    title = title or f"stablestep report: {Path(src).name}"
    body = render("store_report", title=title, what=kind, source=src, n_runs=len(traces),
                  skipped=skipped, summary=table(["run", "optimizer", "last step",
                                                  "last loss", "diagnosis"], rows),
                  figures=panels(series), missing=missing_note(series),
                  incidents=incident_list(series))
    return _write(page(title, body), out)
