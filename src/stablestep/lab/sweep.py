"""Stability maps: a scenario's base setting trained on a grid of (lr, eps, amsgrad),
each cell scored by its final loss, spike count and divergence.

Cells are independent runs of :func:`stablestep.lab.train.train` without telemetry, so
they run in parallel processes (``workers``) and need no shared store. The result is a
:class:`SweepResult`; :func:`stablestep.report.sweepmap.write_sweep_report` draws it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace

from stablestep.lab import scenarios
from stablestep.lab.config import TrainConfig
from stablestep.lab.spikes import count_spikes
from stablestep.lab.train import train

log = logging.getLogger("stablestep.lab")


@dataclass(frozen=True)
class Cell:
    """One grid point and its score: ``final_loss`` (NaN if diverged), ``spikes``,
    ``diverged_at`` (first non-finite step or ``None``)."""

    lr: float
    eps: float
    amsgrad: bool
    final_loss: float
    spikes: int | None
    diverged_at: int | None


@dataclass
class SweepResult:
    """All cells of a sweep over ``lrs`` x ``epss`` x ``amsgrads`` of ``scenario``'s base."""

    scenario: str
    lrs: list[float]
    epss: list[float]
    amsgrads: list[bool]
    steps: int
    cells: list[Cell] = field(default_factory=list)

    def cell(self, lr: float, eps: float, amsgrad: bool) -> Cell:
        """The cell at (lr, eps, amsgrad)."""
        for c in self.cells:
            if c.lr == lr and c.eps == eps and c.amsgrad == amsgrad:
                return c
        raise KeyError(f"no cell lr={lr} eps={eps} amsgrad={amsgrad}")

    def to_dict(self) -> dict:
        """JSON-serialisable form (NaN final losses become ``None``)."""
        cells = []
        for c in self.cells:
            d = asdict(c)
            d["final_loss"] = c.final_loss if math.isfinite(c.final_loss) else None
            cells.append(d)
        return {"scenario": self.scenario, "lrs": self.lrs, "epss": self.epss,
                "amsgrads": self.amsgrads, "steps": self.steps, "cells": cells}


def _cell(config: TrainConfig, spike_factor: float | None) -> Cell:
    import torch

    torch.set_num_threads(1)
    r = train(config)
    spikes = None if spike_factor is None else count_spikes(r.losses, factor=spike_factor)
    return Cell(lr=config.lr, eps=config.eps, amsgrad=config.amsgrad, final_loss=r.final_loss,
                spikes=spikes, diverged_at=r.diverged_at)


def sweep(
    scenario: str,
    *,
    lrs: Sequence[float],
    epss: Sequence[float],
    amsgrads: Sequence[bool] = (False,),
    steps: int | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Train ``scenario``'s failing (base) setting at every (lr, eps, amsgrad).

    ``steps`` overrides the number of steps (default: the scenario's); ``workers``
    processes (default: CPU count, never more than cells); ``progress(done, total)`` after
    each cell. Non-finite or negative lr/eps values raise ``ValueError``. Cells are
    returned in grid order (amsgrad, eps, lr) whatever order they finish in.
    """
    sc = scenarios.get(scenario)
    for name, values in (("lr", lrs), ("eps", epss), ("amsgrad", amsgrads)):
        if not values:
            raise ValueError(f"give at least one {name} value")
    for name, values in (("lr", lrs), ("eps", epss)):
        bad = [x for x in values if not (math.isfinite(float(x)) and float(x) >= 0)]
        if bad:
            raise ValueError(f"{name} values must be finite and >= 0; got {bad[0]}")
    base = replace(sc.base(), curvature_every=0)
    if steps is not None:
        base = replace(base, steps=steps)
    grid = [replace(base, lr=float(lr), eps=float(eps), amsgrad=bool(a))
            for a, eps, lr in itertools.product(amsgrads, epss, lrs)]  # validates
    result = SweepResult(scenario=sc.name, lrs=[float(x) for x in lrs],
                         epss=[float(x) for x in epss], amsgrads=[bool(a) for a in amsgrads],
                         steps=base.steps)
    workers = min(workers or os.cpu_count() or 1, len(grid))
    log.debug("sweep %s: %d cells in %d process(es)", sc.name, len(grid), workers)
    done: dict[int, Cell] = {}
    if workers <= 1:
        for i, cfg in enumerate(grid):
            done[i] = _cell(cfg, sc.spike_factor)
            if progress is not None:
                progress(len(done), len(grid))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_cell, cfg, sc.spike_factor): i for i, cfg in enumerate(grid)}
            for fut in as_completed(futs):
                done[futs[fut]] = fut.result()
                if progress is not None:
                    progress(len(done), len(grid))
    result.cells = [done[i] for i in range(len(grid))]
    return result
