"""lam_max(H) and lam_max(P^-1 H) against the exact dense Hessian (torch.autograd.functional)."""

from __future__ import annotations

import math

import pytest
import torch

from stablestep.curvature import (
    HessianOperator,
    hvp,
    preconditioned_sharpness,
    preconditioner_diag,
    sharpness,
    top_eigen,
)
from stablestep.curvature.lanczos import LanczosConfig
from tests.curvature.helpers import dense_for, make_problem

KINDS = ["mlp", "cnn", "attention"]


@pytest.fixture(scope="module", params=KINDS)
def problem(request):
    torch.set_num_threads(1)
    model, loss_fn, xy = make_problem(request.param)
    return model, loss_fn, dense_for(request.param, model, xy)


def test_hvp_matches_dense(problem):
    model, loss_fn, H = problem
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = hvp(loss_fn, params, v)
    flat = HessianOperator.flatten
    torch.testing.assert_close(flat(hv), H @ flat(v), rtol=1e-9, atol=1e-11)


def test_sharpness_within_half_percent(problem):
    model, loss_fn, H = problem
    exact = torch.linalg.eigvalsh(H)[-1].item()
    est = sharpness(loss_fn, model.parameters())
    assert abs(est - exact) <= 5e-3 * abs(exact)


def test_top_k_eigenvalues_and_vector(problem):
    model, loss_fn, H = problem
    evals, evecs = torch.linalg.eigh(H)
    res = top_eigen(loss_fn, list(model.parameters()), config=LanczosConfig(tol=1e-6, k=3))
    for i in range(3):
        assert res.eigenvalues[i] == pytest.approx(evals[-1 - i].item(), rel=1e-4)
    cos = abs(float(res.vectors[0] @ evecs[:, -1]))
    assert cos > 0.999


def _adam_state(model, loss_fn, opt, steps=5):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def _torch_adam_D(opt, group, p, *, tf_eps=False):
    """diag(P^-1) written from torch.optim.Adam's documented update (independent of inspect)."""
    st = opt.state[p]
    t = int(st["step"])
    b1, b2 = group["betas"]
    v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
    eps = group["eps"] / math.sqrt(1 - b2**t) if tf_eps else group["eps"]
    return group["lr"] / (1 - b1**t) / ((v / (1 - b2**t)).sqrt() + eps)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "big-eps": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-3),
    "tf-group": lambda ps: torch.optim.Adam([{"params": ps, "eps_mode": "tf"}], lr=1e-2, eps=1e-3),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_preconditioned_sharpness_within_half_percent(opt_name):
    model, loss_fn, xy = make_problem("cnn", seed=1)
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    _adam_state(model, loss_fn, opt)
    H = dense_for("cnn", model, xy)
    group = opt.param_groups[0]
    if opt_name == "sgd":
        D = torch.full((H.shape[0],), group["lr"], dtype=H.dtype)
    else:
        D = torch.cat([_torch_adam_D(opt, group, p, tf_eps=opt_name == "tf-group").reshape(-1)
                       for p in model.parameters()])
    # reference: eigenvalues of the non-symmetric P^-1 H = D H directly
    exact = torch.linalg.eigvals(D[:, None] * H).real.max().item()
    est = preconditioned_sharpness(loss_fn, opt)
    assert abs(est - exact) <= 5e-3 * abs(exact)


def _stablestep_tf_adam(ps):
    from stablestep import Adam

    return Adam(ps, lr=1e-2, eps=1e-3, eps_mode="tf")


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "amsgrad", "stablestep-tf"])
def test_preconditioner_is_the_optimizers_own_step(opt_name):
    """D * exp_avg equals the step the optimizer actually takes (decoupled decay removed):
    torch.optim's, and stablestep.Adam's in the TensorFlow epsilon convention."""
    model, loss_fn, _ = make_problem("mlp", seed=2)
    make = _stablestep_tf_adam if opt_name == "stablestep-tf" else OPTIMIZERS[opt_name]
    opt = make(list(model.parameters()))
    _adam_state(model, loss_fn, opt, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    D = preconditioner_diag(opt, list(model.parameters()))
    group = opt.param_groups[0]
    for p, p0, d in zip(model.parameters(), before, D, strict=True):
        step = p.detach() - p0
        if opt_name == "adamw":
            step = step + group["lr"] * group["weight_decay"] * p0
        torch.testing.assert_close(-d * opt.state[p]["exp_avg"], step, rtol=1e-7, atol=1e-12)


def test_stablestep_adam_tf_mode():
    from stablestep import Adam

    model, loss_fn, xy = make_problem("cnn", seed=1)
    opt = Adam(model.parameters(), lr=1e-2, eps=1e-3, eps_mode="tf")
    _adam_state(model, loss_fn, opt)
    H = dense_for("cnn", model, xy)
    group = opt.param_groups[0]
    D = torch.cat([_torch_adam_D(opt, group, p, tf_eps=True).reshape(-1)
                   for p in model.parameters()])
    exact = torch.linalg.eigvals(D[:, None] * H).real.max().item()
    assert preconditioned_sharpness(loss_fn, opt) == pytest.approx(exact, rel=5e-3)


def test_adam_atan2_uses_its_own_effective_step():
    from stablestep.optim import AdamAtan2

    model, loss_fn, xy = make_problem("mlp", seed=1)
    opt = AdamAtan2(model.parameters(), lr=1e-2)
    _adam_state(model, loss_fn, opt)
    H = dense_for("mlp", model, xy)
    D = torch.cat([opt.effective_step(p).reshape(-1) for p in model.parameters()])
    exact = torch.linalg.eigvals(D[:, None] * H).real.max().item()
    assert preconditioned_sharpness(loss_fn, opt) == pytest.approx(exact, rel=5e-3)
