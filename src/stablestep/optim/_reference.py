r"""Readable per-tensor reference math of the Adam family, written as the papers write it.

These functions are the specification: the fast paths in :mod:`stablestep.optim._fast`
are tested against them (parameters *and* state, several float64 steps). Each function
updates ``param`` and the state tensors in place and returns the update-clipping scale
it applied (1.0 when clipping is off or did not trigger).

Notation: :math:`g_t` the gradient (negated under ``maximize``; plus :math:`\lambda\theta`
for L2 weight decay), :math:`b_1, b_2` the betas, :math:`bc_1 = 1-b_1^t`,
:math:`bc_2 = 1-b_2^t`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stablestep import formulas as F


@dataclass(frozen=True)
class AdamStep:
    """Scalars of one Adam step for one param group (see :class:`stablestep.optim.Adam`)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    eps_mode: str
    decoupled_weight_decay: bool
    update_clipping: bool


def clip_scale(g: torch.Tensor, v_denom: torch.Tensor, bc2: float, eps_t: float) -> float:
    r"""StableAdamW's update-clipping factor (Wortsman et al. 2023, Algorithm 2).

    :math:`s_t = 1 / \max(1, \mathrm{RMS}_t)` with :math:`\mathrm{RMS}_t`
    = :func:`stablestep.formulas.g2v_rms` of ``g`` and ``v_denom`` (the second moment Adam
    divides by, AMSGrad's max under ``amsgrad``, already updated with ``g``).
    """
    return F.update_clip_scale(F.g2v_rms(g, v_denom, bc2, eps_t))


def adam_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: torch.Tensor,
    h: AdamStep,
) -> float:
    r"""One Adam/AdamW step on one tensor, in either epsilon convention.

    .. math::

        m_t &= b_1 m_{t-1} + (1-b_1) g_t, \qquad v_t = b_2 v_{t-1} + (1-b_2) g_t^2,
        \qquad \tilde v_t = \max(\tilde v_{t-1}, v_t) \text{ (AMSGrad) else } v_t\\
        \text{torch/optax:}\quad \theta_t &= \theta_{t-1}
            - \frac{\mathrm{lr}}{bc_1}\,\frac{m_t}{\sqrt{\tilde v_t}/\sqrt{bc_2} + \epsilon}\\
        \text{TF/Keras:}\quad \theta_t &= \theta_{t-1}
            - \mathrm{lr}\frac{\sqrt{bc_2}}{bc_1}\,\frac{m_t}{\sqrt{\tilde v_t} + \hat\epsilon}

    Decoupled weight decay multiplies :math:`\theta` by :math:`1 - \mathrm{lr}\,\lambda` first;
    L2 weight decay adds :math:`\lambda\theta` to :math:`g_t`. With update clipping every
    ``lr`` above (the decay's included) is multiplied by :func:`clip_scale`.
    """
    if torch.is_complex(param):
        param, grad, exp_avg, exp_avg_sq = (
            torch.view_as_real(x) for x in (param, grad, exp_avg, exp_avg_sq)
        )
        if max_exp_avg_sq is not None:
            max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
    step += 1
    t = float(step.item())
    g = -grad if h.maximize else grad
    if h.weight_decay != 0 and not h.decoupled_weight_decay:
        g = g.add(param, alpha=h.weight_decay)

    exp_avg.lerp_(g, 1 - h.beta1)
    exp_avg_sq.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    v = exp_avg_sq
    if h.amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq

    bc1 = F.bias_correction1(h.beta1, t)
    bc2 = F.bias_correction2(h.beta2, t)
    eps_t = F.eps_t(h.eps, h.beta2, t, h.eps_mode)
    scale = clip_scale(g, v, bc2, eps_t) if h.update_clipping else 1.0
    lr = h.lr * scale

    if h.weight_decay != 0 and h.decoupled_weight_decay:
        param.mul_(1 - lr * h.weight_decay)
    if h.eps_mode == "torch":
        denom = (v.sqrt() / math.sqrt(bc2)).add_(h.eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    else:  # TF1 AdamOptimizer / tf.keras / Keras 3, literally
        lr_t = lr * math.sqrt(bc2) / bc1
        param.addcdiv_(exp_avg, v.sqrt().add_(h.eps), value=-lr_t)
    return scale


@dataclass(frozen=True)
class Atan2Step:
    """Scalars of one AdamAtan2 step for one param group."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    a: float
    b: float
    maximize: bool


def atan2_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    h: Atan2Step,
) -> None:
    r"""One Adam-atan2 step (Everett et al. 2024) on one tensor.

    .. math::

        \theta_t = (1 - \mathrm{lr}\,\lambda)\,\theta_{t-1}
            - \mathrm{lr}\cdot a \cdot \operatorname{atan2}\big(\hat m_t,\; b\sqrt{\hat v_t}\big)

    with Adam's moments, :math:`\hat m = m/bc_1`, :math:`\hat v = v/bc_2`. No epsilon:
    ``atan2`` is bounded by :math:`\pi/2` and equals :math:`\hat m/(b\sqrt{\hat v})` to first
    order when :math:`|\hat m| \ll b\sqrt{\hat v}`.
    """
    if torch.is_complex(param):
        param, grad, exp_avg, exp_avg_sq = (
            torch.view_as_real(x) for x in (param, grad, exp_avg, exp_avg_sq)
        )
    step += 1
    t = float(step.item())
    g = -grad if h.maximize else grad
    if h.weight_decay != 0:
        param.mul_(1 - h.lr * h.weight_decay)
    exp_avg.lerp_(g, 1 - h.beta1)
    exp_avg_sq.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    m_hat = exp_avg / F.bias_correction1(h.beta1, t)
    v_hat = exp_avg_sq / F.bias_correction2(h.beta2, t)
    param.add_(torch.atan2(m_hat, h.b * v_hat.sqrt()), alpha=-h.lr * h.a)
