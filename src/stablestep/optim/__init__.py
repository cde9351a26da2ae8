"""stablestep.optim: the Adam family with every convention explicit, and LR schedules.

``Adam`` / ``AdamW`` (``eps_mode="torch"|"tf"``, ``amsgrad``, ``update_clipping``) and
``AdamAtan2`` are :class:`torch.optim.Optimizer` subclasses; :mod:`.schedules` holds
step -> value schedules; :mod:`.inspect` reads any optimizer's state (see
docs/architecture.md).
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "schedules": "stablestep.optim.schedules",
    "Adam": "stablestep.optim.adam",
    "AdamW": "stablestep.optim.adam",
    "AdamAtan2": "stablestep.optim.atan2",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
