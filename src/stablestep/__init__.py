"""stablestep: see why Adam spikes, explodes or turns into NaN, and keep the run alive.

Public names (the product's contract, see DESIGN.md) are imported lazily so that
``import stablestep`` stays cheap and optional extras are only touched when used.
"""

from __future__ import annotations

from stablestep._lazy import attach

__version__ = "0.1.0"

_LAZY = {
    "Adam": "stablestep.optim",
    "AdamW": "stablestep.optim",
    "AdamAtan2": "stablestep.optim",
    "schedules": "stablestep.optim.schedules",
    "Monitor": "stablestep.telemetry",
    "MonitorConfig": "stablestep.telemetry",
    "open_run": "stablestep.telemetry",
    "list_runs": "stablestep.telemetry",
    "curvature": "stablestep.curvature",
    "diagnose": "stablestep.diagnosis",
    "Finding": "stablestep.diagnosis",
    "Guard": "stablestep.guard",
    "GuardPolicy": "stablestep.guard",
}

__getattr__, __dir__, _names = attach(__name__, _LAZY, globals())
__all__ = [*_names, "__version__"]
