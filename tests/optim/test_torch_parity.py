"""eps_mode="torch" equals torch.optim.Adam / AdamW (params and state, 20 float64 steps)."""

import itertools

import pytest
import torch

from stablestep.optim import Adam, AdamW
from tests.optim.conftest import grad_sequence, make_params, run

CASES = list(
    itertools.product(
        ["adam", "adam_l2", "adamw"], [False, True], [False, True],
        ["fused", "foreach", "reference"],
    )
)


def _pair(kind, amsgrad, maximize, impl, params_a, params_b):
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, amsgrad=amsgrad)
    if kind == "adamw":
        ours = AdamW(params_a, weight_decay=0.1, maximize=maximize, impl=impl, **kw)
        ref = torch.optim.AdamW(params_b, weight_decay=0.1, maximize=maximize, foreach=False, **kw)
    else:
        wd = 0.1 if kind == "adam_l2" else 0.0
        ours = Adam(params_a, weight_decay=wd, maximize=maximize, impl=impl, **kw)
        ref = torch.optim.Adam(params_b, weight_decay=wd, maximize=maximize, foreach=False, **kw)
    return ours, ref


@pytest.mark.parametrize("kind,amsgrad,maximize,impl", CASES)
def test_equals_torch(kind, amsgrad, maximize, impl):
    pa, pb = make_params(), make_params()
    ours, ref = _pair(kind, amsgrad, maximize, impl, pa, pb)
    grads = grad_sequence(pa, 20)
    run(ours, pa, grads)
    run(ref, pb, grads)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        sa, sb = ours.state[a], ref.state[b]
        assert set(sa) == set(sb)
        for key in sb:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=0, check_dtype=True)
        assert sa["step"].dtype == torch.float32 and sa["step"].item() == 20


def test_param_groups_and_no_grad_params():
    """Per-group hyperparameters and parameters without gradients behave as in torch."""
    pa, pb = make_params(), make_params()
    ours = Adam([{"params": pa[:2], "lr": 1e-2}, {"params": pa[2:]}], lr=1e-1)
    ref = torch.optim.Adam([{"params": pb[:2], "lr": 1e-2}, {"params": pb[2:]}], lr=1e-1)
    grads = grad_sequence(pa, 5)
    for gs in grads:
        for ps in (pa, pb):
            for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
                p.grad = None if i == 3 else g.clone()
        ours.step()
        ref.step()
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert pa[3] not in ours.state


def test_closure_returns_loss():
    p = torch.zeros(3, requires_grad=True)
    opt = Adam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = ((p - 1) ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    assert torch.all(p > 0)
