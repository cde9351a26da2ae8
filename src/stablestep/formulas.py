r"""The one definition of every optimizer quantity stablestep records, compares or acts on.

Pure functions, optax-style: floats / tensors and hyperparameters in, floats / tensors out,
no optimizer objects and no state. The optimizers (:mod:`stablestep.optim`), the optimizer
reader (:mod:`stablestep.optim.inspect`), the probes, the curvature code, the guard and the
diagnosis all call these; none of them writes one of these equations again.
``docs/architecture.md`` lists each quantity with the function that defines it.

``torch`` is not imported at module top: the scalar formulas (bias corrections, eps_t,
stability bounds, the largest stable lr) serve torch-free code such as the diagnosis of a
CSV. The tensor formulas work on anything with torch's tensor methods and import torch only
for ``finfo`` when they need it.

Notation (DESIGN.md): step :math:`t \ge 1` counts the steps applied *including* the current
one; :math:`b_1, b_2` the betas; :math:`v_t = b_2 v_{t-1} + (1-b_2) g_t^2` the raw second
moment (AMSGrad's running max where the optimizer divides by it);
:math:`\hat v_t = v_t / bc_2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

EPS_MODES = ("torch", "tf")


# --------------------------------------------------------------------------------------
# Bias corrections and epsilon conventions


def bias_correction1(beta1: float, step: float) -> float:
    r""":math:`bc_1 = 1 - b_1^t`, the first-moment bias correction at step ``t >= 1``."""
    return 1.0 - beta1**step


def bias_correction2(beta2: float, step: float) -> float:
    r""":math:`bc_2 = 1 - b_2^t`, the second-moment bias correction at step ``t >= 1``."""
    return 1.0 - beta2**step


def _check_mode(eps_mode: str) -> None:
    if eps_mode not in EPS_MODES:
        raise ValueError(f"Invalid eps_mode: {eps_mode!r} (expected 'torch' or 'tf')")


def eps_t(eps: float, beta2: float, step: float, eps_mode: str = "torch") -> float:
    r"""The epsilon added to :math:`\sqrt{\hat v_t}`, whatever convention ``eps`` was given in.

    Adam divides by :math:`\sqrt{\hat v_t} + \epsilon_t`. PyTorch / optax add ``eps`` there:
    :math:`\epsilon_t = \epsilon`. TF1 / tf.keras / Keras 3 write the step as
    :math:`\mathrm{lr}\frac{\sqrt{bc_2}}{bc_1}\frac{m_t}{\sqrt{v_t} + \hat\epsilon}`
    ("epsilon hat", Kingma & Ba 2015 sec. 2, last paragraph), which is the same step with

    .. math:: \epsilon_t = \hat\epsilon / \sqrt{1 - b_2^t},

    about :math:`\hat\epsilon/\sqrt{(1-b_2)t}` early on (31.6x ``eps`` at step 1 for
    :math:`b_2 = 0.999`), tending to :math:`\hat\epsilon` late.
    """
    _check_mode(eps_mode)
    if eps_mode == "torch":
        return eps
    return eps / math.sqrt(bias_correction2(beta2, step))


def eps_in_mode(eps_t_value: float, beta2: float, step: float, eps_mode: str) -> float:
    r"""The ``eps`` hyperparameter that gives :math:`\epsilon_t` = ``eps_t_value`` at ``step``.

    Inverse of :func:`eps_t`: ``eps_t_value`` itself for ``"torch"``,
    :math:`\epsilon_t\sqrt{1-b_2^t}` for ``"tf"``.
    """
    _check_mode(eps_mode)
    if eps_mode == "torch":
        return eps_t_value
    return eps_t_value * math.sqrt(bias_correction2(beta2, step))


def step_size(lr: float, beta1: float, step: float) -> float:
    r""":math:`\alpha_t = \mathrm{lr} / bc_1`, the scalar factor of Adam's step on :math:`m_t`."""
    return lr / bias_correction1(beta1, step)


def _sqrt(x: Any) -> Any:
    return x.sqrt() if hasattr(x, "sqrt") else math.sqrt(x)


def effective_step(
    v: Any, *, lr: float, beta1: float, beta2: float, eps: float, step: float,
    eps_mode: str = "torch",
) -> Any:
    r"""Adam's per-coordinate step, the diagonal of :math:`P_t^{-1}`, applied to :math:`m_t`.

    .. math::

        d_t = \frac{\mathrm{lr}/bc_1}{\sqrt{v_t/bc_2} + \epsilon_t}
            \quad\Big(= \mathrm{lr}\frac{\sqrt{bc_2}}{bc_1}\frac{1}{\sqrt{v_t}+\hat\epsilon}
            \text{ in the TF convention}\Big),

    so that Adam's update is :math:`\theta_{t+1} = \theta_t - d_t \odot m_t` (before weight
    decay). ``v`` is the raw second moment the optimizer divides by (``max_exp_avg_sq`` under
    AMSGrad), a tensor or a float; ``eps`` is given in ``eps_mode``'s convention
    (:func:`eps_t`). Returns the same kind as ``v``.
    """
    bc2 = bias_correction2(beta2, step)
    return step_size(lr, beta1, step) / (_sqrt(v / bc2) + eps_t(eps, beta2, step, eps_mode))


