"""save -> load -> continue identically, and torch.optim.Adam state_dicts in both directions."""

import copy
import io

import pytest
import torch

from stablestep.optim import Adam, AdamAtan2, AdamW
from tests.optim.conftest import grad_sequence, make_params, run

FACTORIES = {
    "adam_torch": lambda ps: Adam(ps, lr=1e-2, amsgrad=True),
    "adam_tf_clip": lambda ps: Adam(ps, lr=1e-2, eps=1e-3, eps_mode="tf", update_clipping=True),
    "adamw_ref": lambda ps: AdamW(ps, lr=1e-2, impl="reference"),
    "adamw_foreach_amsgrad": lambda ps: AdamW(ps, lr=1e-2, amsgrad=True, impl="foreach"),
    "atan2": lambda ps: AdamAtan2(ps, lr=1e-2, weight_decay=0.1),
}


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_save_load_continue_identically(name):
    make = FACTORIES[name]
    grads = grad_sequence(make_params(), 16, spike_at=6)
    pa = make_params()
    a = make(pa)
    run(a, pa, grads[:8])
    saved_params = _roundtrip([p.detach().clone() for p in pa])
    saved_opt = _roundtrip(a.state_dict())
    run(a, pa, grads[8:])

    pb = [p.clone().requires_grad_() for p in saved_params]
    b = make(pb)
    b.load_state_dict(saved_opt)
    run(b, pb, grads[8:])
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        for key, value in a.state[x].items():
            other = b.state[y][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_deepcopy_continues_identically():
    pa = make_params()
    a = Adam(pa, lr=1e-2, eps_mode="tf")
    grads = grad_sequence(pa, 10)
    run(a, pa, grads[:5])
    pb = [p.detach().clone().requires_grad_() for p in pa]
    b = Adam(pb, lr=1e-2, eps_mode="tf")
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    run(a, pa, grads[5:])
    run(b, pb, grads[5:])
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "torch_cls,ours_cls", [(torch.optim.Adam, Adam), (torch.optim.AdamW, AdamW)]
)
def test_torch_state_dict_loads_into_ours_and_back(torch_cls, ours_cls):
    grads = grad_sequence(make_params(), 12)
    kw = dict(lr=1e-2, amsgrad=True)
    # torch runs 6 steps, ours continues: must equal torch running all 12
    p_ref = make_params()
    ref = torch_cls(p_ref, foreach=False, **kw)
    run(ref, p_ref, grads)

    p_t = make_params()
    t = torch_cls(p_t, foreach=False, **kw)
    run(t, p_t, grads[:6])
    p_o = [p.detach().clone().requires_grad_() for p in p_t]
    ours = ours_cls(p_o, **kw)
    ours.load_state_dict(_roundtrip(t.state_dict()))
    assert ours.param_groups[0]["eps_mode"] == "torch" and ours.param_groups[0]["impl"] == "auto"
    run(ours, p_o, grads[6:9])

    # and back: torch continues from our state for the last 3 steps
    p_back = [p.detach().clone().requires_grad_() for p in p_o]
    back = torch_cls(p_back, foreach=False, **kw)
    back.load_state_dict(_roundtrip(ours.state_dict()))
    run(back, p_back, grads[9:])
    for x, y in zip(p_back, p_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
    assert back.state[p_back[0]]["step"].item() == 12


def test_foreign_state_dict_keeps_our_eps_mode():
    """Loading torch's state (it has no eps_mode) keeps the mode this optimizer was built with."""
    p_t, p_o = make_params(), make_params()
    t = torch.optim.Adam(p_t, lr=1e-2)
    run(t, p_t, grad_sequence(p_t, 2))
    ours = Adam(p_o, lr=1e-2, eps_mode="tf")
    ours.load_state_dict(t.state_dict())
    assert ours.param_groups[0]["eps_mode"] == "tf"
