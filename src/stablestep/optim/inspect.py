r"""Read what an optimizer is doing from its own state, for any torch optimizer.

This is the one narrow interface through which telemetry, curvature and diagnosis
look at an optimizer. It understands ``torch.optim.Adam``/``AdamW``/``SGD`` and
stablestep's optimizers (which expose ``eps_mode`` in their param groups and may
override :func:`effective_step` with a method of the same name).

Adam in either epsilon convention is preconditioned gradient descent on the
bias-corrected first moment :math:`\hat m_t`:

.. math::

    \theta_{t+1} = \theta_t - P_t^{-1} \hat m_t,\qquad
    P_t^{-1} = \operatorname{diag}\Big(\frac{\alpha_t}{\sqrt{\hat v_t} + \epsilon_t}\Big)

with :math:`\alpha_t = \mathrm{lr}` and :math:`\hat m = m/(1-\beta_1^t)`,
:math:`\hat v = v/(1-\beta_2^t)` (``max_v`` for AMSGrad). For the PyTorch/optax
convention :math:`\epsilon_t = \epsilon`; for the TensorFlow/Keras ("epsilon hat")
convention :math:`\epsilon_t = \hat\epsilon / \sqrt{1-\beta_2^t}` (DESIGN.md). The
diagonal of :math:`P_t^{-1}` applied to :math:`m_t` (not :math:`\hat m_t`) is the
*effective per-coordinate step* ``lr/(1-b1^t) / (sqrt(v_hat) + eps_t)``, which is
what :func:`effective_step` returns. For SGD, :math:`P^{-1} = \mathrm{lr}\,I`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from stablestep import formulas as F

Kind = Literal["adam", "sgd", "other"]


@dataclass(frozen=True)
class GroupHyper:
    """Hyperparameters of one param group, normalised across optimizer classes."""

    kind: Kind
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    eps_mode: str = "torch"
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def group_hyper(optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
    """Return the normalised hyperparameters of ``group`` (one of ``optimizer.param_groups``)."""
    lr = _as_float(group["lr"])
    if "betas" in group:
        b1, b2 = (float(b) for b in group["betas"])
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(
            optimizer, torch.optim.AdamW
        )
        return GroupHyper(
            kind="adam",
            lr=lr,
            beta1=b1,
            beta2=b2,
            eps=float(group.get("eps", 0.0)),
            eps_mode=str(group.get("eps_mode", "torch")),
            amsgrad=bool(group.get("amsgrad", False)),
            weight_decay=float(group.get("weight_decay", 0.0)),
            decoupled_weight_decay=decoupled,
            maximize=bool(group.get("maximize", False)),
        )
    if "momentum" in group and "dampening" in group:
        return GroupHyper(
            kind="sgd",
            lr=lr,
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            nesterov=bool(group.get("nesterov", False)),
            weight_decay=float(group.get("weight_decay", 0.0)),
            maximize=bool(group.get("maximize", False)),
        )
    return GroupHyper(kind="other", lr=lr)


def step_count(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Number of optimizer steps already applied to ``p`` (0 before the first step)."""
    state = optimizer.state.get(p, {})
    step = state.get("step", 0)
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def second_moment(
    optimizer: torch.optim.Optimizer, p: torch.Tensor, amsgrad: bool
) -> torch.Tensor | None:
    """The raw second-moment estimate Adam divides by (``max_exp_avg_sq`` under AMSGrad)."""
    state = optimizer.state.get(p, {})
    key = "max_exp_avg_sq" if amsgrad and "max_exp_avg_sq" in state else "exp_avg_sq"
    return state.get(key)


def epsilon_t(h: GroupHyper, step: int) -> float:
    r"""The epsilon added to :math:`\sqrt{\hat v}` at ``step`` in PyTorch's convention.

    :func:`stablestep.formulas.eps_t` with this group's ``eps``, ``beta2`` and ``eps_mode``;
    any mode other than ``"tf"`` (``"none"`` for AdamAtan2, whose ``eps`` reads 0, or a
    foreign optimizer's) adds ``eps`` as torch does.
    """
    return F.eps_t(h.eps, h.beta2, step, _mode(h))


def _mode(h: GroupHyper) -> str:
    return "tf" if h.eps_mode == "tf" else "torch"


def effective_step(
    optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict | None = None
) -> torch.Tensor | None:
    r"""Diagonal of :math:`P_t^{-1}` for parameter ``p`` as of its last step.

    Adam family: :func:`stablestep.formulas.effective_step`,
    ``lr/(1-b1^t) / (sqrt(v_hat) + eps_t)`` (see module docstring), a tensor
    shaped like ``p``. SGD: a scalar tensor ``lr``. ``None`` when the optimizer has no
    state for ``p`` yet or is of an unknown kind. Optimizers may provide their own
    ``effective_step(p)`` method (e.g. eps-free variants); it takes precedence.
    """
    if group is None:
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    own = getattr(optimizer, "effective_step", None)
    if callable(own):
        return own(p)
    h = group_hyper(optimizer, group)
    if h.kind == "sgd":
        return torch.tensor(h.lr, dtype=p.dtype, device=p.device)
    if h.kind != "adam":
        return None
    t = step_count(optimizer, p)
    v = second_moment(optimizer, p, h.amsgrad)
    if t == 0 or v is None:
        return None
    return F.effective_step(v, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, step=t,
                            eps_mode=_mode(h))
