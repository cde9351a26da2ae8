"""stablestep.diagnosis: find spikes, divergence, non-finite values and periodic spiking,
name the mechanism with the numbers that show it, and compute the remedy.

``diagnose(source, *, run=None) -> list[Finding]`` reads a run store, CSV, TensorBoard
directory, Keras history JSON, JSON of parallel arrays or llm.c-style text log through
one normalised :class:`Trace`; the online detectors are usable on their own.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "DiagnoseConfig": "stablestep.diagnosis.core",
    "diagnose": "stablestep.diagnosis.core",
    "diagnose_trace": "stablestep.diagnosis.core",
    "Alarm": "stablestep.diagnosis.detectors",
    "DivergenceConfig": "stablestep.diagnosis.detectors",
    "DivergenceDetector": "stablestep.diagnosis.detectors",
    "NonFiniteDetector": "stablestep.diagnosis.detectors",
    "PeriodicConfig": "stablestep.diagnosis.detectors",
    "PeriodicDetector": "stablestep.diagnosis.detectors",
    "PrecursorDetector": "stablestep.diagnosis.detectors",
    "SpikeConfig": "stablestep.diagnosis.detectors",
    "SpikeDetector": "stablestep.diagnosis.detectors",
    "MECHANISMS": "stablestep.diagnosis.findings",
    "Finding": "stablestep.diagnosis.findings",
    "Remedy": "stablestep.diagnosis.findings",
    "SourceError": "stablestep.diagnosis.sources",
    "load": "stablestep.diagnosis.sources",
    "DetectorStack": "stablestep.diagnosis.stack",
    "StackConfig": "stablestep.diagnosis.stack",
    "StackIncident": "stablestep.diagnosis.stack",
    "replay": "stablestep.diagnosis.stack",
    "incidents": "stablestep.diagnosis.core",
    "Trace": "stablestep.diagnosis.trace",
    "from_series": "stablestep.diagnosis.trace",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
