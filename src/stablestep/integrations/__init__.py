"""Callbacks for training loops stablestep does not own: Keras 3, Lightning, Hugging Face.

Each framework is an optional extra and each callback lives in its own module, imported
only when asked for, so ``import stablestep.integrations`` touches no framework::

    from stablestep.integrations.keras import StablestepCallback          # Keras 3
    from stablestep.integrations.lightning import StablestepCallback      # Lightning 2
    from stablestep.integrations.transformers import StablestepCallback   # HF Trainer

All of them write the same metric names (:mod:`stablestep.telemetry.names`) into the same
run store as :class:`stablestep.Monitor`, so ``stablestep diagnose store.db`` and
``stablestep report store.db`` read a Keras, Lightning or Trainer run like any other.
"""

__all__: list[str] = []
