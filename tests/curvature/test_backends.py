"""HVP backends against double backward: finite differences, math attention, the fallback,
the directional measures, failure as a result, and the cost notice."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from stablestep.curvature import (
    CurvatureProbe,
    HessianOperator,
    ProbeConfig,
    preconditioner_diag,
)
from stablestep.curvature.directional import critical_sharpness
from stablestep.curvature.fd import Evaluator, FiniteDifferenceOperator
from stablestep.telemetry import names
from tests.curvature.gpt2 import tiny_gpt2, train
from tests.curvature.helpers import make_problem


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_fd_products_match_double_backward(dtype, bound):
    """The error stated in fd.py: relative to lam_max, ~1e-8 (float64), ~2e-4 (float32)."""
    model, loss_fn, _ = make_problem("cnn", dtype=dtype)
    params = list(model.parameters())
    exact, fd = HessianOperator(loss_fn, params), FiniteDifferenceOperator(loss_fn, params)
    assert fd.loss == pytest.approx(exact.loss, rel=1e-6)
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    top = None
    for _ in range(3):
        v = torch.randn(exact.n, dtype=torch.float64, generator=g)
        hv, hv_fd = exact.matvec_flat(v), fd.matvec_flat(v)
        top = top or float(hv.norm() / v.norm())
        assert float((hv_fd - hv).norm() / v.norm()) < bound * 20 * top
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))  # restored
    assert fd.n_hvp == 3 and fd.eval.n_backward == 7


def _probe(model, opt, backend, **kw):
    cfg = ProbeConfig(backend=backend, tol=1e-4, restart_every=0, grad_curvature=True,
                      critical_sharpness=True, **kw)
    return CurvatureProbe(model.parameters(), opt, config=cfg)


def test_gpt2_sdpa_exact_fails_as_a_result_and_auto_falls_back_once(caplog):
    model, loss_fn, opt = tiny_gpt2()
    train(opt, loss_fn, 2)
    res = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(backend="exact"))(loss_fn)
    assert res.failed and res.backend == "exact"
    assert "_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" in res.error
    assert names.SHARPNESS not in res and res[names.CURV_SECONDS] > 0
    auto = CurvatureProbe(model.parameters(), opt)
    with caplog.at_level(logging.WARNING, logger="stablestep.curvature"):
        a, b = auto(loss_fn), auto(loss_fn)
    fallbacks = [r for r in caplog.records if "products failed" in r.getMessage()]
    assert len(fallbacks) == 1 and "using the math attention kernel" in fallbacks[0].message
    assert not a.failed and a.backend == b.backend == auto.backend == "math"
    assert math.isfinite(a[names.SHARPNESS]) and math.isfinite(a[names.PRECOND_SHARPNESS])


def test_gpt2_fd_within_1pct_of_double_backward_with_math_attention():
    model, loss_fn, opt = tiny_gpt2()
    train(opt, loss_fn, 3)
    ref, fd = _probe(model, opt, "math"), _probe(model, opt, "fd")
    for _ in range(2):  # a cold and a warm-started estimate
        r, f = ref(loss_fn), fd(loss_fn)
        assert r.backend == "math" and f.backend == "fd"
        for key in (names.SHARPNESS, names.PRECOND_SHARPNESS, names.GRAD_CURVATURE):
            assert f[key] == pytest.approx(r[key], rel=1e-2), key
        train(opt, loss_fn, 2)


def test_critical_sharpness_forward_only():
    """On a quadratic lam_c = d.Hd / g.d exactly; on GPT-2 the forward-only line search finds
    the root of L(theta - eta d) = L(theta) that a 60-pass bisection finds."""
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    quad = lambda: 0.5 * theta @ a @ theta  # noqa: E731
    ev = Evaluator(quad, [theta])
    g = (a @ theta).detach()
    d = g * torch.tensor([1.0, 0.3], dtype=torch.float64)  # a preconditioned direction
    cs = critical_sharpness(ev, float(quad().detach()), [d], eta0=1e-3)
    assert cs.value == pytest.approx(float(d @ a @ d / (g @ d)), rel=1e-3)
    assert cs.n_forward <= 16

    model, loss_fn, opt = tiny_gpt2()
    train(opt, loss_fn, 3)
    res = _probe(model, opt, "forward")(loss_fn)
    assert res.backend == "forward" and res[names.CURV_HVPS] == 0
    assert names.SHARPNESS not in res
    params = list(model.parameters())
    ev = Evaluator(loss_fn, params)
    loss0, grad = ev.gradient()
    lr = opt.param_groups[0]["lr"]  # the direction the probe takes: S g, S = diag(P^-1)/lr
    direction = [s / lr * gr for s, gr in zip(preconditioner_diag(opt, params), grad,
                                                strict=True)]

    def rise(eta):
        return ev.loss([-eta * t for t in direction]) - loss0

    lo, hi = 0.0, 1e-6
    while rise(hi) <= 0:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rise(mid) <= 0 else (lo, mid)
    assert res[names.CRITICAL_SHARPNESS] == pytest.approx(2 / hi, rel=1e-2)


def test_a_failing_closure_gives_a_failed_result_not_an_exception(caplog):
    model, loss_fn, _ = make_problem("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = CurvatureProbe(model.parameters(), opt)

    def broken():
        raise KeyError("batch")

    with caplog.at_level(logging.WARNING, logger="stablestep.curvature"):
        res = probe(broken)
    assert res.failed and res.error == "KeyError: 'batch'" and dict(res).keys() <= {
        names.CURV_SECONDS, names.CURV_HVPS}
    assert sum("estimate 1 failed" in r.getMessage() for r in caplog.records) == 1
    assert not probe(loss_fn).failed  # and the next estimate works


def test_cost_notice_once_and_adaptive_cadence(caplog):
    model, loss_fn, _ = make_problem("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="stablestep.curvature"):
        probe = CurvatureProbe(model.parameters(), opt)  # back to back: ~100% of wall time
        shares = [probe(loss_fn).get(names.CURV_SHARE) for _ in range(4)]
    assert shares[0] is None and all(s > 0.05 for s in shares[1:])
    notes = [r.getMessage() for r in caplog.records if "of wall time" in r.getMessage()]
    assert len(notes) == 1 and "budget 5%" in notes[0]
    adaptive = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(adapt=True))
    out = [adaptive(loss_fn) for _ in range(5)]
    assert [r.skipped for r in out[:2]] == [False, False] and all(r.skipped for r in out[2:])
    assert adaptive.n_calls == 2 and out[-1] == {}


def test_fd_probe_save_load_continues_identically_and_keeps_the_fallback(caplog):
    def fresh():
        model, loss_fn, _ = make_problem("attention")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, loss_fn, opt

    cfg = ProbeConfig(backend="fd", grad_curvature=True, critical_sharpness=True)
    model, loss_fn, opt = fresh()
    probe = CurvatureProbe(model.parameters(), opt, config=cfg)
    for _ in range(2):
        train(opt, loss_fn, 1)
        probe(loss_fn)
    saved = ({k: v.clone() for k, v in model.state_dict().items()},
             copy.deepcopy(opt.state_dict()), copy.deepcopy(probe.state_dict()))
    model2, loss_fn2, opt2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    probe2 = CurvatureProbe(model2.parameters(), opt2)  # config comes with the state
    probe2.load_state_dict(saved[2])
    for _ in range(2):
        train(opt, loss_fn, 1)
        train(opt2, loss_fn2, 1)
        a, b = probe(loss_fn), probe2(loss_fn2)
        assert a.backend == b.backend == "fd"
        drop = {names.CURV_SECONDS, names.CURV_SHARE}
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop}
    # an auto probe that fell back to math attention resumes on math, without a new warning
    gpt, gpt_loss, gpt_opt = tiny_gpt2()
    train(gpt_opt, gpt_loss, 1)
    auto = CurvatureProbe(gpt.parameters(), gpt_opt, config=ProbeConfig(preconditioned=False))
    auto(gpt_loss)
    resumed = CurvatureProbe(gpt.parameters(), gpt_opt)
    resumed.load_state_dict(auto.state_dict())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stablestep.curvature"):
        assert resumed(gpt_loss).backend == "math"
    assert not [r for r in caplog.records if "products failed" in r.getMessage()]


def test_out_of_memory_building_a_backend_moves_auto_on():
    model, loss_fn, _ = make_problem("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def tight():  # double backward and math attention "run out of memory"
        calls.append(1)
        if len(calls) <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss_fn()

    res = CurvatureProbe(model.parameters(), opt)(tight)
    assert not res.failed and res.backend == "fd" and res[names.SHARPNESS] > 0


def test_config_errors():
    with pytest.raises(ValueError, match=r"Invalid backend: 'flash' \(expected one of"):
        ProbeConfig(backend="flash")
    with pytest.raises(ValueError, match=r"Invalid budget: 0 \(expected 0 < budget <= 1\)"):
        ProbeConfig(budget=0)
    with pytest.raises(ValueError, match=r"Invalid warm_max_iter: 0 \(expected >= 1\)"):
        ProbeConfig(warm_max_iter=0)
    with pytest.raises(ValueError, match=r"Invalid distributed mode: 'ddp' \(expected 'auto'"):
        ProbeConfig(distributed="ddp")
