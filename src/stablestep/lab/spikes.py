r"""A plain loss-spike counter used to score lab runs and sweep cells.

A *spike* starts at step :math:`t` when

.. math::  L_t > f \cdot \max\big(\min_{t-w \le s < t} L_s,\; \rho\, L_0\big)

(``factor`` f, ``window`` w, ``floor`` :math:`\rho`), and ends once the loss is back
under half that level; each start is counted once. The floor keeps float32 round-off
at a loss of 1e-13 from counting as spikes. Non-finite losses end the count (they are
divergence, not spikes). The diagnosis has its own, richer detectors; this one only
gives the lab a number to compare variants and sweep cells by.
"""

from __future__ import annotations

import numpy as np


def spike_steps(
    losses: np.ndarray, *, factor: float = 3.0, window: int = 100, floor: float = 1e-9
) -> list[int]:
    """Steps at which a spike starts (see the module docstring)."""
    if factor <= 1.0:
        raise ValueError(f"factor must be > 1; got {factor}")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    x = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(x)
    stop = int(np.argmin(finite)) if not finite.all() else len(x)
    x = x[:stop]
    if len(x) <= window:
        return []
    base = floor * abs(x[0])
    # running minimum of the previous `window` values
    from numpy.lib.stride_tricks import sliding_window_view

    prev_min = sliding_window_view(x[:-1], window).min(axis=1)  # for t = window .. len-1
    ref = np.maximum(prev_min, base)
    out: list[int] = []
    inside = False
    for i, t in enumerate(range(window, len(x))):
        if inside:
            inside = x[t] > 0.5 * factor * ref[i]
        elif x[t] > factor * ref[i]:
            out.append(t)
            inside = True
    return out


def count_spikes(losses: np.ndarray, **kwargs) -> int:
    """Number of spikes in ``losses`` (keyword arguments as :func:`spike_steps`)."""
    return len(spike_steps(losses, **kwargs))
