"""Shared small problems for the guard tests (one CPU thread, seconds each)."""

from __future__ import annotations

import torch


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
