"""The fast paths (torch's fused kernel, foreach) equal the readable reference path, and the
reference path equals the papers' equations written out independently here in numpy."""

import itertools
import math

import numpy as np
import pytest
import torch

from stablestep.optim import Adam, AdamAtan2, AdamW
from tests.optim.conftest import grad_sequence, make_params, run

SPIKE = 12  # a 100x gradient at this step makes g^2/v_hat large, so update clipping triggers


def _state_equal(oa, ob, pa, pb, rtol):
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
        sa, sb = oa.state[a], ob.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=rtol)
            else:
                torch.testing.assert_close(va, vb, rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "impl,eps_mode,amsgrad,clip,wd",
    list(itertools.product(["fused", "foreach"], ["torch", "tf"], [False, True], [False, True],
                           ["l2", "decoupled"])),
)
def test_fast_equals_reference(impl, eps_mode, amsgrad, clip, wd):
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, amsgrad=amsgrad, eps_mode=eps_mode,
              update_clipping=clip, weight_decay=0.05, decoupled_weight_decay=wd == "decoupled")
    pa, pb = make_params(), make_params()
    fast, ref = Adam(pa, impl=impl, **kw), Adam(pb, impl="reference", **kw)
    grads = grad_sequence(pa, 20, spike_at=SPIKE)
    run(fast, pa, grads[: SPIKE + 1])
    run(ref, pb, grads[: SPIKE + 1])
    if clip:  # the spike really was clipped, and identically
        scales = [ref.state[p]["update_scale"] for p in pb]
        assert min(scales) < 0.5
    run(fast, pa, grads[SPIKE + 1 :])
    run(ref, pb, grads[SPIKE + 1 :])
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


@pytest.mark.parametrize("eps_mode", ["torch", "tf"])
def test_fused_float32_close_to_reference(eps_mode):
    pa, pb = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    kw = dict(lr=1e-2, eps=1e-7, eps_mode=eps_mode, amsgrad=True)
    fast, ref = Adam(pa, impl="fused", **kw), Adam(pb, impl="reference", **kw)
    grads = grad_sequence(pa, 10)
    run(fast, pa, grads)
    run(ref, pb, grads)
    _state_equal(fast, ref, pa, pb, rtol=1e-5)


def test_fused_is_bitwise_torch_fused_float32():
    pa, pb = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    ours = AdamW(pa, lr=1e-2, amsgrad=True, impl="fused")
    ref = torch.optim.AdamW(pb, lr=1e-2, amsgrad=True, fused=True)
    grads = grad_sequence(pa, 10)
    run(ours, pa, grads)
    run(ref, pb, grads)
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)


def test_auto_falls_back_for_complex():
    """Complex parameters take the foreach path (as real pairs, like torch) under impl='auto'."""
    g = torch.Generator().manual_seed(0)
    za = torch.randn(4, dtype=torch.complex128, generator=g).requires_grad_()
    zb = za.detach().clone().requires_grad_()
    ours, ref = Adam([za], lr=0.1), torch.optim.Adam([zb], lr=0.1, foreach=False)
    for _ in range(5):
        grad = torch.randn(4, dtype=torch.complex128, generator=g)
        za.grad, zb.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(za, zb, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="impl='fused' is not available for torch.complex128"):
        Adam([za], impl="fused")


def _stable_adamw_numpy(theta, grads, lr, b1, b2, eps, wd):
    """Wortsman et al. 2023, Algorithm 2 (StableAdamW), per tensor, written from the paper."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        rms = math.sqrt(np.mean(g * g / np.maximum(v_hat, eps**2)))
        eta = lr / max(1.0, rms)
        theta = theta - eta * wd * theta - eta * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def test_update_clipping_matches_stable_adamw_paper():
    p = make_params()[0]
    grads = [g[0] for g in grad_sequence([p], 20, spike_at=SPIKE)]
    expected = _stable_adamw_numpy(p.detach().numpy().copy(), [g.numpy() for g in grads],
                                   lr=1e-2, b1=0.9, b2=0.95, eps=1e-6, wd=0.1)
    for impl in ("reference", "fused"):
        q = p.detach().clone().requires_grad_()
        opt = AdamW([q], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1,
                    update_clipping=True, impl=impl)
        run(opt, [q], [[g] for g in grads])
        np.testing.assert_allclose(q.detach().numpy(), expected, rtol=1e-12)


def _adam_atan2_numpy(theta, grads, lr, b1, b2, wd, a, b):
    """Everett et al. 2024: theta -= lr*wd*theta + lr*a*atan2(m_hat, b*sqrt(v_hat))."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * a * np.arctan2(m / (1 - b1**t), b * np.sqrt(v / (1 - b2**t)))
    return theta


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_adam_atan2_matches_paper(impl):
    p = make_params()[0]
    grads = [g[0] for g in grad_sequence([p], 20, spike_at=SPIKE)]
    expected = _adam_atan2_numpy(p.detach().numpy().copy(), [g.numpy() for g in grads],
                                 lr=1e-2, b1=0.9, b2=0.99, wd=0.1, a=1.27, b=0.5)
    q = p.detach().clone().requires_grad_()
    opt = AdamAtan2([q], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, b=0.5, impl=impl)
    run(opt, [q], [[g] for g in grads])
    np.testing.assert_allclose(q.detach().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("maximize", [False, True])
def test_adam_atan2_fast_equals_reference(maximize):
    pa, pb = make_params(), make_params()
    kw = dict(lr=1e-2, weight_decay=0.01, maximize=maximize)
    fast, ref = AdamAtan2(pa, impl="foreach", **kw), AdamAtan2(pb, impl="reference", **kw)
    grads = grad_sequence(pa, 20, spike_at=SPIKE)
    run(fast, pa, grads)
    run(ref, pb, grads)
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_tf_mode_with_uneven_step_counts(impl):
    """A parameter without a gradient on some steps has its own t, hence its own eps_t."""
    pa, pb = make_params(), make_params()
    kw = dict(lr=1e-2, eps=1e-2, eps_mode="tf", update_clipping=True)
    fast, ref = Adam(pa, impl=impl, **kw), Adam(pb, impl="reference", **kw)
    for t, gs in enumerate(grad_sequence(pa, 12, spike_at=7)):
        for ps in (pa, pb):
            for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
                p.grad = None if (i == 1 and t % 3 == 0) else g.clone()
        fast.step()
        ref.step()
    assert fast.state[pa[1]]["step"].item() == 8 and fast.state[pa[0]]["step"].item() == 12
    _state_equal(fast, ref, pa, pb, rtol=1e-12)


def test_public_names():
    import stablestep
    from stablestep.optim import schedules

    assert stablestep.Adam is Adam and stablestep.AdamW is AdamW
    assert stablestep.AdamAtan2 is AdamAtan2 and stablestep.schedules is schedules
