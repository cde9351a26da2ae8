"""stablestep: see why Adam spikes, explodes or turns into NaN, and keep the run alive.

Public names (the product's contract, see DESIGN.md) are imported lazily so that
``import stablestep`` stays cheap and optional extras are only touched when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Adam": "stablestep.optim",
    "AdamW": "stablestep.optim",
    "AdamAtan2": "stablestep.optim",
    "schedules": "stablestep.optim.schedules",
    "Monitor": "stablestep.telemetry",
    "open_run": "stablestep.telemetry",
    "list_runs": "stablestep.telemetry",
    "curvature": "stablestep.curvature",
    "diagnose": "stablestep.diagnosis",
    "Finding": "stablestep.diagnosis",
    "Guard": "stablestep.guard",
    "GuardPolicy": "stablestep.guard",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Resolve a public name on first use (PEP 562)."""
    try:
        module_name = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'stablestep' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
