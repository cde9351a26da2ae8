"""stablestep.diagnosis: find spikes, divergence, non-finite values and periodic spiking,
name the mechanism with the numbers that show it, and compute the remedy.

``diagnose(source, *, run=None) -> list[Finding]`` reads a run store, CSV, TensorBoard
directory, Keras history JSON, JSON of parallel arrays or llm.c-style text log through
one normalised :class:`Trace`; the online detectors are usable on their own.
"""

from stablestep.diagnosis.core import DiagnoseConfig, diagnose, diagnose_trace
from stablestep.diagnosis.detectors import (
    Alarm,
    DivergenceConfig,
    DivergenceDetector,
    NonFiniteDetector,
    PeriodicConfig,
    PeriodicDetector,
    PrecursorDetector,
    SpikeConfig,
    SpikeDetector,
)
from stablestep.diagnosis.findings import MECHANISMS, Finding, Remedy
from stablestep.diagnosis.sources import SourceError, load
from stablestep.diagnosis.stack import DetectorStack, StackConfig, StackIncident, replay
from stablestep.diagnosis.trace import Trace, from_series

__all__ = [
    "MECHANISMS", "Alarm", "DetectorStack", "DiagnoseConfig", "DivergenceConfig",
    "DivergenceDetector", "Finding", "NonFiniteDetector", "PeriodicConfig", "PeriodicDetector",
    "PrecursorDetector", "Remedy", "SourceError", "SpikeConfig", "SpikeDetector",
    "StackConfig", "StackIncident", "Trace", "diagnose", "diagnose_trace", "from_series",
    "load", "replay",
]
