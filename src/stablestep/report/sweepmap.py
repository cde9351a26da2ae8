"""The stability map of a sweep: one heat map per AMSGrad setting, eps down, lr across,
colour = log10 of the final loss, each cell annotated with its loss and spike count;
diverged cells are black and say where they turned NaN."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from stablestep.report.html import figure, fmt, page, render, table
from stablestep.report.plots import _plt, _png


def stability_map(result: Any) -> bytes:
    """PNG of the map of a :class:`stablestep.lab.sweep.SweepResult`."""
    plt = _plt()
    k = len(result.amsgrads)
    fig, axes = plt.subplots(1, k, figsize=(max(4.0, 1.3 * len(result.lrs)) * k + 1.2,
                                             0.9 * len(result.epss) + 2.0), dpi=100,
                             squeeze=False)
    finite = [c.final_loss for c in result.cells
              if math.isfinite(c.final_loss) and c.final_loss > 0]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    cmap = plt.get_cmap("viridis").with_extremes(bad="black")
    im = None
    for n, (ax, a) in enumerate(zip(axes[0], result.amsgrads, strict=True)):
        grid = np.full((len(result.epss), len(result.lrs)), np.nan)
        for i, eps in enumerate(result.epss):
            for j, lr in enumerate(result.lrs):
                c = result.cell(lr, eps, a)
                if math.isfinite(c.final_loss) and c.final_loss > 0:
                    grid[i, j] = math.log10(c.final_loss)
                if c.diverged_at is not None:
                    text = f"NaN\nat {c.diverged_at}"
                elif c.spikes is None:
                    text = f"{c.final_loss:.2g}"
                else:
                    text = f"{c.final_loss:.2g}\n{c.spikes} spike{'' if c.spikes == 1 else 's'}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if c.diverged_at is not None or (
                            math.isfinite(grid[i, j]) and grid[i, j] < (lo + hi) / 2) else "black")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(result.lrs)), [f"{x:g}" for x in result.lrs], fontsize=8)
        ax.set_yticks(range(len(result.epss)), [f"{x:g}" for x in result.epss], fontsize=8)
        ax.set_xlabel("lr")
        if n == 0:
            ax.set_ylabel("eps")
        ax.set_title(f"amsgrad={a}", fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="log10 final loss (black: NaN)")
    fig.suptitle(f"Stability map: {result.scenario}, {result.steps} steps per cell", fontsize=11)
    return _png(fig, tight=False)


def write_sweep_report(result: Any, out: str | os.PathLike) -> Path:
    """Write the stability map and the cell table as one self-contained HTML file."""
    title = f"stablestep sweep: {result.scenario}"
    rows = [[c.lr, c.eps, c.amsgrad, c.final_loss, "-" if c.spikes is None else c.spikes,
             "-" if c.diverged_at is None else c.diverged_at] for c in result.cells]
    command = (f"stablestep sweep {result.scenario} --lr {' '.join(fmt(x) for x in result.lrs)}"
               f" --eps {' '.join(fmt(x) for x in result.epss)} --amsgrad "
               f"{' '.join(str(a).lower() for a in result.amsgrads)}")
    body = render("sweep", title=title, n_cells=len(result.cells), steps=result.steps,
                  figure=figure(stability_map(result), "Final loss and spike count per cell."),
                  cells=table(["lr", "eps", "amsgrad", "final loss", "spikes", "NaN at step"],
                              rows), command=command)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, body), encoding="utf-8")
    return path
