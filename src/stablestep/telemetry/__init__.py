"""Telemetry: see what the optimizer is doing, step by step, in an embedded run store.

Public names: :class:`Monitor` (attach to any torch optimizer) and its settings
:class:`MonitorConfig`, :class:`ModelProbes` (attention logits, log Z, activation RMS),
:class:`Recorder` (the Monitor's reducing writer, reused by the Keras callback), :func:`open_run` /
:func:`list_runs` and :class:`Run` / :class:`Event` (read a store), sinks
(:class:`TensorBoardSink`, :func:`export_csv`). Metric names live in
:mod:`stablestep.telemetry.names`.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "names": "stablestep.telemetry.names",
    "Monitor": "stablestep.telemetry.monitor",
    "MonitorConfig": "stablestep.telemetry.config",
    "ModelProbes": "stablestep.telemetry.model_probes",
    "Recorder": "stablestep.telemetry.recorder",
    "TensorBoardSink": "stablestep.telemetry.sinks",
    "export_csv": "stablestep.telemetry.sinks",
    "SCHEMA_VERSION": "stablestep.telemetry.store",
    "Event": "stablestep.telemetry.store",
    "Run": "stablestep.telemetry.store",
    "list_runs": "stablestep.telemetry.store",
    "open_run": "stablestep.telemetry.store",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
