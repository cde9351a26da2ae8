r"""``stablestep.Adam`` and ``stablestep.AdamW``: Adam with every convention made explicit.

Both are :class:`torch.optim.Optimizer` subclasses with torch's state keys (``step`` as a
float32 scalar tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so a
``torch.optim.Adam`` state_dict loads into them and theirs into torch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from stablestep import formulas as F
from stablestep.optim import _compiled, _fast
from stablestep.optim._reference import AdamStep, adam_reference
from stablestep.optim.inspect import group_hyper, second_moment, step_count

IMPLS = ("auto", "fused", "foreach", "reference", "compiled")
EPS_MODES = ("torch", "tf")


TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def reject_torch_flags(cls: str, extra: dict[str, Any], impls: tuple[str, ...] = IMPLS) -> None:
    """torch.optim's implementation flags have one counterpart here, ``impl=``: say so.

    ``foreach=``/``fused=`` name an implementation (``impl="foreach"``/``"fused"`` where
    ``cls`` has it, among ``impls``); ``capturable=`` (CUDA-graph capture) and
    ``differentiable=`` (autograd through the step) are not implemented. Any other unknown
    keyword gets Python's own message.
    """
    choices = ", ".join(repr(i) for i in impls)
    for key in extra:
        if key in ("foreach", "fused"):
            if key in impls:
                raise TypeError(f"{cls} takes no {key}= argument: torch.optim's {key}=True is "
                                f"impl='{key}' here (impl is one of {choices})")
            raise TypeError(f"{cls} takes no {key}= argument and has no {key} path: choose "
                            f"the implementation with impl= (one of {choices})")
        if key in ("capturable", "differentiable"):
            what = "CUDA-graph capture" if key == "capturable" else "autograd through step()"
            raise TypeError(
                f"{cls} does not support {key}= (torch.optim's {what}); the implementation "
                f"is chosen with impl= (one of {choices})"
            )
        raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {key!r}")


def check_common(lr: Any, betas: Any, weight_decay: Any, impl: str) -> None:
    """Validate hyperparameters shared by the family, with torch's messages."""
    if isinstance(lr, torch.Tensor):
        raise ValueError("lr as a Tensor is not supported: pass a float")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if isinstance(betas, torch.Tensor) or any(isinstance(b, torch.Tensor) for b in betas):
        raise ValueError("betas as Tensors are not supported: pass two floats, "
                         "e.g. betas=(0.9, 0.999)")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} (expected one of {', '.join(map(repr, IMPLS))})")


def resolve_impl(impl: str, params: list[torch.Tensor], *, fused_ok: bool = True) -> str:
    """The path a group takes: ``auto`` means ``fused`` where every tensor allows it,
    else ``foreach``."""
    if impl not in ("fused", "auto"):
        return impl
    supported = fused_ok and all(_fast.fused_supported(p) for p in params)
    if impl == "fused" and not supported:
        bad = next((p for p in params if not _fast.fused_supported(p)), None)
        what = f"{bad.dtype} on {bad.device.type}" if bad is not None else "this optimizer"
        raise RuntimeError(f"impl='fused' is not available for {what}; use impl='foreach'")
    if impl == "auto":
        return "fused" if supported else "foreach"
    return impl


def compiled_kernel(params: list[torch.Tensor], tensors: list[torch.Tensor]):
    """The ``impl="compiled"`` kernel for these tensors, or ``None`` (then the caller takes
    its eager fast path): they must be contiguous CPU float32/float64 of one dtype, and the
    kernel must build here (see :mod:`stablestep.optim._compiled`)."""
    if not _compiled.supported(tensors):
        return None
    return _compiled.load(params[0].dtype)


class _AdamFamily(torch.optim.Optimizer):
    """What the Adam family shares: torch's state keys, created lazily, and loading a
    foreign (e.g. ``torch.optim.Adam``) state_dict whose groups lack our keys."""

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._scratch = _fast.Scratch()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill keys a foreign state_dict lacks from our defaults."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if not hasattr(self, "_scratch"):
            self._scratch = _fast.Scratch()

    def _init_group(self, group: dict) -> tuple[list[torch.Tensor], ...]:
        """``(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)`` of the
        parameters that have a gradient, creating their state on first use."""
        amsgrad = bool(group.get("amsgrad", False))
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps


