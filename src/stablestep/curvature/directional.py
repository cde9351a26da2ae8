r"""Curvature along one direction: cheaper than :math:`\lambda_{\max}`, and read at the spike.

Two measures, both in the learning-rate-free units of the papers that define them, so both
are compared with :math:`2/\eta` (:math:`\eta` the lr of param group 0). :math:`S` is the
optimizer's lr-free preconditioner, :math:`S = \operatorname{diag}(P^{-1})/\eta` from
:func:`~stablestep.curvature.preconditioner_diag` (Adam:
:math:`1/((1-\beta_1^t)(\sqrt{\hat v}+\epsilon))`, the :math:`(1-\beta_1^t)` factor being
the first moment's bias correction, 1 after a few dozen steps; SGD: :math:`S = I`).

- **Gradient-directional curvature** (Bai et al. 2025, arXiv:2506.04805, "Adaptive
  Preconditioners Trigger Loss Spikes in Adam"): the Rayleigh quotient of the
  preconditioned Hessian :math:`\hat H = S H` along the gradient,

  .. math::  \lambda_{\mathrm{grad}} = \frac{g^\top \hat H g}{g^\top g}
             = \frac{(S g)^\top (H g)}{g^\top g},

  one Hessian-vector product. The paper finds the loss spike fires when it crosses
  :math:`2/\eta` (after :math:`\lambda_{\max}(\hat H)` has sat above :math:`2/\eta` and the
  gradient has aligned with its top eigenvector). (The text of the paper was available to
  us only as summaries: we implement :math:`g^\top\hat H g/g^\top g` with :math:`\hat H`
  Adam's lr-free preconditioned Hessian, as they describe it.)
- **Critical sharpness** (Kalra et al. 2026, arXiv:2601.16979, "A Scalable Measure of Loss
  Landscape Curvature..."): :math:`\lambda_c = 2/\eta_c`, with :math:`\eta_c` the smallest
  learning rate at which a step along the update direction :math:`\Delta` raises the loss,
  :math:`L(\theta - \eta_c\Delta) = L(\theta)`, found by a line search with forward passes
  only (no second derivatives, so it works where double backward does not). Here
  :math:`\Delta = S g`, the step the optimizer would take from the current gradient without
  momentum. On a quadratic, :math:`\eta_c = 2\,g^\top\Delta/\Delta^\top H\Delta`, so
  :math:`\lambda_c = \Delta^\top H \Delta / g^\top \Delta` -- the Rayleigh quotient of the
  symmetric :math:`S^{1/2} H S^{1/2}` along :math:`S^{1/2} g`, hence at most
  :math:`\lambda_{\max}(P^{-1}H)/\eta`; on a real loss it includes the higher-order terms
  over the step, which is the point of the measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stablestep.curvature.fd import Evaluator
from stablestep.curvature.hvp import Operator


def grad_curvature(op: Operator, scale: Sequence[torch.Tensor] | None) -> float:
    r""":math:`g^\top S H g / g^\top g` at the operator's point (module docstring).

    ``scale``: :math:`S` as tensors shaped like the local parameters (None: :math:`S=I`).
    One Hessian-vector product. NaN when the gradient is zero or not finite.
    """
    g = op.flatten(op.grad)
    gg = op.dot(g, g)
    if not (math.isfinite(gg) and gg > 0):
        return math.nan
    unit = g / math.sqrt(gg)
    hu = op.matvec_flat(unit)
    su = unit if scale is None else op.flatten(scale) * unit
    return op.dot(su, hu)


@dataclass(frozen=True)
class CriticalSharpness:
    """Result of :func:`critical_sharpness`: ``value`` = 2/``eta_c``; ``n_forward`` passes."""

    value: float
    eta_c: float
    n_forward: int


def critical_sharpness(
    ev: Evaluator,
    loss0: float,
    direction: Sequence[torch.Tensor],
    *,
    eta0: float,
    rel_tol: float = 1e-3,
    refine: int = 5,
) -> CriticalSharpness:
    r""":math:`\lambda_c = 2/\eta_c` along ``direction`` :math:`\Delta` from the loss ``loss0``
    at :math:`\theta` (module docstring), forward passes only.

    The search starts at ``eta0`` (the current lr, or the previous :math:`\eta_c`),
    multiplies or divides by 4 until the loss change :math:`f(\eta) = L(\theta-\eta\Delta) -
    L(\theta)` changes sign, then takes at most ``refine`` more passes: the root of the
    parabola :math:`-a\eta + b\eta^2` through the bracket ends (exact on a quadratic), then
    regula falsi (Illinois variant), until the bracket is ``rel_tol`` wide or a pass lands
    on the root. No sign change within :math:`4^{12}\eta_0` (curvature along :math:`\Delta`
    not positive there): value 0. A rise already at :math:`4^{-12}\eta_0` (:math:`\Delta` is
    not a descent direction): value ``inf``.
    """
    n = 0

    def f(eta: float) -> float:
        nonlocal n
        n += 1
        val = ev.loss([-eta * d for d in direction]) - loss0
        return val if math.isfinite(val) else math.inf

    eta = float(eta0)
    fe = f(eta)
    lo = flo = hi = fhi = None
    if fe > 0:  # too far: shrink until the loss is not above loss0
        hi, fhi = eta, fe
        for _ in range(12):
            eta /= 4
            fe = f(eta)
            if fe <= 0:
                lo, flo = eta, fe
                break
            hi, fhi = eta, fe
        if lo is None:
            return CriticalSharpness(math.inf, 0.0, n)
    else:
        lo, flo = eta, fe
        for _ in range(12):
            eta *= 4
            fe = f(eta)
            if fe > 0:
                hi, fhi = eta, fe
                break
            lo, flo = eta, fe
        if hi is None:
            return CriticalSharpness(0.0, math.inf, n)
    tiny = 1e-14 * max(abs(loss0), 1e-30)
    best = lo + (hi - lo) * (-flo) / (fhi - flo) if math.isfinite(fhi) else 0.5 * (lo + hi)
    side = 0
    for k in range(refine):
        if hi - lo <= rel_tol * lo:
            break
        if not math.isfinite(fhi):
            guess = 0.5 * (lo + hi)
        elif k == 0 and flo < 0:  # f ~ -a eta + b eta^2 through (0,0), (lo,flo), (hi,fhi)
            den = lo * hi * (hi - lo)
            b = (fhi * lo - flo * hi) / den
            a = (fhi * lo * lo - flo * hi * hi) / den
            guess = a / b if b > 0 and lo < a / b < hi else lo + (hi - lo) * (-flo) / (fhi - flo)
        else:
            guess = lo + (hi - lo) * (-flo) / (fhi - flo)
        guess = min(max(guess, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
        fg = f(guess)
        best = guess
        if abs(fg) <= tiny:
            break
        if fg > 0:
            hi, fhi = guess, fg
            if side == 1:
                flo /= 2  # Illinois: keep a stale end from stalling the interpolation
            side = 1
        else:
            lo, flo = guess, fg
            if side == -1 and math.isfinite(fhi):
                fhi /= 2
            side = -1
    else:
        if math.isfinite(fhi) and fhi != flo:
            best = lo + (hi - lo) * (-flo) / (fhi - flo)
    return CriticalSharpness(2.0 / best, best, n)
