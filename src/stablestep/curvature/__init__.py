r"""stablestep.curvature: the Hessian's top eigenvalue and the one Adam actually sees.

- :func:`hvp`, :class:`HessianOperator`: Hessian-vector products by double backward,
  without the ``create_graph`` reference-cycle leak.
- :func:`lanczos_top`: Lanczos with full re-orthogonalisation and warm start.
- :func:`sharpness`: :math:`\lambda_{\max}(H)`; :func:`preconditioned_sharpness`:
  :math:`\lambda_{\max}(P^{-1}H)` with :math:`P` from the optimizer's own state;
  :func:`stability_threshold`: the bound that applies (GD 2, heavy ball 2+2mu, Nesterov,
  Adam (2+2 b1)/(1-b1)); :func:`max_stable_lr`: the lr-divergence answer as a :class:`StableLR`.
- :class:`CurvatureProbe`: what the Monitor calls every ``curvature_every`` steps; it never
  raises into the training loop and returns a :class:`ProbeResult` (``.failed``, ``.error``,
  ``.backend``). Backends: exact double backward, double backward under
  :func:`math_attention` (SDPA/flash attention has no double backward), finite differences
  (:class:`FiniteDifferenceOperator`) and forward-only :func:`critical_sharpness`;
  :func:`grad_curvature` is the gradient-directional curvature.
"""

from __future__ import annotations

# Eager on purpose: curvature is torch through and through (nothing torch-free imports it),
# and ``hvp`` is both a submodule and a function here; a lazy attribute would hand out the
# module once anything imported ``stablestep.curvature.hvp``.
from stablestep.curvature.directional import critical_sharpness, grad_curvature
from stablestep.curvature.fd import FiniteDifferenceOperator
from stablestep.curvature.hvp import HessianOperator, hvp, math_attention
from stablestep.curvature.lanczos import EigenResult, LanczosConfig, lanczos_top
from stablestep.curvature.probe import CurvatureProbe, ProbeConfig, ProbeResult
from stablestep.curvature.stability import (
    PreconditionedOperator,
    StableLR,
    max_stable_lr,
    preconditioned_sharpness,
    preconditioner_diag,
    sharpness,
    stability_threshold,
    top_eigen,
)

__all__ = [
    "CurvatureProbe",
    "EigenResult",
    "FiniteDifferenceOperator",
    "HessianOperator",
    "LanczosConfig",
    "PreconditionedOperator",
    "ProbeConfig",
    "ProbeResult",
    "StableLR",
    "critical_sharpness",
    "grad_curvature",
    "hvp",
    "lanczos_top",
    "math_attention",
    "max_stable_lr",
    "preconditioned_sharpness",
    "preconditioner_diag",
    "sharpness",
    "stability_threshold",
    "top_eigen",
]
