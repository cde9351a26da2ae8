r"""Small deterministic training problems the scenarios are built from.

Each builder returns a :class:`Problem` holding the data, a freshly initialised model
and the loss. All are full-batch or minibatch regressions with mean squared error
that run in seconds on one CPU thread:

- ``sin-regression``: :math:`y = \sin(3\sum_j x_j)`, :math:`x \sim N(0, I_{dim})`,
  fitted by a one-hidden-layer tanh MLP. Full-batch Adam drives the loss low, the
  second moment decays, and the loss spikes periodically (the periodic-spikes story).
- ``random-targets``: :math:`y \sim N(0, 1)` memorised by a wide tanh MLP; the loss
  reaches float32's floor and the second moment :math:`v` collapses (the late-explosion story).
- ``ill-conditioned``: linear least squares :math:`L(w) = \frac1n\|Xw - y\|^2` on
  features of scales from 1 to ``ILL_SCALE``. Its Hessian :math:`H = \frac2n X^\top X`
  is known exactly, so the largest stable gradient-descent lr :math:`2/\lambda_{\max}(H)`
  is computed, not guessed (the lr-divergence story).
- ``noisy-regression``: :math:`y = x^\top w + 0.3\,\xi` with label noise
  :math:`\xi \sim N(0,1)`, a linear model trained with small minibatches: the model
  can fit the signal exactly, so what is left above the noise floor 0.09 at the end is
  the optimizer's own jitter, which a constant lr keeps and a decay removes (the adam-decay story).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stablestep.lab.config import TrainConfig

ILL_SCALE = 50.0  # largest feature scale of the ill-conditioned problem
NOISE = 0.3  # label noise of noisy-regression


@dataclass
class Problem:
    """Data, model and loss of one run. ``loss(idx)`` is the mean squared error on the
    rows ``idx`` (``None``: all rows); ``full_loss()`` the whole-data loss without grad."""

    x: torch.Tensor
    y: torch.Tensor
    model: torch.nn.Module

    def loss(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error on rows ``idx`` (all rows when ``None``)."""
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return torch.mean((self.model(x) - y) ** 2)

    def full_loss(self) -> float:
        """Whole-data loss as a float (NaN when the model has diverged)."""
        with torch.no_grad():
            return float(self.loss())

    def probe_loss(self) -> Callable[[], torch.Tensor]:
        """A closure over a fixed batch (the whole data) for the curvature probe."""
        return lambda: self.loss()


def _mlp(dim: int, width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    )


def build(config: TrainConfig) -> Problem:
    """Build the problem of ``config`` deterministically from ``config.seed``."""
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.n, config.dim, generator=gen)
    if config.problem == "sin-regression":
        y = torch.sin(3.0 * x.sum(1, keepdim=True))
    elif config.problem == "noisy-regression":
        w_true = torch.randn(config.dim, 1, generator=gen)
        y = x @ w_true + NOISE * torch.randn(config.n, 1, generator=gen)
    elif config.problem == "random-targets":
        y = torch.randn(config.n, 1, generator=gen)
    else:  # ill-conditioned
        scales = torch.logspace(0.0, math.log10(ILL_SCALE), config.dim)
        x = x * scales
        w_true = torch.randn(config.dim, 1, generator=gen)
        y = x @ w_true + 0.1 * torch.randn(config.n, 1, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        if config.problem == "ill-conditioned":
            model = torch.nn.Linear(config.dim, 1, bias=False)
        elif config.problem == "noisy-regression":
            model = torch.nn.Linear(config.dim, 1)
        else:
            model = _mlp(config.dim, config.width)
    return Problem(x=x, y=y, model=model)


def exact_sharpness(problem: Problem) -> float:
    r""":math:`\lambda_{\max}(H)` of the ill-conditioned (linear) problem in closed form:
    :math:`H = \frac{2}{n} X^\top X` does not depend on the weights."""
    x = problem.x.double()
    h = 2.0 * x.T @ x / x.shape[0]
    return float(torch.linalg.eigvalsh(h)[-1])
