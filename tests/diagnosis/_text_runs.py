"""Small held-out runs of the transformer stories for the diagnosis tests (seed 1, a
smaller GPT and fewer steps than the lab's seed-0 runs, which set the bars)."""

from __future__ import annotations

from dataclasses import replace

import torch

from stablestep.diagnosis import diagnose
from stablestep.lab.text import TextConfig, train_text
from stablestep.telemetry import Monitor

SMALL = TextConfig(n_layer=1, d=64, n_head=2, ctx=32, batch=8, n_bytes=200_000, seed=1,
                   steps=60)


def run(tmp_path, name: str, **changes):
    """Train SMALL with ``changes`` under a Monitor (detail every 5 steps), diagnose it."""
    torch.set_num_threads(1)
    cfg = replace(SMALL, **changes)
    store = str(tmp_path / f"{name}.db")
    result = train_text(cfg, monitor=lambda m, o, _: Monitor(m, o, store=store, run=name,
                                                             state_every=5))
    return result, diagnose(store, run=name)


def mechanisms(findings) -> set[str]:
    return {f.mechanism for f in findings}
