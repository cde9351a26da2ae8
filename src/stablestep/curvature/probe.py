r"""The curvature probe the Monitor calls every ``curvature_every`` steps.

One call builds a Hessian-vector-product operator on the user's closure (see
:mod:`stablestep.curvature.backends` for the backends and the automatic fallback), then
runs warm-started Lanczos on :math:`H` and on the symmetrised :math:`D^{1/2} H D^{1/2}`
(:mod:`stablestep.curvature.stability`), optionally the directional measures of
:mod:`stablestep.curvature.directional`. It returns a :class:`ProbeResult` (a
``dict[str, float]`` keyed by :mod:`stablestep.telemetry.names`, with ``failed`` /
``error`` / ``skipped`` attributes) and never raises into the training loop.

Cost: every result carries the wall time of the estimate (``curvature_seconds``), its
Hessian-vector products (``curvature_hvps``) and, from the second call on, the probe's
share of the wall time since its first call (``curvature_share``). When the share passes
``ProbeConfig.budget`` (5% by default) one line is logged, and with ``adapt=True`` the probe
skips estimates until its share is back under the budget: the cadence adapts to the budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stablestep.curvature.backends import BACKENDS, BackendChooser, build_operator
from stablestep.curvature.directional import critical_sharpness, grad_curvature
from stablestep.curvature.distributed import detect
from stablestep.curvature.fd import Evaluator
from stablestep.curvature.hvp import BackendError, LossFn, Operator, trainable
from stablestep.curvature.lanczos import LanczosConfig, lanczos_top
from stablestep.curvature.stability import (
    PreconditionedOperator,
    preconditioner_diag,
    stability_threshold,
)
from stablestep.optim.inspect import group_hyper
from stablestep.telemetry import names

logger = logging.getLogger("stablestep.curvature")


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of :class:`CurvatureProbe`.

    ``tol``: relative error bound per estimate (1% is plenty to compare with a threshold
    and keeps warm-started estimates at a few Hessian-vector products). ``max_iter``: most
    products per cold Lanczos run; ``warm_max_iter``: most per warm-started run (a warm
    start that has not met ``tol`` by then reports its estimate anyway: the next estimate
    continues from the better vector). ``sharpness`` / ``preconditioned``: which
    eigenvalues to estimate. ``restart_every``: every N-th call starts cold from a random
    vector instead of the previous eigenvector, so an eigenvalue that overtakes the tracked
    one is caught within N calls; 0 never restarts. ``seed``: seed of the probe's private
    generator (cold starts, and the RNG the closure sees under finite differences).

    ``backend``: ``"auto"`` (double backward, then the math attention kernel, then finite
    differences, falling back with one logged line), ``"exact"``, ``"math"``, ``"fd"`` or
    ``"forward"`` (no product: the critical sharpness only; see :class:`CurvatureProbe`).
    ``fd_step``: finite-difference step (default per dtype,
    :data:`stablestep.curvature.fd.FD_STEP`). ``grad_curvature``: also the
    gradient-directional curvature (1 product); ``critical_sharpness``: also the critical
    sharpness (about 6-10 forward passes). ``budget``: the share of wall time the probe may
    take before a notice is logged; ``adapt``: skip estimates to stay under it.
    ``distributed``: ``"auto"``, ``"off"``, ``"replicated"`` or ``"sharded"``
    (:func:`stablestep.curvature.distributed.detect`).
    """

    tol: float = 1e-2
    max_iter: int = 60
    warm_max_iter: int = 6
    sharpness: bool = True
    preconditioned: bool = True
    restart_every: int = 10
    seed: int = 0
    backend: str = "auto"
    fd_step: float | None = None
    grad_curvature: bool = False
    critical_sharpness: bool = False
    budget: float = 0.05
    adapt: bool = False
    distributed: str = "auto"

    def __post_init__(self) -> None:
        LanczosConfig(tol=self.tol, max_iter=self.max_iter)  # validates
        if self.warm_max_iter < 1:
            raise ValueError(f"Invalid warm_max_iter: {self.warm_max_iter} (expected >= 1)")
        if self.restart_every < 0:
            raise ValueError(f"Invalid restart_every: {self.restart_every} (expected >= 0)")
        if not (self.sharpness or self.preconditioned):
            raise ValueError("ProbeConfig: at least one of sharpness, preconditioned must be True")
        if self.backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {self.backend!r} (expected one of {BACKENDS})")
        if not (0.0 < self.budget <= 1.0):
            raise ValueError(f"Invalid budget: {self.budget} (expected 0 < budget <= 1)")
        if self.distributed not in ("auto", "off", "replicated", "sharded"):
            raise ValueError(
                f"Invalid distributed mode: {self.distributed!r} (expected 'auto', 'off', "
                "'replicated' or 'sharded')"
            )
        if self.fd_step is not None and not self.fd_step > 0:
            raise ValueError(f"Invalid fd_step: {self.fd_step} (expected > 0)")


