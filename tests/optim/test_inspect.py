"""inspect.effective_step is the diagonal D with theta_t - theta_{t-1} = -D m_t, for ours in
both eps modes (with AMSGrad and update clipping) and for AdamAtan2 and torch's Adam."""

import pytest
import torch

from stablestep.optim import Adam, AdamAtan2, inspect
from tests.optim.conftest import grad_sequence, make_params

SPIKE = 5


def _last_update(opt, params, grads):
    for gs in grads[:-1]:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads[-1], strict=True):
        p.grad = g.clone()
    opt.step()
    return [b - p.detach() for b, p in zip(before, params, strict=True)]


@pytest.mark.parametrize("eps_mode", ["torch", "tf"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_effective_step_is_the_actual_update(eps_mode, amsgrad, clip):
    params = make_params()
    opt = Adam(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-2, eps_mode=eps_mode, amsgrad=amsgrad,
               update_clipping=clip)
    grads = grad_sequence(params, SPIKE + 1, spike_at=SPIKE)
    deltas = _last_update(opt, params, grads)
    if clip:
        assert min(opt.state[p]["update_scale"] for p in params) < 0.5
    for p, d in zip(params, deltas, strict=True):
        eff = inspect.effective_step(opt, p)
        torch.testing.assert_close(eff * opt.state[p]["exp_avg"], d, rtol=1e-10, atol=1e-15)


def test_effective_step_torch_adam_and_tf_mode_differ_early():
    """The generic formula also holds for torch.optim.Adam; TF's eps is larger at t=1."""
    params = make_params()
    opt = torch.optim.Adam(params, lr=1e-2, eps=1e-2)
    deltas = _last_update(opt, params, grad_sequence(params, 3))
    for p, d in zip(params, deltas, strict=True):
        eff = inspect.effective_step(opt, p)
        torch.testing.assert_close(eff * opt.state[p]["exp_avg"], d, rtol=1e-10, atol=1e-15)
    h = inspect.group_hyper(Adam(make_params(), eps=1e-2, eps_mode="tf"), {"betas": (0.9, 0.999),
                            "lr": 1e-2, "eps": 1e-2, "eps_mode": "tf"})
    assert inspect.epsilon_t(h, 1) == pytest.approx(1e-2 / 0.001**0.5)


def test_adam_atan2_effective_step_is_the_actual_update():
    params = make_params()
    opt = AdamAtan2(params, lr=1e-2, b=0.7)
    grads = grad_sequence(params, SPIKE + 1, spike_at=SPIKE)
    deltas = _last_update(opt, params, grads)
    for p, d in zip(params, deltas, strict=True):
        eff = inspect.effective_step(opt, p)
        assert torch.all(eff > 0)
        torch.testing.assert_close(eff * opt.state[p]["exp_avg"], d, rtol=1e-10, atol=1e-15)
    h = inspect.group_hyper(opt, opt.param_groups[0])
    assert h.kind == "adam" and h.eps_mode == "none" and h.decoupled_weight_decay


def test_effective_step_none_before_first_step():
    params = make_params()
    assert inspect.effective_step(Adam(params), params[0]) is None
    assert inspect.effective_step(AdamAtan2(params), params[0]) is None
