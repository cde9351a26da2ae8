"""The stability thresholds, checked by experiment with torch.optim on quadratics.

For each optimizer the lr is set so that our measured lam_max(P^-1 H) is 3% below or 3%
above stability_threshold(optimizer); the real optimizer must then converge, or diverge.
"""

from __future__ import annotations

import pytest
import torch

from stablestep.curvature import max_stable_lr, preconditioned_sharpness, stability_threshold
from tests.curvature.helpers import textbook_threshold
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

DIM = 6


def _quadratic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    evals = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.1, 0.05], dtype=torch.float64)
    a = q @ torch.diag(evals) @ q.T
    theta = torch.nn.Parameter(1e-6 * torch.randn(DIM, generator=g, dtype=torch.float64))

    def loss_fn():
        return 0.5 * theta @ a @ theta

    return theta, loss_fn


def _run(opt, theta, loss_fn, steps):
    """Final and largest ||theta_t|| / ||theta_0|| over ``steps`` steps."""
    n0 = theta.detach().norm().item()
    peak = 1.0
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        peak = max(peak, theta.detach().norm().item() / n0)
        if peak > 1e4:  # diverged (Adam would later re-stabilise by inflating v)
            break
    return theta.detach().norm().item() / n0, peak


def _set_lr(opt, theta, loss_fn, factor):
    """Scale lr so that lam_max(P^-1 H) = factor * threshold (P^-1 is proportional to lr)."""
    lam = preconditioned_sharpness(loss_fn, opt, tol=1e-8)
    thr = stability_threshold(opt)
    for g in opt.param_groups:
        g["lr"] *= factor * thr / lam
    return thr


# heavy ball and Nesterov at mu = 0.9 are rows of the table (test at the end of the file)
SGD_CASES = {
    "gd": (dict(momentum=0.0), 2.0),
    "heavy-ball-dampened": (dict(momentum=0.5, dampening=0.5), 6.0),
}


@pytest.mark.parametrize("name", sorted(SGD_CASES))
@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_sgd_threshold_by_experiment(name, factor):
    kw, expected = SGD_CASES[name]
    theta, loss_fn = _quadratic()
    opt = torch.optim.SGD([theta], lr=1.0, **kw)
    assert _set_lr(opt, theta, loss_fn, factor) == pytest.approx(expected)
    final, peak = _run(opt, theta, loss_fn, 1000)
    if factor < 1:
        assert final < 1e-2
    else:
        assert peak > 1e4


def _frozen_adam(theta, loss_fn, *, b1, amsgrad):
    """torch Adam whose preconditioner is frozen: a huge (max_)exp_avg_sq that the tiny
    gradients of the quadratic never change, at a step count where bias corrections are 1."""
    opt = torch.optim.Adam([theta], lr=1.0, betas=(b1, 0.99), amsgrad=amsgrad, eps=1e-8)
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    with torch.no_grad():
        theta.copy_(1e-6 * torch.linspace(-1, 1, DIM, dtype=torch.float64))
    st = opt.state[theta]
    v = torch.linspace(1.0, 30.0, DIM, dtype=torch.float64) ** 2  # non-uniform P
    st["exp_avg"].zero_()
    st["exp_avg_sq"].copy_(v)
    if amsgrad:
        st["max_exp_avg_sq"].copy_(v)
    else:
        opt.param_groups[0]["betas"] = (b1, 1.0 - 1e-7)  # v decays by < 0.1% over the run
    st["step"].fill_(5e8)
    return opt


# b1 = 0.9 with and without AMSGrad are rows of the table (test at the end of the file)
@pytest.mark.parametrize("b1,amsgrad", [(0.5, True), (0.5, False)])
@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_adam_threshold_by_experiment(b1, amsgrad, factor):
    theta, loss_fn = _quadratic(seed=1)
    opt = _frozen_adam(theta, loss_fn, b1=b1, amsgrad=amsgrad)
    thr = _set_lr(opt, theta, loss_fn, factor)
    assert thr == pytest.approx((2 + 2 * b1) / (1 - b1))
    final, peak = _run(opt, theta, loss_fn, 1000)
    if factor < 1:
        assert final < 1e-2
    else:
        assert peak > 1e4


def test_max_stable_lr_on_a_quadratic_is_2_over_lam():
    theta, loss_fn = _quadratic()
    opt = torch.optim.SGD([theta], lr=4.6)
    ans = max_stable_lr(loss_fn, opt)
    assert ans.max_lr == pytest.approx(2.0, rel=1e-3)  # lam_max = 1
    assert ans.ratio == pytest.approx(2.3, rel=1e-3)
    assert not ans.stable
    assert ans.message.startswith("your lr 4.6 is 2.3x above the largest stable lr 2 ")


def test_threshold_rejects_unknown_optimizer():
    theta, _ = _quadratic()
    with pytest.raises(ValueError, match="unsupported optimizer"):
        stability_threshold(torch.optim.Adagrad([theta]))


# ------------------------------------------------------------ over the table of optimizers


def _frozen_row(info, theta, loss_fn):
    """The row's optimizer; for the Adam family with a frozen, non-uniform preconditioner
    (as _frozen_adam): v far above the quadratic's tiny gradients, beta2 -> 1, a step count
    where the bias corrections are 1 (AdamAtan2's atan2 is then linear: |m_hat| << sqrt(v))."""
    opt = info([theta], lr=1.0)
    if info.kind != "adam":
        return opt
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    with torch.no_grad():
        theta.copy_(1e-6 * torch.linspace(-1, 1, DIM, dtype=torch.float64))
    st = opt.state[theta]
    v = torch.linspace(1.0, 30.0, DIM, dtype=torch.float64) ** 2
    st["exp_avg"].zero_()
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        if key in st:
            st[key].copy_(v)
    group = opt.param_groups[0]
    group["betas"] = (group["betas"][0], 1.0 - 1e-7)
    if torch.is_tensor(st["step"]):
        st["step"].fill_(5e8)
    else:
        st["step"] = 5e8
    return opt


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_every_row_threshold_is_the_textbook_one_and_holds(info, factor):
    """stability_threshold(row) equals the textbook bound, and the row's own optimizer,
    run at 3% below / above it on a quadratic, converges / diverges."""
    theta, loss_fn = _quadratic(seed=1)
    opt = _frozen_row(info, theta, loss_fn)
    thr = _set_lr(opt, theta, loss_fn, factor)
    assert thr == pytest.approx(textbook_threshold(info, opt.param_groups[0]))
    final, peak = _run(opt, theta, loss_fn, 1000)
    if factor < 1:
        assert final < 1e-2
    else:
        assert peak > 1e4
