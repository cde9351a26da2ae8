r"""Fast paths of the Adam family, numerically equal to :mod:`stablestep.optim._reference`.

* ``fused``: torch's own fused Adam/AdamW kernel (``torch._fused_adam_``/``_fused_adamw_``,
  CPU since torch 2.4). The TensorFlow/Keras convention runs on it unchanged through

  .. math::

      \mathrm{lr}\frac{\sqrt{bc_2}}{bc_1}\,\frac{m}{\sqrt v + \hat\epsilon}
      = \frac{\mathrm{lr}}{bc_1}\,\frac{m}{\sqrt{v/bc_2} + \hat\epsilon/\sqrt{bc_2}},

  i.e. by handing the kernel :math:`\epsilon_t = \hat\epsilon/\sqrt{1-b_2^t}` each step
  (tensors are bucketed by step count when they differ). Update clipping computes each
  tensor's scale first and buckets tensors by it (the kernel takes one lr per call).
* ``foreach``: ``torch._foreach_*`` ops, for devices/dtypes the fused kernel lacks.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from stablestep import formulas as F
from stablestep.optim._reference import AdamStep, Atan2Step


class Scratch:
    """A reusable flat buffer per (device, dtype), so per-tensor temporaries do not allocate."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def like(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """An uninitialised tensor shaped like ``x`` (valid until the next call for ``slot``)."""
        key = (x.device, x.dtype, slot)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < x.numel():
            buf = torch.empty(x.numel(), device=x.device, dtype=x.dtype)
            self._bufs[key] = buf
        return buf[: x.numel()].view(x.shape)


def fused_supported(p: torch.Tensor) -> bool:
    """Whether torch's fused Adam kernel accepts ``p`` (real floating dtype, supported device)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - torch without the helper
        devices = ["cpu", "cuda"]
    return p.device.type in devices and p.is_floating_point() and hasattr(torch, "_fused_adam_")


def _rms_scale(
    ge: torch.Tensor, vd: torch.Tensor, bc2: float, eps_t: float, buf: torch.Tensor,
    *, k: float = 1.0,
) -> float:
    """:func:`_reference.clip_scale` in three passes over memory, on ``buf``.

    ``vd`` holds the second moment divided by ``k`` (it may be ``buf`` itself), so that
    ``mean(g^2 / max(k*vd/bc2, f)) = (bc2/k) * mean(g^2 / max(vd, f*bc2/k))`` with
    ``f = max(eps_t^2, tiny)``; the sum is one ``dot(g / max(...), g)``.
    """
    n = ge.numel()
    if n == 0:
        return 1.0
    floor = F.g2v_floor(eps_t, vd.dtype) * bc2 / k
    torch.clamp_min(vd, floor, out=buf)
    torch.div(ge, buf, out=buf)
    ms = float(torch.dot(buf.reshape(-1), ge.reshape(-1))) * bc2 / (k * n)
    return F.update_clip_scale(math.sqrt(max(ms, 0.0)))


def adam_fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, h: AdamStep,
               scratch: Scratch) -> list[float]:
    """Adam/AdamW step on torch's fused kernel; returns the per-tensor clip scales."""
    torch._foreach_add_(steps, 1)
    n = len(params)
    ts = [float(s) for s in steps] if (h.eps_mode == "tf" or h.update_clipping) else None
    scales = [1.0] * n
    if h.update_clipping:
        l2 = h.weight_decay != 0 and not h.decoupled_weight_decay
        for i in range(n):
            bc2 = F.bias_correction2(h.beta2, ts[i])
            ge = grads[i].add(params[i], alpha=h.weight_decay) if l2 else grads[i]
            buf = scratch.like(ge)
            if h.beta2 > 0:  # buf = v_t / b2 in one pass
                torch.addcmul(exp_avg_sqs[i], ge, ge, value=(1 - h.beta2) / h.beta2, out=buf)
                k = h.beta2
            else:
                torch.mul(ge, ge, out=buf)
                k = 1.0
            if h.amsgrad:
                torch.maximum(buf, max_exp_avg_sqs[i] / k, out=buf)
            scales[i] = _rms_scale(ge, buf, bc2, F.eps_t(h.eps, h.beta2, ts[i], h.eps_mode), buf,
                                   k=k)

    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        t = ts[i] if h.eps_mode == "tf" else None
        buckets[(p.device, p.dtype, t, scales[i])].append(i)
    kernel = torch._fused_adamw_ if h.decoupled_weight_decay else torch._fused_adam_
    for (_, _, t, scale), idx in buckets.items():
        eps = h.eps if t is None else F.eps_t(h.eps, h.beta2, t, "tf")
        kernel(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [max_exp_avg_sqs[i] for i in idx] if h.amsgrad else [],
            [steps[i] for i in idx],
            amsgrad=h.amsgrad,
            lr=h.lr * scale,
            beta1=h.beta1,
            beta2=h.beta2,
            weight_decay=h.weight_decay,
            eps=eps,
            maximize=h.maximize,
            grad_scale=None,
            found_inf=None,
        )
    return scales