# --------------------------------------------------------------------------------------
# StableAdamW's ratio g^2 / v_hat


def g2v_floor(eps_t_value: float, dtype: Any = None) -> float:
    r"""The floor under :math:`\hat v_t` in :func:`g2v_ratio`, :math:`\max(\epsilon_t^2, tiny)`.

    ``tiny`` is the smallest normal number of ``dtype`` (a torch dtype; 0 when ``None``),
    so that ``g = v = 0`` gives a ratio of 0, not NaN, when ``eps = 0``.
    """
    tiny = 0.0
    if dtype is not None:
        import torch

        tiny = torch.finfo(dtype).tiny
    return max(eps_t_value * eps_t_value, tiny)


def g2v_ratio(g: Any, v: Any, bc2: float, eps_t_value: float) -> Any:
    r"""StableAdamW's per-coordinate ratio :math:`g_t^2 / \max(\hat v_t, \epsilon_t^2)` (a tensor).

    The definition is the one of Wortsman et al. 2023 ("Stable and low-precision training
    for large-scale vision-language models", Algorithm 2, StableAdamW):

    .. math::

        r_t = \frac{g_t^2}{\max(\hat v_t,\ \epsilon_t^2)},\qquad
        \hat v_t = \frac{b_2 v_{t-1} + (1-b_2) g_t^2}{1 - b_2^t}.

    * :math:`\hat v_t` is the **current** step's second moment, which already contains
      :math:`g_t` (the paper updates :math:`v_t` before computing the RMS). This makes the
      ratio bounded, :math:`r_t \le 1/(1-b_2)` up to bias correction, and it is the moment
      the update divides by, so the ratio says how far *this* update's denominator
      under-estimates *this* gradient. The previous step's :math:`\hat v_{t-1}` (what a guard
      sees before ``step()``) is not the paper's quantity and is unbounded; callers that only
      have :math:`v_{t-1}` form :math:`v_t` first (:func:`second_moment_update`).
    * :math:`\epsilon_t` is the PyTorch-convention epsilon (:func:`eps_t`), so both
      conventions floor the same denominator Adam uses; the floor is at least the dtype's
      smallest normal number (:func:`g2v_floor`).
    * ``v`` is the raw second moment the optimizer divides by (AMSGrad's running max under
      ``amsgrad``), ``bc2`` = :func:`bias_correction2`; ``g`` is the gradient that entered
      ``v`` (including L2 weight decay; its sign does not matter).
    """
    floor = g2v_floor(eps_t_value, getattr(v, "dtype", None))
    return g.square() / (v / bc2).clamp_min(floor)


def g2v_rms(g: Any, v: Any, bc2: float, eps_t_value: float) -> float:
    r""":math:`\mathrm{RMS}_t = \sqrt{\operatorname{mean}(r_t)}` of :func:`g2v_ratio` (a float).

    StableAdamW scales the step by :func:`update_clip_scale` of it. Note that the RMS is the
    square root of the *mean of the ratio*: the ratio is already a squared quantity (not
    :math:`\sqrt{\operatorname{mean}(r_t^2)}`). 0 for an empty tensor.
    """
    if g.numel() == 0:
        return 0.0
    return math.sqrt(max(float(g2v_ratio(g, v, bc2, eps_t_value).mean()), 0.0))


def second_moment_update(v_prev: Any, g: Any, beta2: float) -> Any:
    r""":math:`v_t = b_2 v_{t-1} + (1-b_2) g_t^2` (a new tensor; ``v_prev`` is not modified)."""
    return v_prev * beta2 + g.square() * (1.0 - beta2)


def g2v_rms_before_step(
    g: Any, v_prev: Any, *, beta2: float, eps: float, step: float, eps_mode: str = "torch",
    max_v_prev: Any = None,
) -> float:
    r""":func:`g2v_rms` of the step about to be taken, from the state before it.

    What a guard or a probe that runs before ``optimizer.step()`` should compute: it sees
    :math:`v_{t-1}` (``exp_avg_sq``) and the new gradient :math:`g_t`, forms
    :math:`v_t` (:func:`second_moment_update`; under AMSGrad
    :math:`\max(\text{max\_v}_{t-1}, v_t)`, pass ``max_v_prev``) and evaluates the ratio
    at ``step`` :math:`= t` (the optimizer's step count plus one), with
    :math:`\epsilon_t` from ``eps`` in ``eps_mode``. Equal to the RMS that
    ``update_clipping`` applies at that step.
    """
    v = second_moment_update(v_prev, g, beta2)
    if max_v_prev is not None:
        v = v.maximum(max_v_prev)
    return g2v_rms(g, v, bias_correction2(beta2, step), eps_t(eps, beta2, step, eps_mode))


