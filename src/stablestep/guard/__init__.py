"""stablestep.guard: the seatbelt. :class:`Guard` skips non-finite and outlier steps, rolls
back divergence to the last good snapshot, and adapts (AMSGrad, eps, lr) after repeated
spikes of Adam's adaptive edge of stability; decisions agree across ``torch.distributed``
ranks. Configure with :class:`GuardPolicy`; actions are :class:`GuardRecord`.
"""

from stablestep.guard.guard import Guard, skip_batches
from stablestep.guard.policy import GuardError, GuardPolicy, GuardRecord
from stablestep.guard.remedies import enable_amsgrad, raise_eps

__all__ = ["Guard", "GuardError", "GuardPolicy", "GuardRecord", "enable_amsgrad", "raise_eps",
           "skip_batches"]
