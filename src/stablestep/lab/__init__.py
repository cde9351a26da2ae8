"""stablestep.lab: the seed stories reproduced on a CPU in seconds, the fixes compared
side by side, and stability maps.

A scenario is data (:class:`Scenario`: variants = :class:`TrainConfig` s) plus one
training function (:func:`train`); :func:`run_scenario` trains every variant under a
``stablestep.Monitor`` into ``DIR/run.sqlite``, diagnoses it and writes
``DIR/report.html``; :func:`sweep` draws a stability map over lr x eps x amsgrad::

    from stablestep import lab
    outcome = lab.run_scenario("periodic-spikes", out="runs/periodic")
    print(outcome.variant("amsgrad").spikes, outcome.report)

Names are resolved lazily so that ``stablestep --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "stablestep.lab.config",
    "Variant": "stablestep.lab.config",
    "Scenario": "stablestep.lab.scenarios",
    "get": "stablestep.lab.scenarios",
    "names": "stablestep.lab.scenarios",
    "train": "stablestep.lab.train",
    "TrainResult": "stablestep.lab.train",
    "run_scenario": "stablestep.lab.runner",
    "run_all": "stablestep.lab.runner",
    "ScenarioOutcome": "stablestep.lab.runner",
    "VariantOutcome": "stablestep.lab.runner",
    "sweep": "stablestep.lab.sweep",
    "SweepResult": "stablestep.lab.sweep",
    "count_spikes": "stablestep.lab.spikes",
    "spike_steps": "stablestep.lab.spikes",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Resolve a public name on first use (PEP 562)."""
    try:
        module = importlib.import_module(_LAZY[name])
    except KeyError:
        raise AttributeError(f"module 'stablestep.lab' has no attribute {name!r}") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
