r"""stablestep.curvature: the Hessian's top eigenvalue and the one Adam actually sees.

- :func:`hvp`, :class:`HessianOperator`: Hessian-vector products by double backward,
  without the ``create_graph`` reference-cycle leak.
- :func:`lanczos_top`: Lanczos with full re-orthogonalisation and warm start.
- :func:`sharpness`: :math:`\lambda_{\max}(H)`; :func:`preconditioned_sharpness`:
  :math:`\lambda_{\max}(P^{-1}H)` with :math:`P` from the optimizer's own state;
  :func:`stability_threshold`: the bound that applies (GD 2, heavy ball 2+2mu, Nesterov,
  Adam (2+2 b1)/(1-b1)); :func:`max_stable_lr`: seed 003's answer as a :class:`StableLR`.
- :class:`CurvatureProbe`: what the Monitor calls every ``curvature_every`` steps.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "HessianOperator": "stablestep.curvature.hvp",
    "hvp": "stablestep.curvature.hvp",
    "EigenResult": "stablestep.curvature.lanczos",
    "LanczosConfig": "stablestep.curvature.lanczos",
    "lanczos_top": "stablestep.curvature.lanczos",
    "CurvatureProbe": "stablestep.curvature.probe",
    "ProbeConfig": "stablestep.curvature.probe",
    "PreconditionedOperator": "stablestep.curvature.stability",
    "StableLR": "stablestep.curvature.stability",
    "max_stable_lr": "stablestep.curvature.stability",
    "preconditioned_sharpness": "stablestep.curvature.stability",
    "preconditioner_diag": "stablestep.curvature.stability",
    "sharpness": "stablestep.curvature.stability",
    "stability_threshold": "stablestep.curvature.stability",
    "top_eigen": "stablestep.curvature.stability",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
