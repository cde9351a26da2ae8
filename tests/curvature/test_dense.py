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
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

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


# Cases beyond the table's rows (tests/optim_table.py): decoupled weight decay, and the TF
# convention declared through a torch param group (a Keras-trained state read by torch).
EXTRA = {
    "adamw-decay": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "tf-group": lambda ps: torch.optim.Adam([{"params": ps, "eps_mode": "tf"}], lr=1e-2, eps=1e-3),
}


@pytest.mark.parametrize("opt_name", sorted(EXTRA))
def test_preconditioned_sharpness_within_half_percent(opt_name):
    model, loss_fn, xy = make_problem("cnn", seed=1)
    opt = EXTRA[opt_name](list(model.parameters()))
    _adam_state(model, loss_fn, opt)
    H = dense_for("cnn", model, xy)
    group = opt.param_groups[0]
    D = torch.cat([_torch_adam_D(opt, group, p, tf_eps=opt_name == "tf-group").reshape(-1)
                   for p in model.parameters()])
    # reference: eigenvalues of the non-symmetric P^-1 H = D H directly
    exact = torch.linalg.eigvals(D[:, None] * H).real.max().item()
    est = preconditioned_sharpness(loss_fn, opt)
    assert abs(est - exact) <= 5e-3 * abs(exact)


def _actual_D(info, model, loss_fn, opt):
    """One more step; D = -(theta_t - theta_{t-1}) / direction: the diagonal preconditioner
    read off the step the optimizer took (the rows have no weight decay)."""
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    out = []
    for p, b in zip(params, before, strict=True):
        d = info.direction(opt, p, p.grad)
        assert bool((d != 0).all())
        out.append((-(p.detach() - b) / d).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_preconditioned_sharpness_of_every_row_is_the_dense_eigenvalue(info):
    """lam_max(P^-1 H) = lam_max(D^1/2 H D^1/2) (eigvalsh of the exact dense Hessian), with D
    read off the optimizer's actual step: torch's and stablestep's Adam/AdamW, the TF
    convention on the optimizer that runs it, AMSGrad, StableAdamW, AdamAtan2, SGD."""
    model, loss_fn, xy = make_problem("cnn", seed=1)
    opt = info(list(model.parameters()))
    _adam_state(model, loss_fn, opt, steps=4)
    D = _actual_D(info, model, loss_fn, opt)
    assert bool((D > 0).all())
    H = dense_for("cnn", model, xy)
    r = D.sqrt()
    exact = torch.linalg.eigvalsh(r[:, None] * H * r[None, :])[-1].item()
    assert preconditioned_sharpness(loss_fn, opt) == pytest.approx(exact, rel=5e-3)


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_preconditioner_is_the_optimizers_own_step(info):
    """preconditioner_diag(opt) * direction equals the step the optimizer actually takes,
    for every row (its D is the one lam_max(P^-1 H) uses)."""
    model, loss_fn, _ = make_problem("mlp", seed=2)
    opt = info(list(model.parameters()))
    _adam_state(model, loss_fn, opt, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    D = preconditioner_diag(opt, list(model.parameters()))
    for p, p0, d in zip(model.parameters(), before, D, strict=True):
        torch.testing.assert_close(-d * info.direction(opt, p, p.grad), p.detach() - p0,
                                   rtol=1e-7, atol=1e-12)
