r"""Sharpness, Adam's preconditioned sharpness, and the stability bounds they are compared to.

*Sharpness* is :math:`\lambda_{\max}(H)`, the largest eigenvalue of the loss Hessian.
An optimizer that is preconditioned gradient descent, :math:`\theta \leftarrow \theta -
P^{-1} \hat m`, is governed by the *preconditioned sharpness*
:math:`\lambda_{\max}(P^{-1} H)`. With :math:`D = \operatorname{diag}(P^{-1})` (the
optimizer's own effective per-coordinate step, :func:`stablestep.optim.inspect.effective_step`,
so the epsilon convention, AMSGrad's ``max_v`` and bias correction are the optimizer's own;
decoupled weight decay is not part of :math:`P`), :math:`P^{-1}H = D H` is similar to the
symmetric :math:`D^{1/2} H D^{1/2}` (:math:`D H = D^{1/2}(D^{1/2} H D^{1/2}) D^{-1/2}`), so
both have the same real eigenvalues and Lanczos runs on the symmetric form; an eigenvector
:math:`y` of it maps to :math:`x = D^{1/2} y` of :math:`P^{-1}H`. For SGD :math:`D = \mathrm{lr}`
and the preconditioned sharpness is :math:`\mathrm{lr}\,\lambda_{\max}(H)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stablestep import formulas as F
from stablestep.curvature.hvp import HessianOperator, LossFn
from stablestep.curvature.lanczos import EigenResult, LanczosConfig, lanczos_top
from stablestep.optim.inspect import GroupHyper, effective_step, group_hyper


def _groups_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _hypers(optimizer: torch.optim.Optimizer) -> list[GroupHyper]:
    return [group_hyper(optimizer, g) for g in optimizer.param_groups]


def preconditioner_diag(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """:math:`D = \\operatorname{diag}(P^{-1})` for each tensor of ``params``, shaped like it.

    Parameters the optimizer does not hold, or holds without state yet (never stepped),
    get 0: the optimizer does not move them. Raises ``ValueError`` when no parameter has
    a preconditioner (Adam before its first step, or an optimizer of unknown kind).
    """
    groups = _groups_of(optimizer)
    out: list[torch.Tensor] = []
    found = False
    for p in params:
        g = groups.get(id(p))
        d = None if g is None else effective_step(optimizer, p, g)
        if d is None:
            if g is not None and group_hyper(optimizer, g).kind == "other" and not callable(
                getattr(optimizer, "effective_step", None)
            ):
                raise ValueError(
                    f"unsupported optimizer {type(optimizer).__name__}: expected an Adam-family "
                    "optimizer, SGD, or one with an effective_step(p) method"
                )
            out.append(torch.zeros_like(p))
            continue
        found = True
        out.append(torch.broadcast_to(d.detach().to(p.dtype), p.shape))
    if not found:
        raise ValueError(
            "the optimizer has no state for these parameters yet: take at least one "
            "optimizer step before measuring the preconditioned sharpness"
        )
    return out


class PreconditionedOperator:
    r"""The symmetric :math:`D^{1/2} H D^{1/2}`, similar to :math:`P^{-1}H` (module docstring)."""

    def __init__(self, hessian: HessianOperator, diag: Sequence[torch.Tensor]) -> None:
        self.hessian = hessian
        self.n = hessian.n
        self.sqrt_d = HessianOperator.flatten([d.clamp_min(0).sqrt() for d in diag])

    def matvec_flat(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`D^{1/2} H D^{1/2} y` for a flat float64 ``y``."""
        return self.sqrt_d * self.hessian.matvec_flat(self.sqrt_d * y)

    def to_eigvec(self, y: torch.Tensor) -> torch.Tensor:
        """Map an eigenvector ``y`` of the symmetric form to one of :math:`P^{-1}H` (unit norm)."""
        x = self.sqrt_d * y
        return x / x.norm()


