"""Callbacks for training loops stablestep does not own: Keras 3, Lightning, Hugging Face.

Each framework is an optional extra and each callback lives in its own module, imported
only when asked for, so ``import stablestep.integrations`` touches no framework::

    from stablestep.integrations.keras import StablestepCallback          # Keras 3
    from stablestep.integrations.lightning import StablestepCallback      # Lightning 2
    from stablestep.integrations.transformers import StablestepCallback   # HF Trainer

All of them take the Monitor's settings as one
:class:`~stablestep.telemetry.config.MonitorConfig`, record through the Monitor's own
:class:`~stablestep.telemetry.recorder.Recorder` (same metric names, same store rules) into
a store in the framework's log directory by default, and hand the guard's actions to the
framework's logger; ``stablestep diagnose`` and ``stablestep report`` read a Keras,
Lightning or Trainer run like any other. ``docs/integrations.md`` has the details.
"""

__all__: list[str] = []
