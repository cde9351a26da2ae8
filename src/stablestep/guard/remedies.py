r"""The guard's remedies, applied to a live torch optimizer (any Adam family member or SGD).

- :func:`enable_amsgrad`: turn AMSGrad on mid-run. torch's Adam (and stablestep's) expect
  ``max_exp_avg_sq`` in the state once ``amsgrad`` is set; it is initialised to the current
  ``exp_avg_sq``, so the first AMSGrad step divides by
  :math:`\max(v_{t-1}, v_t)`, exactly as if AMSGrad had been on with its max at
  :math:`v_{t-1}` (zeros would silently be a different optimizer for a while).
- :func:`raise_eps`: set eps to :func:`stablestep.diagnosis.explain.stable_eps` (the eps
  that caps the effective step :math:`\alpha_t/(\sqrt{\hat v}+\epsilon) \le \alpha_t/\epsilon`
  so that :math:`\lambda_{\max}(P^{-1}H) \le \alpha_t\lambda_{\max}(H)/\epsilon` stays under
  :math:`(2+2\beta_1)/(1-\beta_1)`), computed per param group, never lowering it.
- :func:`lr_factor`: the factor the guard's lr scale is multiplied by.
- :func:`g2v_rms`: StableAdamW's RMS of :math:`g^2/\max(\hat v, \epsilon_t^2)`
  (:func:`stablestep.formulas.g2v_rms`), the stale-second-moment evidence recorded with a
  spike (large when the gradient outgrew :math:`v`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stablestep import formulas as F
from stablestep.diagnosis.explain import stable_eps
from stablestep.optim.inspect import epsilon_t, group_hyper, second_moment, step_count


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group is of the Adam family (has ``betas``)."""
    return all(group_hyper(optimizer, g).kind == "adam" for g in optimizer.param_groups)


def enable_amsgrad(optimizer: torch.optim.Optimizer) -> int:
    """Turn AMSGrad on in every Adam group that has the option and has it off; return the
    number of groups changed. ``max_exp_avg_sq`` starts as a copy of ``exp_avg_sq``."""
    changed = 0
    for group in optimizer.param_groups:
        if "amsgrad" not in group or group["amsgrad"]:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "exp_avg_sq" in state and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone(
                    memory_format=torch.preserve_format)
        group["amsgrad"] = True
        changed += 1
    return changed


def ensure_amsgrad_state(optimizer: torch.optim.Optimizer) -> None:
    """After a rollback restored a state saved before AMSGrad was turned on: give every
    parameter of an AMSGrad group its ``max_exp_avg_sq`` (= ``exp_avg_sq``)."""
    for group in optimizer.param_groups:
        if not group.get("amsgrad", False):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "exp_avg_sq" in state and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone(
                    memory_format=torch.preserve_format)


def _group_step(optimizer: torch.optim.Optimizer, group: dict) -> int:
    return max((step_count(optimizer, p) for p in group["params"]), default=0)


def raise_eps(optimizer: torch.optim.Optimizer, sharpness: float, *,
              lr_scale: float = 1.0) -> list[tuple[float, float]]:
    """Raise each Adam group's eps to ``stable_eps`` for ``sharpness`` = :math:`\\lambda_{\\max}(H)`
    at the lr actually used (group lr times ``lr_scale``). Returns ``(old, new)`` per group
    (``new == old`` where eps was already large enough)."""
    out = []
    for group in optimizer.param_groups:
        h = group_hyper(optimizer, group)
        if h.kind != "adam" or "eps" not in group:
            continue
        want = stable_eps(h.lr * lr_scale, sharpness, beta1=h.beta1, beta2=h.beta2,
                          step=max(1, _group_step(optimizer, group)), eps_mode=h.eps_mode)
        old = float(group["eps"])
        new = max(old, float(f"{want:.2g}") if want > 0 else old)
        if new < want:  # rounding must not go under the bound
            new = want
        group["eps"] = new
        out.append((old, new))
    return out


def lr_factor(backoff: float, precond_sharpness: float | None,
              threshold: float | None) -> float:
    r"""``backoff``, or :math:`0.9\,T/\lambda_{\max}(P^{-1}H)` when the measured
    preconditioned sharpness asks for a larger cut (scaling lr scales :math:`P^{-1}H`)."""
    f = backoff
    if precond_sharpness and threshold and math.isfinite(precond_sharpness) \
            and precond_sharpness > 0:  # formulas.max_stable_lr at lr 1: the factor itself
        f = min(f, 0.9 * F.max_stable_lr(1.0, precond_sharpness, threshold))
    return f


@torch.no_grad()
def g2v_rms(optimizer: torch.optim.Optimizer) -> float | None:
    r"""StableAdamW's :math:`\mathrm{RMS}_t` (:func:`stablestep.formulas.g2v_rms`) over all
    coordinates with state, for the step about to be taken: the current ``.grad`` against
    the second moment it will enter, :math:`v_t` (:func:`stablestep.formulas.
    second_moment_update` of the stored :math:`v_{t-1}`; AMSGrad's max of the two), the
    same number the Monitor records after the step. ``None`` for non-Adam optimizers or
    before the first step."""
    num, cnt = 0.0, 0
    for group in optimizer.param_groups:
        h = group_hyper(optimizer, group)
        if h.kind != "adam":
            return None
        for p in group["params"]:
            v_prev = second_moment(optimizer, p, False)
            t = step_count(optimizer, p) + 1
            if p.grad is None or v_prev is None or t == 1:
                continue
            g = p.grad.float()
            v = F.second_moment_update(v_prev.float(), g, h.beta2)
            vmax = second_moment(optimizer, p, True)
            if h.amsgrad and vmax is not None and vmax is not v_prev:
                v = torch.maximum(vmax.float(), v)
            r = F.g2v_ratio(g, v, F.bias_correction2(h.beta2, t), epsilon_t(h, t))
            num += float(r.sum())
            cnt += p.numel()
    return math.sqrt(num / cnt) if cnt else None


def measure(curvature_loss: Callable[[], torch.Tensor] | None,
            optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """:math:`\\lambda_{\\max}(H)`, :math:`\\lambda_{\\max}(P^{-1}H)` and the threshold via
    :mod:`stablestep.curvature` (a Lanczos run each, at 1% tolerance); ``{}`` without a
    closure. Only called when a remedy needs the numbers, never per step."""
    if curvature_loss is None:
        return {}
    from stablestep.curvature import (
        preconditioned_sharpness,
        sharpness,
        stability_threshold,
    )

    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    out = {"sharpness": sharpness(curvature_loss, params, tol=1e-2)}
    try:
        out["precond_sharpness"] = preconditioned_sharpness(curvature_loss, optimizer, tol=1e-2)
        out["precond_threshold"] = stability_threshold(optimizer)
    except ValueError:  # no optimizer state yet
        pass
    return out