def update_clip_scale(rms: float) -> float:
    r"""StableAdamW's learning-rate factor :math:`1/\max(1, \mathrm{RMS}_t)`."""
    return 1.0 / max(1.0, rms)


# --------------------------------------------------------------------------------------
# Stability bounds of the linearised iteration


def gd_threshold() -> float:
    r"""Gradient descent on a quadratic is stable iff :math:`\mathrm{lr}\,\lambda < 2`."""
    return 2.0


def heavy_ball_threshold(momentum: float, dampening: float = 0.0) -> float:
    r"""Bound on :math:`a = \mathrm{lr}\,\lambda` for torch's SGD with (heavy-ball) momentum.

    ``buf = mu*buf + (1-d)*g``, ``x -= lr*buf`` gives on :math:`f = \lambda x^2/2`
    :math:`x_{t+1} = (1+\mu-(1-d)a)\,x_t - \mu x_{t-1}`, stable iff both roots of
    :math:`z^2 - (1+\mu-(1-d)a)z + \mu` lie in the unit disc (Jury: :math:`|\mu|<1`,
    :math:`(1-d)a > 0`, :math:`2+2\mu-(1-d)a > 0`):

    .. math:: a < \frac{2 + 2\mu}{1 - d}

    (Polyak 1964; Goh 2017 "Why momentum really works"). ``momentum = 0`` gives 2
    whatever the dampening (torch ignores dampening then); ``d = 1`` never moves: inf.
    """
    if momentum == 0.0:
        return gd_threshold()
    if dampening >= 1.0:
        return math.inf
    return (2.0 + 2.0 * momentum) / (1.0 - dampening)


def nesterov_threshold(momentum: float, dampening: float = 0.0) -> float:
    r"""Bound on :math:`a = \mathrm{lr}\,\lambda` for torch's SGD with ``nesterov=True``.

    ``buf = mu*buf + (1-d)*g``, ``x -= lr*(g + mu*buf)``. On :math:`f = \lambda x^2/2` the
    state :math:`(x_t, b_{t-1})` evolves by
    :math:`\begin{pmatrix}1-a(1+\mu(1-d)) & -\mathrm{lr}\,\mu^2\\ (1-d)\lambda & \mu\end{pmatrix}`,
    trace :math:`1+\mu-a(1+\mu(1-d))`, determinant :math:`\mu(1-a)`; Jury's condition
    :math:`1 + \mathrm{tr} + \det > 0` binds:

    .. math:: a < \frac{2 + 2\mu}{1 + (2-d)\mu},

    :math:`(2+2\mu)/(1+2\mu)` for torch (which requires :math:`d = 0`): 1.357 for
    :math:`\mu = 0.9`, far below heavy ball's 3.8 (Sutskever et al. 2013 form of NAG; the
    same bound appears for NAG on quadratics, e.g. Lessard, Recht & Packard 2016).
    The other conditions, :math:`|\mu(1-a)| < 1` and :math:`a > 0`, hold below it for
    :math:`0 \le \mu < 1`.
    """
    if momentum == 0.0:
        return gd_threshold()
    return (2.0 + 2.0 * momentum) / (1.0 + (2.0 - dampening) * momentum)