def _real(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(x) if torch.is_complex(x) else x for x in xs]


def adam_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, h: AdamStep,
                 scratch: Scratch) -> list[float]:
    """Adam/AdamW step with ``torch._foreach_*`` ops; returns the per-tensor clip scales."""
    params, grads, exp_avgs, exp_avg_sqs = map(_real, (params, grads, exp_avgs, exp_avg_sqs))
    max_exp_avg_sqs = _real(max_exp_avg_sqs)
    torch._foreach_add_(steps, 1)
    ts = [float(s) for s in steps]
    if h.maximize:
        grads = torch._foreach_neg(grads)
    if h.weight_decay != 0 and not h.decoupled_weight_decay:
        grads = torch._foreach_add(grads, params, alpha=h.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - h.beta1)
    torch._foreach_mul_(exp_avg_sqs, h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - h.beta2)
    vd = exp_avg_sqs
    if h.amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        vd = max_exp_avg_sqs
    bc1 = [F.bias_correction1(h.beta1, t) for t in ts]
    bc2 = [F.bias_correction2(h.beta2, t) for t in ts]
    eps = [F.eps_t(h.eps, h.beta2, t, h.eps_mode) for t in ts]
    scales = [1.0] * len(params)
    if h.update_clipping:
        scales = [
            _rms_scale(g, v, b, e, scratch.like(g))
            for g, v, b, e in zip(grads, vd, bc2, eps, strict=True)
        ]
    lrs = [h.lr * s for s in scales]
    if h.weight_decay != 0 and h.decoupled_weight_decay:
        torch._foreach_mul_(params, [1 - lr * h.weight_decay for lr in lrs])
    denom = torch._foreach_sqrt(vd)
    torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    steps_size = [-lr / b for lr, b in zip(lrs, bc1, strict=True)]
    torch._foreach_addcdiv_(params, exp_avgs, denom, steps_size)
    return scales


def atan2_fast(params, grads, exp_avgs, exp_avg_sqs, steps, h: Atan2Step, scratch: Scratch) -> None:
    r"""AdamAtan2 step: foreach moment updates, then per tensor (in a reused buffer)
    :math:`\operatorname{atan2}(\hat m, b\sqrt{\hat v}) = \operatorname{atan2}(c\,m, \sqrt v)`,
    :math:`c = \sqrt{bc_2}/(b\,bc_1)` (``atan2`` is invariant to a common positive scale)."""
    params, grads, exp_avgs, exp_avg_sqs = map(_real, (params, grads, exp_avgs, exp_avg_sqs))
    torch._foreach_add_(steps, 1)
    ts = [float(s) for s in steps]
    if h.maximize:
        grads = torch._foreach_neg(grads)
    if h.weight_decay != 0:
        torch._foreach_mul_(params, 1 - h.lr * h.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - h.beta1)
    torch._foreach_mul_(exp_avg_sqs, h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - h.beta2)
    for p, m, v, t in zip(params, exp_avgs, exp_avg_sqs, ts, strict=True):
        c = math.sqrt(F.bias_correction2(h.beta2, t)) / (h.b * F.bias_correction1(h.beta1, t))
        num, den = scratch.like(m, 0), scratch.like(v, 1)
        torch.sqrt(v, out=den)
        torch.mul(m, c, out=num)
        torch.atan2(num, den, out=den)
        p.add_(den, alpha=-h.lr * h.a)