class Adam(_AdamFamily):
    r"""Adam (Kingma & Ba 2015) with the epsilon convention, AMSGrad, weight decay and
    update clipping explicit.

    Per coordinate, with :math:`bc_1 = 1-\beta_1^t`, :math:`bc_2 = 1-\beta_2^t`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \tilde v_t = \max(\tilde v_{t-1}, v_t)\ \text{(amsgrad) else}\ v_t

    * ``eps_mode="torch"`` (PyTorch, optax; ``torch.optim.Adam``'s update, see below):
      :math:`\theta \mathrel{-}=
      \frac{\mathrm{lr}}{bc_1}\frac{m_t}{\sqrt{\tilde v_t/bc_2}+\epsilon}`.
    * ``eps_mode="tf"`` (TF1 ``AdamOptimizer``, tf.keras, Keras 3; "epsilon hat"):
      :math:`\mathrm{lr}_t = \mathrm{lr}\sqrt{bc_2}/bc_1`,
      :math:`\theta \mathrel{-}= \mathrm{lr}_t\frac{m_t}{\sqrt{\tilde v_t}+\hat\epsilon}`,
      which is the torch form with :math:`\epsilon_t = \hat\epsilon/\sqrt{bc_2}`: early on,
      TF's epsilon is effectively larger. Keras' default epsilon is ``1e-7``, torch's ``1e-8``.

    ``weight_decay`` is L2 (added to :math:`g_t`) unless ``decoupled_weight_decay`` (AdamW:
    :math:`\theta \mathrel{*}= 1-\mathrm{lr}\lambda`). ``update_clipping`` (StableAdamW,
    Wortsman et al. 2023) multiplies each tensor's lr by
    :math:`1/\max(1, \sqrt{\operatorname{mean}(g_t^2/\max(\hat v_t, \epsilon_t^2))})`, damping the
    step when the second moment is stale. ``impl``: ``"auto"`` (torch's fused kernel when
    dtype/device allow, else ``"foreach"``), ``"fused"``, ``"foreach"``, ``"reference"``
    (readable per-tensor math, :mod:`stablestep.optim._reference`) or ``"compiled"``
    (opt-in: update clipping in one C++ kernel call per step, built on first use with
    inductor's toolchain, :mod:`stablestep.optim._compiled`; contiguous CPU float32/float64,
    else, or without clipping, or where no compiler works, the ``"auto"`` path).
    torch's ``foreach=``/``fused=`` flags are ``impl=`` here (passing them is a TypeError that
    says so); ``capturable=`` and ``differentiable=`` are not supported.

    Equality with torch (``eps_mode="torch"``, float32/float64/bfloat16, tested in
    tests/optim/test_torch_parity.py): ``impl="foreach"`` and ``impl="reference"`` are
    bit-for-bit ``torch.optim.Adam``/``AdamW`` as constructed by default on CPU (and with
    ``foreach=True``/``False``); ``impl="fused"``, which ``"auto"`` picks for floating-point
    CPU/CUDA tensors, is bit-for-bit ``torch.optim.Adam(fused=True)`` and differs from
    torch's default path by rounding (its kernel orders the arithmetic differently): after
    5 steps, parameters near 1 are at most 6e-8 apart in float32, 2e-2 in bfloat16.

    Example::

        opt = stablestep.Adam(model.parameters(), lr=1e-3, eps=1e-7, eps_mode="tf")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        eps_mode: str = "torch",
        update_clipping: bool = False,
        impl: str = "auto",
        **torch_flags: Any,
    ) -> None:
        reject_torch_flags(type(self).__name__, torch_flags)
        check_common(lr, betas, weight_decay, impl)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if eps_mode not in EPS_MODES:
            raise ValueError(f"Invalid eps_mode: {eps_mode!r} (expected 'torch' or 'tf')")
        defaults = dict(
            lr=lr,
            betas=tuple(float(b) for b in betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=bool(amsgrad),
            maximize=bool(maximize),
            decoupled_weight_decay=bool(decoupled_weight_decay),
            eps_mode=eps_mode,
            update_clipping=bool(update_clipping),
            impl=impl,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            resolve_impl(group["impl"], group["params"])  # fail early on impl="fused"

    @staticmethod
    def _hyper(group: dict) -> AdamStep:
        return AdamStep(
            lr=float(group["lr"]),
            beta1=float(group["betas"][0]),
            beta2=float(group["betas"][1]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            eps_mode=group["eps_mode"],
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            update_clipping=bool(group["update_clipping"]),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the loss (returned)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = self._init_group(group)
            if not params:
                continue
            h = self._hyper(group)
            impl = resolve_impl(group["impl"], params)
            kernel = None
            if impl == "compiled":
                if h.update_clipping:
                    kernel = compiled_kernel(
                        params, params + grads + exp_avgs + exp_avg_sqs + max_sqs)
                if kernel is None:  # plain Adam is already at speed on torch's fused kernel
                    impl = resolve_impl("auto", params)
            if kernel is not None:
                scales = _compiled.adam_clip(
                    kernel, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, h)
            elif impl == "reference":
                maxs = max_sqs if h.amsgrad else [None] * len(params)
                tensors = zip(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, strict=True)
                scales = [adam_reference(*ts, h) for ts in tensors]
            else:
                if impl == "fused":
                    for i, p in enumerate(params):
                        if steps[i].device != p.device:
                            steps[i] = self.state[p]["step"] = steps[i].to(p.device)
                path = _fast.adam_fused if impl == "fused" else _fast.adam_foreach
                scales = path(
                    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, h, self._scratch
                )
            if h.update_clipping:
                for p, s in zip(params, scales, strict=True):
                    self.state[p]["update_scale"] = s
        return loss

    def effective_step(self, p: torch.Tensor) -> torch.Tensor | None:
        r"""Diagonal :math:`D` with :math:`\theta_t - \theta_{t-1} = -D\,m_t` for the last step
        (weight decay aside): ``s*lr/bc1 / (sqrt(v_hat) + eps_t)``, ``s`` the update-clipping
        scale (1 without clipping). ``None`` before ``p``'s first step."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        h = group_hyper(self, group)
        t = step_count(self, p)
        v = second_moment(self, p, h.amsgrad)
        if t == 0 or v is None:
            return None
        scale = float(self.state[p].get("update_scale", 1.0))
        return F.effective_step(v, lr=scale * h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
                                step=t, eps_mode=h.eps_mode)


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019):
    :math:`\theta \mathrel{*}= 1 - \mathrm{lr}\,\lambda` before the Adam update.

    Same options as :class:`Adam` (``eps_mode``, ``amsgrad``, ``update_clipping`` = StableAdamW,
    ``impl``); ``weight_decay`` defaults to ``1e-2`` like ``torch.optim.AdamW``. Equals
    ``torch.optim.AdamW`` for ``eps_mode="torch"``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        eps_mode: str = "torch",
        update_clipping: bool = False,
        impl: str = "auto",
        **torch_flags: Any,
    ) -> None:
        reject_torch_flags(type(self).__name__, torch_flags)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            decoupled_weight_decay=True, maximize=maximize, eps_mode=eps_mode,
            update_clipping=update_clipping, impl=impl,
        )

