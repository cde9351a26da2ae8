"""Periodic spikes in Lightning: stablestep's eyes (Monitor) and seatbelt (Guard) as one callback.

The network of the periodic-spikes story (one tanh hidden layer, full-batch MSE on 128 points of
``y = sin(3 * sum(x))``) trained 4000 steps with Adam (lr 1e-3, eps 1e-8) by a Lightning
``Trainer``, three ways: plain Adam; Adam with ``guard=GuardPolicy()`` (the guard counts
Adam's edge-of-stability spikes and, after a few, turns AMSGrad on by itself); and Adam
with ``amsgrad=True`` from the start. All three runs go into one store, which
``stablestep diagnose`` then explains. About a minute on a CPU.

    python examples/lightning_callback.py [STORE]    # default: lightning_periodic_spikes.db
    stablestep report lightning_periodic_spikes.db -o periodic_spikes.html
"""

from __future__ import annotations

import logging
import os
import sys

import lightning.pytorch as L
import numpy as np
import torch

from stablestep.cli import main as stablestep_cli
from stablestep.guard import GuardPolicy
from stablestep.integrations.lightning import StablestepCallback
from stablestep.telemetry.config import MonitorConfig

STEPS, N, DIM, WIDTH = 4000, 128, 4, 256


class FullBatch(torch.utils.data.Dataset):
    """The same whole data set as every one of STEPS batches."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, DIM, generator=g)
        self.y = torch.sin(3.0 * self.x.sum(1, keepdim=True))

    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        return self.x, self.y


class Regression(L.LightningModule):
    """1. the user's LightningModule, untouched by stablestep."""

    def __init__(self, amsgrad: bool = False):
        super().__init__()
        torch.manual_seed(1)
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(DIM, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1))
        self.amsgrad = amsgrad

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.mean((self.net(x) - y) ** 2)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-8, amsgrad=self.amsgrad)


def fit(name: str, store: str, *, amsgrad: bool = False, guard=None) -> StablestepCallback:
    """2. one callback gives the Trainer stablestep's Monitor (and Guard when asked)."""
    data = FullBatch()
    cb = StablestepCallback(  # curvature on the full batch every 25 steps: lam_max(P^-1 H)
        store=store, run=name, guard=guard, overwrite=True,  # again: replace the old run
        config=MonitorConfig(state_every=10), curvature_every=25,
        curvature_loss=lambda m: torch.mean((m.net(data.x) - data.y) ** 2),
    )
    trainer = L.Trainer(max_steps=STEPS, callbacks=[cb], logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Regression(amsgrad), torch.utils.data.DataLoader(data, batch_size=None))
    return cb


def spikes(loss: np.ndarray, factor: float = 3.0, window: int = 50) -> int:
    """Steps whose loss exceeds ``factor`` times the median of the previous ``window``."""
    hits = (loss[i] > factor * np.median(loss[i - window : i]) for i in range(window, len(loss)))
    return int(sum(hits))


def run(store: str) -> None:
    """3. the three runs into ``store`` (replaced), a line each, then the diagnosis."""
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for name, kw in (("adam", {}), ("adam+guard", {"guard": GuardPolicy()}),
                     ("amsgrad", {"amsgrad": True})):
        cb = fit(name, store, **kw)
        loss = cb.read().series("loss")[1]
        line = f"{name:11s} final loss {loss[-1]:.2e}, spikes (>3x recent median): {spikes(loss)}"
        if cb.guard is not None:
            acts = [f"step {r.step} {r.action} {r.reason}" for r in cb.guard.records
                    if r.action in ("adapt", "rollback")]
            line += f"; guard: {dict(cb.guard.counts)}; " + ", ".join(acts[:3])
        print(line)
    print(f"\n$ stablestep diagnose {store}")
    if not sys.stdout.isatty():  # piped: rich would assume 80 columns
        os.environ.setdefault("COLUMNS", "120")
    stablestep_cli(["diagnose", store])


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "lightning_periodic_spikes.db")
