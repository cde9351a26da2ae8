r"""``stablestep.AdamAtan2``: epsilon-free Adam (Everett et al. 2024, "Scaling Exponents
Across Parameterizations and Optimizers", arXiv:2407.05872)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from stablestep import formulas as F
from stablestep.optim import _compiled, _fast
from stablestep.optim._reference import Atan2Step, atan2_reference
from stablestep.optim.adam import (
    _AdamFamily,
    check_common,
    compiled_kernel,
    reject_torch_flags,
    resolve_impl,
)


class AdamAtan2(_AdamFamily):
    r"""Adam with :math:`m/(\sqrt v+\epsilon)` replaced by a bounded, scale-invariant ``atan2``.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        \theta_t &= (1-\mathrm{lr}\,\lambda)\,\theta_{t-1}
            - \mathrm{lr}\cdot a\cdot\operatorname{atan2}\!\big(m_t/bc_1,\; b\sqrt{v_t/bc_2}\big)

    There is no epsilon to tune (or to be too small: late explosion): each coordinate moves at
    most :math:`\mathrm{lr}\,a\,\pi/2`, and where :math:`|\hat m| \ll b\sqrt{\hat v}` the step is
    Adam's with :math:`\epsilon = 0` scaled by :math:`a/b`. Weight decay is decoupled (AdamW).
    Defaults ``a=1.27, b=1`` follow the widely used PyTorch port (lucidrains/adam-atan2-pytorch).
    State keys are Adam's (``step``, ``exp_avg``, ``exp_avg_sq``). ``impl``: ``"auto"``/
    ``"foreach"`` (eager fast path), ``"reference"``, or ``"compiled"`` (opt-in: the whole
    update in one C++ kernel call per step, built on first use with inductor's toolchain,
    :mod:`stablestep.optim._compiled`; float32 ``atan2`` within 3 eps; contiguous CPU
    float32/float64, else, or where no compiler works, the eager fast path).

    Example::

        opt = stablestep.AdamAtan2(model.parameters(), lr=3e-4, weight_decay=0.1)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        *,
        a: float = 1.27,
        b: float = 1.0,
        maximize: bool = False,
        impl: str = "auto",
        **torch_flags: Any,
    ) -> None:
        reject_torch_flags(type(self).__name__, torch_flags,
                           ("auto", "foreach", "reference", "compiled"))
        check_common(lr, betas, weight_decay, impl)
        if impl == "fused":
            raise ValueError("impl='fused' is not available for AdamAtan2; use 'auto' or 'foreach'")
        if not a > 0.0:
            raise ValueError(f"Invalid a value: {a}")
        if not b > 0.0:
            raise ValueError(f"Invalid b value: {b}")
        defaults = dict(
            lr=lr,
            betas=tuple(float(x) for x in betas),
            weight_decay=weight_decay,
            a=float(a),
            b=float(b),
            maximize=bool(maximize),
            amsgrad=False,
            decoupled_weight_decay=True,
            eps_mode="none",
            impl=impl,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the loss (returned)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs, _, steps = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            h = Atan2Step(
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                weight_decay=float(group["weight_decay"]), a=group["a"], b=group["b"],
                maximize=bool(group["maximize"]),
            )
            impl = resolve_impl(group["impl"], params, fused_ok=False)
            kernel = compiled_kernel(params, params + grads + ms + vs) if (
                impl == "compiled") else None
            if kernel is not None:
                _compiled.atan2_step(kernel, params, grads, ms, vs, steps, h)
            elif impl == "reference":
                for p, g, m, v, s in zip(params, grads, ms, vs, steps, strict=True):
                    atan2_reference(p, g, m, v, s, h)
            else:
                _fast.atan2_fast(params, grads, ms, vs, steps, h, self._scratch)
        return loss

    def effective_step(self, p: torch.Tensor) -> torch.Tensor | None:
        r"""Diagonal :math:`D` with :math:`\theta_t-\theta_{t-1} = -D\,m_t` for the last step
        (weight decay aside), the secant linearisation of the ``atan2`` update:

        .. math::

            D = \mathrm{lr}\,a\,\frac{\operatorname{atan2}(\hat m, b\sqrt{\hat v})}{m}
            \;\xrightarrow{m\to 0}\; \frac{\mathrm{lr}\,a}{bc_1\, b\sqrt{\hat v}}

        (0 where :math:`m = v = 0`: the coordinate has never had a gradient).
        ``None`` before ``p``'s first step.
        """
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self.state.get(p, {})
        if "step" not in state:
            return None
        t = float(state["step"])
        if t == 0:
            return None
        b1, b2 = group["betas"]
        lr, a, b = float(group["lr"]), group["a"], group["b"]
        bc1, bc2 = F.bias_correction1(b1, t), F.bias_correction2(b2, t)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if torch.is_complex(m):
            m, v = torch.view_as_real(m), torch.view_as_real(v)
        den = b * (v / bc2).sqrt()
        m_hat = m / bc1
        secant = torch.atan2(m_hat, den) / torch.where(m == 0, torch.ones_like(m), m)
        limit = torch.where(den > 0, 1.0 / (bc1 * den), torch.zeros_like(den))
        return lr * a * torch.where(m == 0, limit, secant)
