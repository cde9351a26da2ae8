"""stablestep.guard: the seatbelt. :class:`Guard` skips non-finite and outlier steps, rolls
back divergence to the last good snapshot, and adapts (AMSGrad, eps, lr) after repeated
spikes of Adam's adaptive edge of stability; decisions agree across ``torch.distributed``
ranks. Configure with :class:`GuardPolicy`; actions are :class:`GuardRecord`.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "Guard": "stablestep.guard.guard",
    "skip_batches": "stablestep.guard.guard",
    "GuardError": "stablestep.guard.policy",
    "GuardPolicy": "stablestep.guard.policy",
    "GuardRecord": "stablestep.guard.policy",
    "enable_amsgrad": "stablestep.guard.remedies",
    "raise_eps": "stablestep.guard.remedies",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
