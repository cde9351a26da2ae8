"""stablestep.optim: the Adam family with every convention explicit, and LR schedules.

``Adam`` / ``AdamW`` (``eps_mode="torch"|"tf"``, ``amsgrad``, ``update_clipping``) and
``AdamAtan2`` are :class:`torch.optim.Optimizer` subclasses; :mod:`.schedules` holds
step -> value schedules; :mod:`.inspect` reads any optimizer's state (see
docs/architecture.md).
"""

from stablestep.optim import schedules
from stablestep.optim.adam import Adam, AdamW
from stablestep.optim.atan2 import AdamAtan2

__all__ = ["Adam", "AdamAtan2", "AdamW", "schedules"]
