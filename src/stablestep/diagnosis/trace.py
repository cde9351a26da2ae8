"""The normalised trace every source converts into.

Detectors and the explainer only ever see a :class:`Trace`: the steps, the training
loss at those steps (non-finite values kept as ``nan``/``inf``), optional per-step
metrics aligned to the same steps (``nan`` where a metric was not recorded, names from
:mod:`stablestep.telemetry.names`), the optimizer hyperparameters when known, and
events. Where the data came from (a store, a CSV, a TensorBoard directory, a text log)
is invisible past this point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Trace:
    """One training run, normalised.

    Attributes:
        steps: strictly increasing optimizer steps (int64).
        loss: training loss per step (float64); ``nan``/``inf`` mark non-finite losses.
        metrics: name -> float64 array aligned with ``steps``; ``nan`` = not recorded.
        hyper: optimizer hyperparameters when known (keys of
            :class:`stablestep.optim.inspect.GroupHyper`: ``kind``, ``lr``, ``beta1``,
            ``beta2``, ``eps``, ``eps_mode``, ``amsgrad``, ``momentum``); empty if unknown.
        nonfinite_steps: steps at which a non-finite value was recorded anywhere
            (loss, gradients, parameters, optimizer state).
        events: recorded events other than non-finite marks, e.g. the guard's actions:
            ``{"step": int, "kind": str, "data": dict}`` in step order.
        name: run name (for multi-run sources), ``""`` for a single run.
        source: where the trace was read from (for messages).
    """

    steps: np.ndarray
    loss: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    hyper: dict[str, Any] = field(default_factory=dict)
    nonfinite_steps: frozenset[int] = frozenset()
    name: str = ""
    source: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.loss = np.asarray(self.loss, dtype=np.float64)
        if self.steps.shape != self.loss.shape or self.steps.ndim != 1:
            raise ValueError(
                f"steps and loss must be 1-d arrays of equal length, got shapes "
                f"{self.steps.shape} and {self.loss.shape}"
            )
        if self.steps.size > 1 and np.any(np.diff(self.steps) <= 0):
            raise ValueError("steps must be strictly increasing")
        for key, values in list(self.metrics.items()):
            arr = np.asarray(values, dtype=np.float64)
            if arr.shape != self.steps.shape:
                raise ValueError(
                    f"metric {key!r} has {arr.size} values for {self.steps.size} steps"
                )
            self.metrics[key] = arr
        self.nonfinite_steps = frozenset(int(s) for s in self.nonfinite_steps)

    def __len__(self) -> int:
        return int(self.steps.size)

    def metric(self, name: str) -> np.ndarray | None:
        """The metric aligned with ``steps``, or ``None`` if it was never recorded."""
        arr = self.metrics.get(name)
        if arr is None or not np.any(np.isfinite(arr)):
            return None
        return arr

    def has(self, name: str) -> bool:
        """Whether ``name`` holds at least one finite value."""
        return self.metric(name) is not None

    def value_at(self, name: str, step: int, *, lookback: int | None = None) -> float | None:
        """Last finite value of ``name`` at or before ``step`` (within ``lookback`` steps)."""
        arr = self.metric(name)
        if arr is None:
            return None
        i = int(np.searchsorted(self.steps, step, side="right"))
        for j in range(i - 1, -1, -1):
            if lookback is not None and step - int(self.steps[j]) > lookback:
                return None
            if math.isfinite(arr[j]):
                return float(arr[j])
        return None


def from_series(
    steps: Any,
    loss: Any,
    *,
    metrics: dict[str, tuple[Any, Any]] | None = None,
    hyper: dict[str, Any] | None = None,
    nonfinite_steps: Any = (),
    name: str = "",
    source: str = "",
    events: Any = (),
) -> Trace:
    """Build a :class:`Trace` from a loss series and metric series with their own steps.

    Rows are sorted by step; a repeated step keeps its last value (a resumed run that
    re-logs steps overwrites them). Metric series recorded at other steps than the loss
    (e.g. curvature every 10 steps) are aligned onto the union of steps, ``nan`` elsewhere.
    Steps listed in ``nonfinite_steps`` without a loss value get a ``nan`` loss.
    ``events``: ``{"step", "kind", "data"}`` dicts (e.g. the guard's actions), kept as given.
    """
    s = np.asarray(steps, dtype=np.int64).ravel()
    v = np.asarray(loss, dtype=np.float64).ravel()
    if s.size != v.size:
        raise ValueError(f"{s.size} steps for {v.size} loss values")
    nonfinite = sorted({int(x) for x in nonfinite_steps})
    by_step: dict[int, float] = {}
    for st, val in zip(s.tolist(), v.tolist(), strict=True):
        by_step[st] = val
    for st in nonfinite:
        by_step.setdefault(st, math.nan)
    all_steps = set(by_step)
    metrics = metrics or {}
    for ms, _ in metrics.values():
        all_steps.update(int(x) for x in np.asarray(ms).ravel().tolist())
    grid = np.array(sorted(all_steps), dtype=np.int64)
    index = {st: i for i, st in enumerate(grid.tolist())}
    loss_arr = np.full(grid.size, np.nan)
    present = np.zeros(grid.size, dtype=bool)
    for st, val in by_step.items():
        loss_arr[index[st]] = val
        present[index[st]] = True
    aligned: dict[str, np.ndarray] = {}
    for key, (ms, mv) in metrics.items():
        arr = np.full(grid.size, np.nan)
        for st, val in zip(
            np.asarray(ms).ravel().tolist(), np.asarray(mv, dtype=np.float64).ravel().tolist(),
            strict=True,
        ):
            arr[index[int(st)]] = val
        aligned[key] = arr
    # Steps that only carry metrics (e.g. a curvature probe) but no loss are kept only if
    # they are marked non-finite; otherwise their metrics are attached to the next loss step.
    keep = present.copy()
    if not keep.all():
        for key, arr in aligned.items():
            out = arr[keep].copy()
            idx_keep = np.flatnonzero(keep)
            for i in np.flatnonzero(~keep):
                j = int(np.searchsorted(idx_keep, i))
                if j < idx_keep.size and math.isfinite(arr[i]) and not math.isfinite(out[j]):
                    out[j] = arr[i]
            aligned[key] = out
        grid, loss_arr = grid[keep], loss_arr[keep]
    return Trace(
        steps=grid,
        loss=loss_arr,
        metrics=aligned,
        hyper=dict(hyper or {}),
        nonfinite_steps=frozenset(nonfinite),
        name=name,
        source=source,
        events=sorted((dict(e) for e in events), key=lambda e: int(e["step"])),
    )
