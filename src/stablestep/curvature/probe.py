r"""The curvature probe the Monitor calls every ``curvature_every`` steps.

One call runs the user's closure once (one forward and one differentiable backward),
then two warm-started Lanczos runs against that graph: one on :math:`H` and one on the
symmetrised :math:`D^{1/2} H D^{1/2}` (see :mod:`stablestep.curvature.stability`). It
returns a ``dict[str, float]`` keyed by :mod:`stablestep.telemetry.names`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stablestep.curvature.hvp import HessianOperator, LossFn, trainable
from stablestep.curvature.lanczos import LanczosConfig, lanczos_top
from stablestep.curvature.stability import (
    PreconditionedOperator,
    preconditioner_diag,
    stability_threshold,
)
from stablestep.optim.inspect import group_hyper
from stablestep.telemetry import names


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of :class:`CurvatureProbe`.

    ``tol``: relative error bound per estimate (1% is plenty to compare with a threshold
    and keeps warm-started estimates at a few Hessian-vector products). ``max_iter``: most
    products per Lanczos run. ``sharpness`` / ``preconditioned``: which estimates to make.
    ``restart_every``: every N-th call starts cold from a random vector instead of the
    previous eigenvector, so an eigenvalue that overtakes the tracked one (whose direction
    the warm start barely contains) is caught within N calls; 0 never restarts.
    ``seed``: seed of the probe's private generator (used for cold starts only).
    """

    tol: float = 1e-2
    max_iter: int = 60
    sharpness: bool = True
    preconditioned: bool = True
    restart_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        LanczosConfig(tol=self.tol, max_iter=self.max_iter)  # validates
        if self.restart_every < 0:
            raise ValueError(f"Invalid restart_every: {self.restart_every} (expected >= 0)")
        if not (self.sharpness or self.preconditioned):
            raise ValueError("ProbeConfig: at least one of sharpness, preconditioned must be True")


class CurvatureProbe:
    r"""Track :math:`\lambda_{\max}(H)` and :math:`\lambda_{\max}(P^{-1}H)` along training.

    ``params``: the tensors the Hessian is taken over (those requiring grad);
    ``optimizer``: supplies :math:`P` (its own state and epsilon convention) and the
    threshold. ``probe(loss_fn)`` returns

    - ``sharpness``: :math:`\lambda_{\max}(H)`; ``lr_sharpness``: ``lr * sharpness``
      (lr of param group 0);
    - ``precond_sharpness``: :math:`\lambda_{\max}(P^{-1}H)`; ``precond_threshold``:
      :func:`~stablestep.curvature.stability_threshold` (38 for Adam with b1 = 0.9);
    - ``gd_threshold`` (SGD only): the bound on ``lr * sharpness`` (2, 2+2mu, ...). Adam's
      stability is not decided by ``lr * sharpness``, so the key is absent for Adam.

    Preconditioned keys are absent until the optimizer has state (Adam's first step).
    Each estimate starts from the previous call's top eigenvector (warm start), so
    tracking costs a few Hessian-vector products per call (:attr:`last_hvps` says how
    many); every ``restart_every``-th call starts cold (:class:`ProbeConfig`). A
    non-finite loss or Hessian-vector product yields NaN values and keeps the
    previous warm start. The probe never touches ``.grad``, the parameters, the optimizer,
    the model's train/eval mode or the global RNG (the closure itself runs once, in the
    mode the model is in: a BatchNorm in train mode updates its running statistics).

    Example::

        probe = CurvatureProbe(model.parameters(), opt)
        metrics = probe(lambda: F.mse_loss(model(x_probe), y_probe))
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        config: ProbeConfig | None = None,
    ) -> None:
        self.params = trainable(list(params))
        self.optimizer = optimizer
        self.config = config or ProbeConfig()
        self.n = sum(p.numel() for p in self.params)
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self._v_h: torch.Tensor | None = None
        self._v_p: torch.Tensor | None = None
        self.n_calls = 0
        self.last_hvps = 0

    def _lanczos(self, matvec, v0: torch.Tensor | None):
        cfg = LanczosConfig(tol=self.config.tol, max_iter=self.config.max_iter)
        return lanczos_top(
            matvec, self.n, config=cfg, v0=v0, generator=self._gen, device=self.params[0].device
        )

    def __call__(self, loss_fn: LossFn) -> dict[str, float]:
        """Estimate the curvature of ``loss_fn()`` now; see the class docstring for the keys."""
        self.n_calls += 1
        self.last_hvps = 0
        every = self.config.restart_every
        cold = bool(every) and (self.n_calls - 1) % every == 0  # periodic cold start
        h0 = group_hyper(self.optimizer, self.optimizer.param_groups[0])
        diag = None
        if self.config.preconditioned:
            try:
                diag = preconditioner_diag(self.optimizer, self.params)
            except ValueError:
                diag = None  # no optimizer state yet
        out: dict[str, float] = {}
        op = HessianOperator(loss_fn, self.params)
        try:
            finite = math.isfinite(op.loss)
            if self.config.sharpness:
                lam = math.nan
                if finite:
                    try:
                        res = self._lanczos(op.matvec_flat, None if cold else self._v_h)
                        lam, self._v_h = res.top, res.vectors[0].clone()
                    except FloatingPointError:
                        pass
                out[names.SHARPNESS] = lam
                out[names.LR_SHARPNESS] = h0.lr * lam
                if h0.kind == "sgd":
                    out[names.GD_THRESHOLD] = stability_threshold(self.optimizer)
            if diag is not None:
                lam = math.nan
                if finite:
                    pre = PreconditionedOperator(op, diag)
                    try:
                        res = self._lanczos(pre.matvec_flat, None if cold else self._v_p)
                        lam, self._v_p = res.top, res.vectors[0].clone()
                    except FloatingPointError:
                        pass
                out[names.PRECOND_SHARPNESS] = lam
                out[names.PRECOND_THRESHOLD] = stability_threshold(self.optimizer)
        finally:
            self.last_hvps = op.n_hvp
            op.release()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors, generator state, call count and config (tensors cloned)."""
        return {
            "config": asdict(self.config),
            "v_h": None if self._v_h is None else self._v_h.clone(),
            "v_p": None if self._v_p is None else self._v_p.clone(),
            "generator": self._gen.get_state(),
            "n_calls": self.n_calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; later calls continue exactly as the saved probe would."""
        for key in ("v_h", "v_p"):
            v = state[key]
            if v is not None and v.shape[-1] != self.n:
                raise ValueError(
                    f"state_dict {key} has {v.shape[-1]} entries but the probe's parameters "
                    f"have {self.n}"
                )
        self.config = ProbeConfig(**state["config"])
        dev = self.params[0].device
        self._v_h = None if state["v_h"] is None else state["v_h"].to(dev, copy=True)
        self._v_p = None if state["v_p"] is None else state["v_p"].to(dev, copy=True)
        self._gen.set_state(state["generator"])
        self.n_calls = int(state["n_calls"])
