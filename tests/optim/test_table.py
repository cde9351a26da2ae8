"""Generic optimizer tests over the table of optimizers under test (tests/optim_table.py).

For every row: the library reads it (kind, epsilon convention, stability bound), its
effective step is its actual update in the convention it runs (the TF row on the optimizer
that runs TF's convention), and save -> load -> continue is identical.
"""

from __future__ import annotations

import io

import pytest
import torch

from stablestep import formulas as F
from stablestep.curvature.stability import stability_threshold
from stablestep.optim import inspect
from tests.optim.conftest import grad_sequence, make_params, run
from tests.optim_table import OPTIMIZERS, by_name

SPIKE = 5


def _last_update(opt, params, grads):
    run(opt, params, grads[:-1])
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads[-1], strict=True):
        p.grad = g.clone()
    opt.step()
    return [p.detach() - b for b, p in zip(before, params, strict=True)]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
def test_the_library_reads_the_row(info):
    params = make_params()
    opt = info(params)
    h = inspect.group_hyper(opt, opt.param_groups[0])
    assert h.kind == info.kind
    if info.eps_mode is not None:
        assert h.eps_mode == info.eps_mode
    expected = F.threshold(info.kind, beta1=h.beta1, momentum=h.momentum,
                           dampening=h.dampening, nesterov=h.nesterov)
    assert stability_threshold(opt) == expected


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
def test_effective_step_is_the_actual_update(info):
    """theta_t - theta_{t-1} = -D * direction, D = inspect.effective_step, after a 100x
    gradient spike (update clipping, AMSGrad's max and the eps convention all engaged)."""
    params = make_params()
    opt = info(params)
    grads = grad_sequence(params, SPIKE + 1, spike_at=SPIKE)
    deltas = _last_update(opt, params, grads)
    for p, d, g in zip(params, deltas, grads[-1], strict=True):
        eff = inspect.effective_step(opt, p)
        torch.testing.assert_close(-eff * info.direction(opt, p, g), d, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.eps_mode is not None
                                  and i.kind == "adam"], ids=repr)
def test_the_running_convention_is_the_one_that_fits(info):
    """formulas.effective_step in the row's convention gives its update; the other
    convention does not (eps = 1e-2 makes them differ early)."""
    params = make_params()
    opt = info(params)
    grads = grad_sequence(params, 3)
    deltas = _last_update(opt, params, grads)
    g = opt.param_groups[0]
    other = "tf" if info.eps_mode == "torch" else "torch"
    for p, d in zip(params, deltas, strict=True):
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
        kw = dict(lr=g["lr"] * float(st.get("update_scale", 1.0)), beta1=g["betas"][0],
                  beta2=g["betas"][1], eps=g["eps"], step=float(st["step"]))
        fits = F.effective_step(v, eps_mode=info.eps_mode, **kw) * st["exp_avg"]
        torch.testing.assert_close(-fits, d, rtol=1e-10, atol=1e-15)
        wrong = F.effective_step(v, eps_mode=other, **kw) * st["exp_avg"]
        assert not torch.allclose(-wrong, d, rtol=1e-3, atol=0)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=repr)
def test_save_load_continue_identically(info):
    grads = grad_sequence(make_params(), 12, spike_at=4)
    pa = make_params()
    a = info(pa)
    run(a, pa, grads[:6])
    saved_params = _roundtrip([p.detach().clone() for p in pa])
    saved_opt = _roundtrip(a.state_dict())
    run(a, pa, grads[6:])
    pb = [p.clone().requires_grad_() for p in saved_params]
    b = info(pb)
    b.load_state_dict(saved_opt)
    run(b, pb, grads[6:])
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        for key, value in a.state[x].items():
            other = b.state[y][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_by_name():
    assert by_name("Adam-tf").eps_mode == "tf"
    with pytest.raises(KeyError, match="Adam-tf"):
        by_name("Lion")
