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

from stablestep._lazy import attach

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

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