def top_eigen(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    *,
    config: LanczosConfig | None = None,
    v0: torch.Tensor | None = None,
) -> EigenResult:
    """Top eigenpairs of the Hessian of ``loss_fn()`` w.r.t. ``params`` (Lanczos, see there).

    Eigenvectors come back flat, in the order of the trainable tensors of ``params``.
    """
    op = HessianOperator(loss_fn, params)
    try:
        return lanczos_top(op.matvec_flat, op.n, config=config, v0=v0, device=op.device)
    finally:
        op.release()


def sharpness(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    *,
    tol: float = 1e-3,
    max_iter: int = 80,
    seed: int = 0,
) -> float:
    r""":math:`\lambda_{\max}(H)`, the largest eigenvalue of the Hessian of ``loss_fn()``.

    ``loss_fn`` is a closure returning the scalar loss on a fixed batch, computed from
    ``params`` (those that require grad); it runs once, in whatever train/eval mode the
    model is in (never switched here). ``tol`` bounds the relative error.

    Example::

        lam = sharpness(lambda: F.cross_entropy(model(x), y), model.parameters())
    """
    cfg = LanczosConfig(tol=tol, max_iter=max_iter, seed=seed)
    return top_eigen(loss_fn, list(params), config=cfg).top


def preconditioned_sharpness(
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    tol: float = 1e-3,
    max_iter: int = 80,
    seed: int = 0,
) -> float:
    r""":math:`\lambda_{\max}(P^{-1} H)` with :math:`P` from ``optimizer``'s current state.

    The Hessian is taken w.r.t. the optimizer's parameters (those requiring grad); see the
    module docstring for :math:`P` and the symmetrisation. Compare with
    :func:`stability_threshold`. Raises ``ValueError`` before the optimizer's first step
    (Adam has no second moment yet).
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    diag = preconditioner_diag(optimizer, params)
    op = HessianOperator(loss_fn, params)
    try:
        pre = PreconditionedOperator(op, diag)
        cfg = LanczosConfig(tol=tol, max_iter=max_iter, seed=seed)
        return lanczos_top(pre.matvec_flat, pre.n, config=cfg, device=op.device).top
    finally:
        op.release()


def _group_threshold(h: GroupHyper) -> float:
    if h.kind not in ("adam", "sgd"):
        raise ValueError(
            "stability_threshold: unsupported optimizer (expected Adam family or SGD)"
        )
    return F.threshold(h.kind, beta1=h.beta1, momentum=h.momentum, dampening=h.dampening,
                       nesterov=h.nesterov)


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    r"""The bound on :math:`\lambda_{\max}(P^{-1}H)` below which ``optimizer`` is stable.

    :func:`stablestep.formulas.threshold` for each param group (the equations are there and
    tested against the spectral radius of torch's own iteration); in short:

    Linearise around a minimum with the preconditioner frozen: along an eigenvector of
    :math:`P^{-1}H` with eigenvalue :math:`a` every method below is a 2-term recurrence
    :math:`x_{t+1} = (1 + c - b\,a)\,x_t - d\,x_{t-1}`, stable iff both roots of
    :math:`z^2 - (1+c-b a) z + d` lie in the unit disc (Jury: :math:`|d|<1`,
    :math:`1 - (1+c-ba) + d > 0`, :math:`1 + (1+c-ba) + d > 0`); the last one binds:

    - GD, :math:`x \leftarrow x - a x` (:math:`a = \mathrm{lr}\,\lambda`): :math:`a < 2`.
    - Heavy ball (torch SGD, ``buf = mu*buf + (1-dampening)*g``, ``x -= lr*buf``):
      :math:`x_{t+1} = (1+\mu-(1-d)a)x_t - \mu x_{t-1}`, so :math:`a < (2+2\mu)/(1-d)`.
    - Nesterov (torch, ``x -= lr*(g + mu*buf)``): state :math:`(x, b)` with matrix
      :math:`[[1-a(1+\mu), -\mathrm{lr}\mu^2], [\lambda, \mu]]`, trace :math:`1+\mu-a(1+\mu)`,
      determinant :math:`\mu(1-a)`: :math:`a < (2+2\mu)/(1+2\mu)`
      (:math:`(2+2\mu)/(1+(2-d)\mu)` with dampening, which torch does not allow).
    - Adam family (EMA momentum ``m = b1*m + (1-b1)*g``, ``x -= P^{-1} m``, :math:`a` an
      eigenvalue of :math:`P^{-1}H`): :math:`x_{t+1} = (1+\beta_1-(1-\beta_1)a)x_t -
      \beta_1 x_{t-1}`, so :math:`a < (2+2\beta_1)/(1-\beta_1)` = 38 for
      :math:`\beta_1 = 0.9` (Cohen et al. 2022).

    With several param groups the smallest bound is returned. The bound on
    ``lr * lam_max(H)`` for SGD is the same number (:math:`P^{-1} = \mathrm{lr}`).
    """
    return min(_group_threshold(h) for h in _hypers(optimizer))


@dataclass(frozen=True)
class StableLR:
    """Answer of :func:`max_stable_lr`.

    ``lr``: the current lr (param group 0). ``max_lr``: the largest lr at which the
    linearised dynamics are stable at the current point and batch. ``ratio = lr / max_lr``
    (above 1: unstable). ``precond_sharpness``: :math:`\\lambda_{\\max}(P^{-1}H)` at the
    current lr; ``threshold``: :func:`stability_threshold`; ``kind``: ``"adam"`` or
    ``"sgd"``; ``message``: the answer in words.
    """

    lr: float
    max_lr: float
    ratio: float
    precond_sharpness: float
    threshold: float
    kind: str
    message: str

    @property
    def stable(self) -> bool:
        """True when the current lr is below the largest stable one."""
        return self.ratio < 1.0


def _fmt_lr(x: float) -> str:
    """Two significant digits the way people write learning rates: 0.3, 4.3e-4."""
    if not math.isfinite(x) or 1e-2 <= abs(x) < 1e3:
        return f"{x:.2g}"
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def max_stable_lr(
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    tol: float = 1e-3,
    max_iter: int = 80,
    seed: int = 0,
) -> StableLR:
    r"""The largest stable learning rate for this model, batch and optimizer state.

    :math:`P^{-1}` is proportional to the learning rate (Adam:
    :math:`\mathrm{lr}/(1-\beta_1^t)/(\sqrt{\hat v}+\epsilon_t)`, SGD: :math:`\mathrm{lr}`),
    so at frozen optimizer state the preconditioned sharpness scales linearly with lr and
    the bound :math:`\lambda_{\max}(P^{-1}H) < T` (:func:`stability_threshold`) gives

    .. math::  \mathrm{lr}_{\max} = \mathrm{lr}\, T / \lambda_{\max}(P^{-1}H).

    Several param groups are scaled together (``lr`` and ``max_lr`` refer to group 0).
    The lr-divergence answer: ``max_stable_lr(loss_fn, opt).message`` reads e.g. "your lr 1.0e-3 is
    2.3x above the largest stable lr 4.3e-4 for this model and batch (...)".
    """
    lam = preconditioned_sharpness(loss_fn, optimizer, tol=tol, max_iter=max_iter, seed=seed)
    thr = stability_threshold(optimizer)
    h = group_hyper(optimizer, optimizer.param_groups[0])
    lr = h.lr
    max_lr = F.max_stable_lr(lr, lam, thr)
    ratio = lr / max_lr if max_lr > 0 else math.inf
    what = (
        f"lam_max(P^-1 H) = {lam:.3g} against the bound {thr:.3g}"
        if h.kind == "adam"
        else f"lr * lam_max(H) = {lam:.3g} against the bound {thr:.3g}"
    )
    if ratio >= 1.0:
        msg = (
            f"your lr {_fmt_lr(lr)} is {ratio:.2g}x above the largest stable lr "
            f"{_fmt_lr(max_lr)} for this model and batch ({what})"
        )
    else:
        msg = (
            f"your lr {_fmt_lr(lr)} is below the largest stable lr {_fmt_lr(max_lr)} for "
            f"this model and batch, a margin of {1 / ratio:.2g}x ({what})"
        )
    return StableLR(
        lr=lr, max_lr=max_lr, ratio=ratio, precond_sharpness=lam, threshold=thr,
        kind=h.kind, message=msg,
    )