class ProbeResult(dict):
    """The metrics of one estimate (``dict[str, float]``) and how it went.

    ``failed``: the estimate raised; ``error``: the error as one line of text (the values
    are then absent). ``skipped``: not run, to stay under the time budget (empty).
    ``backend``: the backend that produced the values (``"exact"``, ``"math"``, ``"fd"``,
    ``"forward"``).
    """

    def __init__(
        self,
        metrics: dict[str, float] | None = None,
        *,
        error: str | None = None,
        skipped: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(metrics or {})
        self.error = error
        self.skipped = skipped
        self.backend = backend

    @property
    def failed(self) -> bool:
        """True when the estimate raised (see :attr:`error`)."""
        return self.error is not None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


class CurvatureProbe:
    r"""Track :math:`\lambda_{\max}(H)` and :math:`\lambda_{\max}(P^{-1}H)` along training.

    ``params``: the tensors the Hessian is taken over (those requiring grad; ``DTensor``
    shards under FSDP2); ``optimizer``: supplies :math:`P` (its own state and epsilon
    convention) and the threshold. ``probe(loss_fn)`` returns a :class:`ProbeResult` with

    - ``sharpness``: :math:`\lambda_{\max}(H)`; ``lr_sharpness``: ``lr * sharpness``
      (lr of param group 0);
    - ``precond_sharpness``: :math:`\lambda_{\max}(P^{-1}H)`; ``precond_threshold``:
      :func:`~stablestep.curvature.stability_threshold` (38 for Adam with b1 = 0.9);
    - ``gd_threshold`` (SGD only): the bound on ``lr * sharpness`` (2, 2+2mu, ...). Adam's
      stability is not decided by ``lr * sharpness``, so the key is absent for Adam;
    - ``grad_curvature`` / ``critical_sharpness`` when enabled
      (:mod:`stablestep.curvature.directional`; compare with ``2/lr``);
    - ``curvature_seconds``, ``curvature_hvps``, ``curvature_share`` (module docstring).

    Preconditioned keys are absent until the optimizer has state (Adam's first step).
    Each estimate starts from the previous call's top eigenvector (warm start), so
    tracking costs a few Hessian-vector products per call (:attr:`last_hvps`); every
    ``restart_every``-th call starts cold (:class:`ProbeConfig`). A non-finite loss or
    product yields NaN values and keeps the previous warm start. Any error (a backend that
    does not run, a closure that raises) gives a result with ``failed`` set and the error
    text, never an exception. With ``backend="forward"`` the probe takes no Hessian-vector
    product and estimates no eigenvalue: it returns the critical sharpness only (one
    gradient and a line search of about 6-10 forward passes), for models where even
    finite-difference products cost too much. It is a directional measure, not
    :math:`\lambda_{\max}`: on a quadratic it is at most
    :math:`\lambda_{\max}(P^{-1}H)/\mathrm{lr}`.

    The probe never touches ``.grad`` (FSDP2's backward writes and then restores it), the
    parameters (perturbed and restored bit-exactly under finite differences), the
    optimizer, the model's train/eval mode or the global RNG (except that double backward
    runs the closure once on it: dropout in train mode draws from it).

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
        self.comm = detect(self.params, self.config.distributed)
        self._chooser = BackendChooser(self.config.backend, sharded=self._sharded)
        self.n = Operator(self.params).n
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self._v_h: torch.Tensor | None = None
        self._v_p: torch.Tensor | None = None
        self._eta_c = math.nan
        self.n_calls = 0
        self.last_hvps = 0
        self.total_seconds = 0.0
        self._t_first: float | None = None
        self._last_seconds = 0.0
        self._noticed = False

    @property
    def _sharded(self) -> bool:
        return self.comm is not None and self.comm.kind == "sharded"

    @property
    def backend(self) -> str:
        """The backend in use now (``auto`` resolves on the first call)."""
        return self._chooser.current

    # ------------------------------------------------------------------ cost
    def share(self, now: float | None = None) -> float:
        """The probe's share of the wall time since its first call (NaN before the 2nd)."""
        if self._t_first is None or self.n_calls < 2:
            return math.nan
        now = time.perf_counter() if now is None else now
        return self.total_seconds / max(now - self._t_first, 1e-12)

    def _skip(self, now: float) -> bool:
        if not self.config.adapt or self._t_first is None or self.n_calls < 2:
            return False
        cost = self._last_seconds
        return (self.total_seconds + cost) / (now - self._t_first + cost) > self.config.budget

    def _notice(self, share: float) -> None:
        if self._noticed or not share > self.config.budget:
            return
        self._noticed = True
        what = ("skipping estimates to stay within it" if self.config.adapt
                else "raise curvature_every, or pass ProbeConfig(adapt=True)")
        logger.warning(
            "curvature: the probe takes %.0f%% of wall time (%.3g s per estimate, "
            "%d Hessian-vector products, backend %s; budget %.0f%%): %s",
            100 * share, self._last_seconds, self.last_hvps, self.backend,
            100 * self.config.budget, what,
        )

    # ------------------------------------------------------------------ estimate
    def __call__(self, loss_fn: LossFn) -> ProbeResult:
        """Estimate the curvature of ``loss_fn()`` now; see the class docstring for the keys."""
        start = time.perf_counter()
        if self._skip(start):
            return ProbeResult(skipped=True, backend=self.backend)
        if self._t_first is None:
            self._t_first = start
        self.n_calls += 1
        self.last_hvps = 0
        every = self.config.restart_every
        cold = bool(every) and (self.n_calls - 1) % every == 0  # periodic cold start
        try:
            res = self._run(loss_fn, cold)
        except Exception as err:  # never raise into the training loop
            cause = err.__cause__ if isinstance(err, BackendError) and err.__cause__ else err
            res = ProbeResult(error=_one_line(cause), backend=self.backend)
            logger.warning("curvature: estimate %d failed (%s backend): %s",
                           self.n_calls, self.backend, res.error)
        self._last_seconds = time.perf_counter() - start
        self.total_seconds += self._last_seconds
        res[names.CURV_SECONDS] = self._last_seconds
        res[names.CURV_HVPS] = float(self.last_hvps)
        share = self.share(start + self._last_seconds)
        if math.isfinite(share):
            res[names.CURV_SHARE] = share
            self._notice(share)
        return res

    def _run(self, loss_fn: LossFn, cold: bool) -> ProbeResult:
        while True:
            backend = self._chooser.current
            try:
                if backend == "forward":
                    out = self._forward_estimate(loss_fn)
                else:
                    out = self._estimate(loss_fn, backend, cold)
                return ProbeResult(out, backend=backend)
            except BackendError as err:  # a product failed (not the closure): next backend
                if not self._chooser.demote(err.__cause__ or err):
                    raise

    def _diag(self) -> list[torch.Tensor] | None:
        if not self.config.preconditioned:
            return None
        try:
            diag = preconditioner_diag(self.optimizer, self.params)
        except ValueError:
            return None  # no optimizer state yet
        return [Operator.flatten([d]).view(-1) for d in diag]

    def _lanczos(self, matvec, n: int, v0: torch.Tensor | None, device, warm: bool):
        cap = min(self.config.max_iter, self.config.warm_max_iter) if warm else \
            self.config.max_iter
        cfg = LanczosConfig(tol=self.config.tol, max_iter=cap)
        return lanczos_top(matvec, n, config=cfg, v0=v0, generator=self._gen, device=device,
                           comm=self.comm)

    def _header(self) -> tuple[Any, dict[str, float]]:
        h0 = group_hyper(self.optimizer, self.optimizer.param_groups[0])
        return h0, {}

    def _estimate(self, loss_fn: LossFn, backend: str, cold: bool) -> dict[str, float]:
        h0, out = self._header()
        diag = self._diag()
        op = build_operator(backend, loss_fn, self.params, comm=self.comm,
                            fd_step=self.config.fd_step, seed=self.config.seed + self.n_calls)
        try:
            finite = math.isfinite(op.loss)
            if self.config.sharpness:
                lam = math.nan
                if finite:
                    v0 = None if cold else self._v_h
                    try:
                        res = self._lanczos(op.matvec_flat, op.n, v0, op.device, v0 is not None)
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
                    v0 = None if cold else self._v_p
                    try:
                        res = self._lanczos(pre.matvec_flat, op.n, v0, op.device, v0 is not None)
                        lam, self._v_p = res.top, res.vectors[0].clone()
                    except FloatingPointError:
                        pass
                out[names.PRECOND_SHARPNESS] = lam
                out[names.PRECOND_THRESHOLD] = stability_threshold(self.optimizer)
            self._directional(out, op, loss_fn, diag, h0.lr, finite)
        finally:
            self.last_hvps += op.n_hvp
            op.release()
        return out

    def _scale(self, diag: list[torch.Tensor] | None, lr: float) -> list[torch.Tensor] | None:
        """The lr-free preconditioner S = D / lr as local flat tensors (None for SGD)."""
        if diag is None:
            return None
        return [d / lr for d in diag]

    def _directional(self, out, op: Operator, loss_fn, diag, lr: float, finite: bool) -> None:
        if not (self.config.grad_curvature or self.config.critical_sharpness):
            return
        scale = self._scale(diag, lr) if lr > 0 else None
        flat_scale = None if scale is None else torch.cat(scale)
        if self.config.grad_curvature:
            val = math.nan
            if finite:
                try:
                    val = grad_curvature(op, None if scale is None else op.unflatten(flat_scale))
                except FloatingPointError:
                    pass
            out[names.GRAD_CURVATURE] = val
        if self.config.critical_sharpness:
            out[names.CRITICAL_SHARPNESS] = (
                self._critical(op, loss_fn, flat_scale, lr) if finite else math.nan
            )

    def _critical(self, op: Operator, loss_fn, flat_scale, lr: float) -> float:
        ev = getattr(op, "eval", None) or Evaluator(
            loss_fn, op.params, sharded=self._sharded, seed=self.config.seed + self.n_calls,
            comm=self.comm,
        )
        g = op.flatten(op.grad)
        direction = g if flat_scale is None else flat_scale * g
        # start the line search at the last critical lr (it moves slowly), else at the lr
        eta0 = self._eta_c if 0 < self._eta_c < math.inf else max(lr, 1e-12)
        cs = critical_sharpness(ev, op.loss, op.unflatten(direction), eta0=eta0)
        self._eta_c = cs.eta_c
        return cs.value

    def _forward_estimate(self, loss_fn: LossFn) -> dict[str, float]:
        """Forward-only: the critical sharpness from one gradient and a line search; no
        Hessian-vector product, no eigenvalue."""
        h0, out = self._header()
        diag = self._diag()
        ev = Evaluator(loss_fn, self.params, sharded=self._sharded,
                       seed=self.config.seed + self.n_calls, comm=self.comm)
        op = Operator(self.params, self.comm)
        op.loss, op.grad = ev.gradient()
        op._average_loss_and_grad()
        op.eval = ev  # type: ignore[attr-defined]
        if diag is not None:
            out[names.PRECOND_THRESHOLD] = stability_threshold(self.optimizer)
        elif h0.kind == "sgd":
            out[names.GD_THRESHOLD] = stability_threshold(self.optimizer)
        scale = self._scale(diag, h0.lr) if h0.lr > 0 else None
        flat_scale = None if scale is None else torch.cat(scale)
        out[names.CRITICAL_SHARPNESS] = (
            self._critical(op, loss_fn, flat_scale, h0.lr) if math.isfinite(op.loss)
            else math.nan
        )
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors and critical lr, generator state, call count, backend, config."""
        return {
            "config": asdict(self.config),
            "v_h": None if self._v_h is None else self._v_h.clone(),
            "v_p": None if self._v_p is None else self._v_p.clone(),
            "eta_c": self._eta_c,
            "generator": self._gen.get_state(),
            "n_calls": self.n_calls,
            "backend": self._chooser.current,
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
        self._chooser = BackendChooser(self.config.backend, sharded=self._sharded,
                                       current=state.get("backend"))
        dev = Operator(self.params).device
        self._v_h = None if state["v_h"] is None else state["v_h"].to(dev, copy=True)
        self._v_p = None if state["v_p"] is None else state["v_p"].to(dev, copy=True)
        self._eta_c = float(state.get("eta_c", math.nan))
        self._gen.set_state(state["generator"])
        self.n_calls = int(state["n_calls"])
