r"""The lab's spike count: the spike incidents of the one detector stack, large ones only.

A spike is what :class:`stablestep.diagnosis.stack.DetectorStack` calls one (the guard acts
on the same incidents and ``diagnose`` replays them): an alarm of the spike detector, a
confirmed rise of the log loss by ``z`` times this run's one-step noise, including the new
alarms while the loss rings after a spike. The lab counts those whose excursion peaks at
least ``factor`` times its baseline (so a story's table counts the spikes a person would
see on its plot), with the detector's statistics spanning ``window`` records. Losses under
``floor`` times the first loss are read as that floor, so float32 round-off at a loss of
1e-13 does not count as spikes; a non-finite loss ends the count (divergence, not a spike).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np


def spike_steps(
    losses: np.ndarray, *, factor: float = 3.0, window: int = 100, floor: float = 1e-9
) -> list[int]:
    """Steps at which the stack raised a spike whose excursion peaked ``factor`` times
    above its baseline (see the module docstring)."""
    from stablestep.diagnosis.stack import DetectorStack, StackConfig

    if factor <= 1.0:
        raise ValueError(f"factor must be > 1; got {factor}")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    x = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(x)
    stop = int(np.argmin(finite)) if not finite.all() else len(x)
    x = x[:stop]
    if len(x) == 0:
        return []
    base = floor * abs(x[0])
    cfg = StackConfig()
    stack = DetectorStack(replace(cfg, spike=replace(cfg.spike, window=max(2, window))))
    for t, v in enumerate(np.maximum(x, base).tolist()):
        stack.update(t, v)
    peaks = {e.detected: e.peak / e.baseline for e in stack.excursions if e.baseline > 0}
    return [i.step for i in stack.incidents
            if i.kind == "spike" and peaks.get(i.step, math.inf) >= factor]


def count_spikes(losses: np.ndarray, **kwargs) -> int:
    """Number of spikes in ``losses`` (keyword arguments as :func:`spike_steps`)."""
    return len(spike_steps(losses, **kwargs))
