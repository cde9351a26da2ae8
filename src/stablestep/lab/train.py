r"""The one training function every scenario uses.

``train(config)`` builds the problem of a :class:`~stablestep.lab.config.TrainConfig`,
runs ``config.steps`` optimizer steps and returns a :class:`TrainResult`. The loop is
the one a user writes (numbered as in the README)::

    loss = problem.loss(batch)          # 1. forward
    loss.backward()                     # 2. backward
    monitor.observe(loss)               # 3. telemetry (optional)
    optimizer.step(); scheduler.step()  # 4. update

Training stops at the first non-finite loss: the run has diverged, the step is
recorded in :attr:`TrainResult.diverged_at`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from stablestep.lab import problems
from stablestep.lab.config import TrainConfig


class Observer(Protocol):
    """What :func:`train` needs from a monitor (``stablestep.Monitor`` fits)."""

    def observe(self, loss: torch.Tensor) -> Any:
        """See the loss (gradients are populated) before the optimizer step."""

    def close(self) -> Any:
        """Flush and release whatever the observer holds."""


# (model, optimizer, curvature closure) -> observer
MonitorFactory = Callable[
    [torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]], Observer
]


@dataclass
class TrainResult:
    """Outcome of one run: ``losses[t]`` is the training loss at step ``t`` (the batch
    loss; NaN after divergence), ``final_loss`` the whole-data loss after the last step
    (NaN if diverged), ``diverged_at`` the first step with a non-finite loss or ``None``,
    ``lrs[t]`` the learning rate used at step ``t``."""

    losses: np.ndarray
    lrs: np.ndarray
    final_loss: float
    diverged_at: int | None

    @property
    def diverged(self) -> bool:
        """Whether the run hit a non-finite loss."""
        return self.diverged_at is not None


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    r"""The schedule of ``config`` as ``step -> lr multiplier`` (step counts from 0), built
    from :mod:`stablestep.optim.schedules`:

    - constant: 1
    - exponential: :math:`r^{t/T}` (``decay_rate`` r, ``decay_steps`` T; TF's
      ``exponential_decay``)
    - inverse-sqrt: linear warmup over w steps, then :math:`\sqrt{w/(t+1)}` (continuous
      at w, the Adam paper's :math:`\alpha/\sqrt t`)
    - warmup-cosine: linear warmup over w steps, then cosine down to 0 at the last step.
    """
    from stablestep.optim import schedules as s

    w = config.warmup
    if config.schedule == "exponential":
        return s.exponential_decay(config.decay_steps, config.decay_rate)
    if config.schedule == "inverse-sqrt":
        return s.join([s.linear_warmup(w), s.inverse_sqrt(math.sqrt(w), offset=w)], [w])
    if config.schedule == "warmup-cosine":
        return s.join([s.linear_warmup(w), s.cosine(max(config.steps - w, 1))], [w])
    return s.constant(1.0)


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """``stablestep.Adam`` (PyTorch epsilon convention) or plain gradient descent (SGD)."""
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    from stablestep.optim import Adam

    return Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, amsgrad=config.amsgrad)


def train(config: TrainConfig, *, monitor: MonitorFactory | None = None) -> TrainResult:
    """Run ``config`` deterministically; ``monitor(model, optimizer, probe_loss)`` may
    return an :class:`Observer` that sees every loss before the step."""
    if getattr(config, "problem", None) == "stdlib-text":  # a transformer story (lab/text.py)
        from stablestep.lab.text import train_as_lab

        return train_as_lab(config, monitor=monitor)
    problem = problems.build(config)
    opt = make_optimizer(config, problem.model.parameters())
    factor = lr_factor(config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    obs = monitor(problem.model, opt, problem.probe_loss()) if monitor is not None else None
    gen = torch.Generator().manual_seed(config.seed + 2)
    losses = np.full(config.steps, np.nan)
    lrs = np.array([config.lr * factor(t) for t in range(config.steps)])
    diverged_at = None
    try:
        for t in range(config.steps):
            idx = None
            if config.batch is not None:
                idx = torch.randint(config.n, (config.batch,), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(idx)  # 1. forward
            loss.backward()  # 2. backward
            if obs is not None:
                obs.observe(loss)  # 3. telemetry
            value = float(loss.detach())
            losses[t] = value
            if not math.isfinite(value):
                diverged_at = t
                break
            opt.step()  # 4. update
            sched.step()
    finally:
        if obs is not None:
            obs.close()
    final = float("nan") if diverged_at is not None else problem.full_loss()
    if diverged_at is None and not math.isfinite(final):
        diverged_at = config.steps
    return TrainResult(losses=losses, lrs=lrs, final_loss=final, diverged_at=diverged_at)
