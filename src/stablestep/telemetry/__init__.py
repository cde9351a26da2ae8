"""Telemetry: see what the optimizer is doing, step by step, in an embedded run store.

Public names: :class:`Monitor` (attach to any torch optimizer), :func:`open_run` /
:func:`list_runs` and :class:`Run` / :class:`Event` (read a store), sinks
(:class:`TensorBoardSink`, :func:`export_csv`). Metric names live in
:mod:`stablestep.telemetry.names`.
"""

from stablestep.telemetry import names
from stablestep.telemetry.monitor import Monitor
from stablestep.telemetry.sinks import TensorBoardSink, export_csv
from stablestep.telemetry.store import SCHEMA_VERSION, Event, Run, list_runs, open_run

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "Monitor",
    "Run",
    "TensorBoardSink",
    "export_csv",
    "list_runs",
    "names",
    "open_run",
]