def sgd_threshold(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    r"""Bound on :math:`\mathrm{lr}\,\lambda_{\max}(H)` for ``torch.optim.SGD`` with these settings.

    :func:`gd_threshold`, :func:`heavy_ball_threshold` or :func:`nesterov_threshold`.
    """
    if momentum == 0.0:
        return gd_threshold()
    if nesterov:
        return nesterov_threshold(momentum, dampening)
    return heavy_ball_threshold(momentum, dampening)


def adam_threshold(beta1: float) -> float:
    r"""Bound on :math:`\lambda_{\max}(P^{-1}H)` for the Adam family (adaptive edge of stability).

    With the preconditioner frozen, Adam is heavy ball with :math:`\mu = b_1` and dampening
    :math:`d = b_1` (``m = b1*m + (1-b1)*g``, ``x -= P^{-1} m``), along each eigenvector of
    :math:`P^{-1}H` with eigenvalue :math:`a`, so (:func:`heavy_ball_threshold`)

    .. math:: a < \frac{2 + 2b_1}{1 - b_1},

    38 for :math:`b_1 = 0.9` (Cohen et al. 2022, "Adaptive gradient methods at the edge of
    stability"). :math:`P^{-1}` is :func:`effective_step` (which includes :math:`1/bc_1`).
    """
    return heavy_ball_threshold(beta1, beta1)


def threshold(
    kind: str, *, beta1: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
    nesterov: bool = False,
) -> float:
    r"""The stability bound for an optimizer ``kind`` (``"adam"`` or ``"sgd"``).

    ``"adam"``: :func:`adam_threshold` on :math:`\lambda_{\max}(P^{-1}H)`; ``"sgd"``:
    :func:`sgd_threshold` on :math:`\mathrm{lr}\,\lambda_{\max}(H)`. Raises ``ValueError``
    for any other kind.
    """
    if kind == "adam":
        return adam_threshold(beta1)
    if kind == "sgd":
        return sgd_threshold(momentum, dampening, nesterov)
    raise ValueError(f"no stability bound for optimizer kind {kind!r} (expected 'adam' or 'sgd')")


def max_stable_lr(lr: float, precond_sharpness: float, bound: float) -> float:
    r"""The largest stable learning rate given a curvature measured at learning rate ``lr``.

    :math:`P^{-1}` is proportional to the learning rate (Adam: :func:`effective_step`; SGD:
    :math:`\mathrm{lr}`), so at frozen optimizer state :math:`\lambda_{\max}(P^{-1}H)` scales
    linearly with lr and the bound :math:`\lambda_{\max}(P^{-1}H) < T` gives

    .. math:: \mathrm{lr}_{\max} = \mathrm{lr}\; T / \lambda_{\max}(P^{-1}H)

    (for SGD, :math:`T/\lambda_{\max}(H)`: pass ``precond_sharpness = lr * sharpness``).
    ``inf`` when the curvature is not positive.
    """
    if not precond_sharpness > 0:
        return math.inf
    return lr * bound / precond_sharpness


def min_stable_eps_t(lr: float, beta1: float, step: float, sharpness: float) -> float:
    r"""The smallest :math:`\epsilon_t` that keeps an epsilon-dominated Adam step stable.

    Where :math:`\sqrt{\hat v} \ll \epsilon_t`, :func:`effective_step` is
    :math:`\mathrm{lr}/(bc_1\epsilon_t)` and the bound :func:`adam_threshold` on
    :math:`\lambda_{\max}(P^{-1}H)` reads
    :math:`\epsilon_t > \mathrm{lr}\,\lambda_{\max}(H)\,/\,(bc_1\,T)`. Convert to the ``eps``
    hyperparameter of a convention with :func:`eps_in_mode`.
    """
    return step_size(lr, beta1, step) * sharpness / adam_threshold(beta1)


# --------------------------------------------------------------------------------------
# Secant ("free") curvature along the update


def _pairs(x: Any) -> list:
    return list(x) if isinstance(x, Sequence) else [x]


def secant_curvature(u: Any, dg: Any, d: Any) -> float:
    r"""Curvature of :math:`P^{-1}H` along the update, from two gradients and no HVP.

    With :math:`u = \theta_{t+1} - \theta_t`, :math:`\Delta g = g_{t+1} - g_t` (same batch,
    or a full batch, so that :math:`\Delta g \approx H u`) and the preconditioner
    :math:`P = \operatorname{diag}(1/d)` that produced :math:`u`:

    .. math::

        q_t = \frac{u\cdot\Delta g}{u^\top P u}
            = \frac{u\cdot\Delta g}{\sum_i u_i^2 / d_i},

    the Rayleigh quotient of the generalised problem :math:`Hx = aPx`, whose eigenvalues are
    those of :math:`P^{-1}H`; it is exact on a quadratic when :math:`u` is an eigenvector and
    never exceeds :math:`\lambda_{\max}(P^{-1}H)` there. For Adam
    :math:`d = \alpha_t/(\sqrt{\hat v_t}+\epsilon_t)` (:func:`effective_step`, with
    :math:`\alpha_t = \mathrm{lr}/bc_1`), compared with :func:`adam_threshold`; for SGD
    :math:`d = \mathrm{lr}` (a float) and :math:`q_t = \mathrm{lr}\,u\cdot\Delta g/|u|^2`,
    compared with :func:`sgd_threshold`. DESIGN.md, "Free curvature".

    ``u``, ``dg``, ``d``: tensors, or equal-length sequences of tensors (one per parameter;
    ``d`` entries may be floats). Coordinates with :math:`d_i \le 0` (not moved) are left
    out. Returns NaN when the update is zero.
    """
    num = 0.0
    den = 0.0
    for ui, gi, di in zip(_pairs(u), _pairs(dg), _pairs(d), strict=True):
        num += float((ui * gi).sum())
        if isinstance(di, (int, float)):
            den += float(ui.square().sum()) / di if di > 0 else 0.0
        else:
            q = ui.square() / di
            den += float(q.where(di > 0, q.new_zeros(())).sum())
    return num / den if den > 0 else math.nan
