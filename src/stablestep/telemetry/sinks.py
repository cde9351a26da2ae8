"""Sinks: where telemetry goes besides the run store (TensorBoard), and CSV export.

A sink is any object with ``write(step, metrics: dict[str, float])``,
``event(step, kind, data: dict)`` and ``close()`` (optionally ``flush()``); pass it
to ``Monitor(..., sinks=[...])``. It receives finite values only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from stablestep.telemetry.store import Run, open_run


class TensorBoardSink:
    """Write the Monitor's metrics as TensorBoard scalars (``pip install tensorboard``).

    ``SummaryWriter`` is imported on construction, not with stablestep. Every tag starts
    with ``prefix`` (default ``stablestep/``: ``stablestep/loss``, ``stablestep/eff_step_max``),
    so the metrics group together beside a framework's own and never collide with its
    ``loss``; events are text under ``<prefix>events/<kind>``.
    """

    def __init__(
        self, log_dir: str | os.PathLike, *, prefix: str = "stablestep/", **writer_kwargs: Any
    ):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is in the dev extra
            raise ImportError(
                "TensorBoardSink needs tensorboard: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(log_dir=os.fspath(log_dir), **writer_kwargs)
        self.prefix = prefix

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Add one scalar per metric at ``step``."""
        for name, value in metrics.items():
            self.writer.add_scalar(self.prefix + name, value, global_step=step)

    def event(self, step: int, kind: str, data: dict) -> None:
        """Add the event as text."""
        self.writer.add_text(
            f"{self.prefix}events/{kind}", json.dumps(data, default=str), global_step=step
        )

    def flush(self) -> None:
        """Flush the event file."""
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


def export_csv(
    run: Run | str | os.PathLike, out: str | os.PathLike, *, name: str | None = None
) -> int:
    """Write a run's metrics as CSV: a ``step`` column, then one column per metric
    (sorted), one row per step; a value not recorded at a step is an empty cell.

    ``run`` is a :class:`Run` or a store path (then ``name`` picks the run as in
    :func:`~stablestep.telemetry.store.open_run`). Returns the number of rows. Needs no
    pandas. The columns read back with ``pandas.read_csv`` and with
    ``stablestep.diagnose`` (a CSV with ``step`` and ``loss`` columns).
    """
    if not isinstance(run, Run):
        run = open_run(run, name)
    cols = run.names()
    table: dict[int, dict[str, float]] = {}
    for col in cols:
        steps, values = run.series(col)
        for s, v in zip(steps.tolist(), values.tolist(), strict=True):
            table.setdefault(s, {})[col] = v
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *cols])
        for s in sorted(table):
            row = table[s]
            w.writerow([s, *(_fmt(row.get(c)) for c in cols)])
    return len(table)


def _fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return ""
    return repr(float(v))
