"""The optimizers under test: one table, like torch's ``OptimizerInfo`` and optax's shared list.

Every generic optimizer test (tests/optim/test_table.py) runs over :data:`OPTIMIZERS`;
telemetry and curvature tests take rows from it too
(``from tests.optim_table import OPTIMIZERS, by_name``). Adding an optimizer is adding a row.

A row says how to build the optimizer and what the library must understand about it:
``kind`` (``"adam"`` or ``"sgd"``, what :func:`stablestep.optim.inspect.group_hyper` should
report), ``eps_mode`` (the convention it *runs*, ``None`` when it has no epsilon), and
``direction(opt, p, g)``: the vector that :func:`stablestep.optim.inspect.effective_step`
multiplies to give the update, ``theta_t - theta_{t-1} = -D * direction`` (weight decay
aside): Adam's ``exp_avg``, heavy ball's momentum buffer, Nesterov's ``g + mu*buf``.

``not_applicable`` names the generic properties that do not hold for the row, each with the
reason; a test of such a property calls ``info.skip_unless(prop)``, so a row is skipped with
its reason, never silently. Properties: ``"eff_step"`` (a per-coordinate effective step,
``eff_step_*`` in the Monitor), ``"epsilon"`` (an epsilon, so ``eps_share`` counts something)
and ``"second_moment"`` (a second moment, so ``g2v_*`` is defined).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stablestep.optim import Adam, AdamAtan2, AdamW


def _exp_avg(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return opt.state[p]["exp_avg"]


def _momentum(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return opt.state[p]["momentum_buffer"]


def _nesterov(opt: torch.optim.Optimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    mu = opt.param_groups[0]["momentum"]
    return g + mu * opt.state[p]["momentum_buffer"]


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer under test (see the module docstring)."""

    name: str
    make: Callable[..., torch.optim.Optimizer]  # make(params, **overrides)
    kind: str
    eps_mode: str | None
    direction: Callable[[torch.optim.Optimizer, torch.Tensor, torch.Tensor], torch.Tensor]
    ours: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)

    def skip_unless(self, prop: str) -> None:
        """``pytest.skip`` with the row's reason when ``prop`` does not apply to it."""
        if prop in self.not_applicable:
            import pytest

            pytest.skip(f"{self.name}: {self.not_applicable[prop]}")

    def __call__(self, params, **overrides: Any) -> torch.optim.Optimizer:
        """Build the optimizer on ``params`` with the row's settings and ``overrides``."""
        return self.make(params, **{**self.defaults, **overrides})

    def __repr__(self) -> str:  # pytest ids
        return self.name


_SGD_NA = {
    "eff_step": "SGD has no per-coordinate preconditioner (its effective step is lr)",
    "epsilon": "SGD has no epsilon",
    "second_moment": "SGD keeps no second moment",
}

# eps is large (1e-2) wherever there is one, so that the convention changes the update.
OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo("torch.Adam", torch.optim.Adam, "adam", "torch", _exp_avg,
                  defaults=dict(lr=1e-2, eps=1e-2)),
    OptimizerInfo("torch.AdamW", torch.optim.AdamW, "adam", "torch", _exp_avg,
                  defaults=dict(lr=1e-2, eps=1e-2, weight_decay=0.0)),
    OptimizerInfo("torch.SGD-momentum", torch.optim.SGD, "sgd", None, _momentum,
                  defaults=dict(lr=1e-2, momentum=0.9), not_applicable=_SGD_NA),
    OptimizerInfo("torch.SGD-nesterov", torch.optim.SGD, "sgd", None, _nesterov,
                  defaults=dict(lr=1e-2, momentum=0.9, nesterov=True), not_applicable=_SGD_NA),
    OptimizerInfo("Adam-torch", Adam, "adam", "torch", _exp_avg, ours=True,
                  defaults=dict(lr=1e-2, eps=1e-2)),
    OptimizerInfo("Adam-tf", Adam, "adam", "tf", _exp_avg, ours=True,
                  defaults=dict(lr=1e-2, eps=1e-2, eps_mode="tf")),
    OptimizerInfo("AdamW", AdamW, "adam", "torch", _exp_avg, ours=True,
                  defaults=dict(lr=1e-2, eps=1e-2, weight_decay=0.0)),
    OptimizerInfo("Adam-amsgrad", Adam, "adam", "torch", _exp_avg, ours=True,
                  defaults=dict(lr=1e-2, eps=1e-2, amsgrad=True)),
    OptimizerInfo("StableAdamW-tf", AdamW, "adam", "tf", _exp_avg, ours=True,
                  defaults=dict(lr=1e-2, eps=1e-2, eps_mode="tf", weight_decay=0.0,
                                update_clipping=True)),
    OptimizerInfo("AdamAtan2", AdamAtan2, "adam", None, _exp_avg, ours=True,
                  defaults=dict(lr=1e-2, weight_decay=0.0),
                  not_applicable={"epsilon": "AdamAtan2 has no epsilon (atan2 replaces it)"}),
]


def by_name(name: str) -> OptimizerInfo:
    """The row called ``name`` (KeyError with the known names otherwise)."""
    for info in OPTIMIZERS:
        if info.name == name:
            return info
    raise KeyError(f"{name!r} not in {[i.name for i in OPTIMIZERS]}")
