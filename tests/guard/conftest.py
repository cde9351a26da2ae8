"""Shared small problems for the guard tests (one CPU thread, seconds each)."""

from __future__ import annotations

from typing import Any

import torch

from stablestep import Monitor
from stablestep.guard import Guard


def regression_data(seed: int = 0, n: int = 512, dim: int = 8):
    """A smooth regression target the small MLP of :func:`mlp` fits well."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return x, torch.tanh(x @ w)


def mlp(seed: int = 1, dim: int = 8, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 1))


def batches(n: int, steps: int, *, batch: int = 32, seed: int = 2) -> list[torch.Tensor]:
    """The index of every step's minibatch, fixed in advance so runs can be compared."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(n, (batch,), generator=g) for _ in range(steps)]


def blobs(seed: int, n: int = 512, dim: int = 32, classes: int = 10, flip: float = 0.1):
    """A digits-like classification set: noisy class prototypes, ``flip`` of the labels
    flipped."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, dim, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    x = protos[y] + 1.5 * torch.randn(n, dim, generator=g)
    if flip:
        f = torch.rand(n, generator=g) < flip
        y = torch.where(f, torch.randint(classes, (n,), generator=g), y)
    return x, y


def warm_restarts_run(lr: float, seed: int, steps: int, guard_policy: Any = None, *,
                      guard: bool = True, store: Any = None):
    """A classifier trained with Adam under SGDR (CosineAnnealingWarmRestarts, T_0=100): by
    the later restarts its loss is near 0, and each restart lifts it 10-60x for a while.
    ``guard``: decided by a default Guard (``guard_policy``); ``store``: recorded by a
    Monitor there (run ``"restarts"``). Returns (the guard or None, final whole-set loss)."""
    x, y = blobs(seed=seed, n=1024, flip=0.0)
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100,
                                                                 eta_min=lr * 1e-3)
    mon = Monitor(model, opt, store=store, run="restarts") if store is not None else None
    g_ = Guard(model, opt, policy=guard_policy, monitor=mon) if guard else None
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        i = torch.randint(len(x), (32,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        if mon is not None:
            mon.observe(loss)
        if g_ is None or g_.check(loss):
            opt.step()
        sched.step()
    if mon is not None:
        mon.close()
    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(model(x), y))
    return g_, final
