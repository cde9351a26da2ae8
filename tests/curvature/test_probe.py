"""CurvatureProbe: keys, accuracy, warm start, save/load, side effects, memory, NaN."""

from __future__ import annotations

import copy
import ctypes
import gc
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stablestep.curvature import CurvatureProbe, LanczosConfig, ProbeConfig, hvp
from stablestep.telemetry import names
from tests.curvature.helpers import dense_for, make_problem, textbook_threshold
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

COST = {names.CURV_SECONDS, names.CURV_HVPS, names.CURV_SHARE}


def _values(out):
    return {k: v for k, v in out.items() if k not in COST - {names.CURV_HVPS}}


def _step(opt, loss_fn):
    opt.zero_grad()
    loss_fn().backward()
    opt.step()


def test_keys_adam_and_sgd_and_before_first_step():
    model, loss_fn, _ = make_problem("mlp")
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = CurvatureProbe(model.parameters(), adam)
    first = probe(loss_fn)
    assert set(first) == {names.SHARPNESS, names.LR_SHARPNESS, *COST} - {names.CURV_SHARE}
    _step(adam, loss_fn)
    out = probe(loss_fn)
    assert set(out) == {names.SHARPNESS, names.LR_SHARPNESS, names.PRECOND_SHARPNESS,
                        names.PRECOND_THRESHOLD, *COST}
    assert 0 < out[names.CURV_SHARE] <= 1 and out[names.CURV_SECONDS] > 0
    assert out[names.CURV_HVPS] == probe.last_hvps > 0
    assert out[names.PRECOND_THRESHOLD] == pytest.approx(38.0)
    assert out[names.LR_SHARPNESS] == pytest.approx(1e-2 * out[names.SHARPNESS])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = CurvatureProbe(model.parameters(), sgd)(loss_fn)
    assert out[names.GD_THRESHOLD] == pytest.approx(3.8)
    assert out[names.PRECOND_THRESHOLD] == pytest.approx(3.8)
    assert out[names.PRECOND_SHARPNESS] == pytest.approx(out[names.LR_SHARPNESS], rel=2e-2)


def test_probe_values_against_dense_and_warm_start_is_cheaper():
    model, loss_fn, xy = make_problem("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(tol=1e-3))
    warm, cold = [], []
    for _ in range(5):
        _step(opt, loss_fn)
        out = probe(loss_fn)
        warm.append(probe.last_hvps)
        fresh = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(tol=1e-3))
        fresh(loss_fn)
        cold.append(fresh.last_hvps)
    assert sum(warm[2:]) < 0.7 * sum(cold[2:])  # measured: 27 vs 67
    H = dense_for("cnn", model, xy)
    assert out[names.SHARPNESS] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=5e-3)
    D = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    t = int(opt.state[next(model.parameters())]["step"])
    D = 1e-3 / (1 - 0.9**t) / ((D / (1 - 0.999**t)).sqrt() + 1e-8)
    exact = torch.linalg.eigvals(D[:, None] * H).real.max().item()
    assert out[names.PRECOND_SHARPNESS] == pytest.approx(exact, rel=5e-3)


def _training(seed=0):
    model, loss_fn, _ = make_problem("attention", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, loss_fn, opt


def test_state_dict_save_load_continue_identically():
    model, loss_fn, opt = _training()
    probe = CurvatureProbe(model.parameters(), opt)
    for _ in range(3):
        _step(opt, loss_fn)
        probe(loss_fn)
    saved = (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(probe.state_dict()),
    )
    model2, loss_fn2, opt2 = _training()  # same data; fresh model, optimizer and probe
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    probe2 = CurvatureProbe(model2.parameters(), opt2)
    probe2.load_state_dict(saved[2])
    for _ in range(3):
        _step(opt, loss_fn)
        _step(opt2, loss_fn2)
        a, b = probe(loss_fn), probe2(loss_fn2)
        assert _values(a) == _values(b)
        assert probe.last_hvps == probe2.last_hvps
    assert probe.state_dict()["n_calls"] == probe2.state_dict()["n_calls"] == 6


def test_load_state_dict_rejects_other_model():
    model, loss_fn, opt = _training()
    probe = CurvatureProbe(model.parameters(), opt)
    _step(opt, loss_fn)
    probe(loss_fn)
    other, _, _ = make_problem("mlp")
    p2 = CurvatureProbe(other.parameters(), torch.optim.Adam(other.parameters()))
    with pytest.raises(ValueError, match="state_dict v_h has 507 entries but the probe's"):
        p2.load_state_dict(probe.state_dict())


def test_probe_has_no_side_effects_and_keeps_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        return F.mse_loss(model(x), y)

    _step(opt, loss_fn)
    opt.zero_grad()
    loss_fn().backward()
    for training in (True, False):
        model.train(training)
        grads = [p.grad.clone() for p in model.parameters()]
        grad_ids = [id(p.grad) for p in model.parameters()]
        params = [p.detach().clone() for p in model.parameters()]
        state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
        rng = torch.get_rng_state()
        if not training:  # dropout in train mode draws from the global RNG in the closure
            CurvatureProbe(model.parameters(), opt)(loss_fn)
            assert torch.equal(torch.get_rng_state(), rng)
        else:
            CurvatureProbe(model.parameters(), opt)(loss_fn)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        assert [id(p.grad) for p in model.parameters()] == grad_ids
        for p, g, q in zip(model.parameters(), grads, params, strict=True):
            assert torch.equal(p.grad, g) and torch.equal(p.detach(), q)
        for k, v in opt.state[model[0].weight].items():
            assert torch.equal(v, state[k])


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_every_row_probe_keys_threshold_and_no_side_effect_on_training(info):
    """For every optimizer of the table: the probe reports the preconditioned sharpness
    against the row's textbook threshold, and training with the probe called after every
    step is bitwise the training without it (parameters and optimizer state)."""
    runs = []
    for with_probe in (False, True):
        model, loss_fn, _ = make_problem("mlp", seed=3)
        opt = info(model.parameters())
        probe = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(tol=1e-3))
        for _ in range(3):
            _step(opt, loss_fn)
            if with_probe:
                out = probe(loss_fn)
                assert out[names.PRECOND_THRESHOLD] == pytest.approx(
                    textbook_threshold(info, opt.param_groups[0]))
                assert out[names.PRECOND_SHARPNESS] > 0
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    for p0, p1 in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(p0, p1)
        for key, value in o0.state[p0].items():
            other = o1.state[p1][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_nonfinite_loss_gives_nan_and_keeps_warm_start():
    model, loss_fn, _ = make_problem("mlp")
    opt = torch.optim.Adam(model.parameters())
    _step(opt, loss_fn)
    probe = CurvatureProbe(model.parameters(), opt)
    probe(loss_fn)
    before = probe.state_dict()
    out = probe(lambda: loss_fn() * float("nan"))
    assert set(out) >= {names.SHARPNESS, names.PRECOND_SHARPNESS}
    assert all(math.isnan(out[k]) for k in (names.SHARPNESS, names.PRECOND_SHARPNESS))
    assert torch.equal(probe.state_dict()["v_h"], before["v_h"])


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]


def _live_mb() -> float:
    """Bytes currently allocated through malloc (torch's CPU tensors included), in MB.

    Unlike RSS this does not stay high after a free, so earlier tests cannot hide a leak."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


def _growth_mb(fn, n: int) -> float:
    for _ in range(10):
        fn()
    gc.collect()
    start = _live_mb()
    for _ in range(n):
        fn()
    gc.collect()
    return _live_mb() - start


def _n_tensors() -> int:
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def _big_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 1))
    x, y = torch.randn(128, 32), torch.randn(128, 1)
    return model, (lambda: F.mse_loss(model(x), y))


def test_memory_flat_over_200_estimates():
    """Each estimate's double-backward graph holds a few MB: a leak would add ~1 GB."""
    model, loss_fn = _big_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cfg = ProbeConfig(preconditioned=False, restart_every=0)
    probe = CurvatureProbe(model.parameters(), opt, config=cfg)

    def estimate():
        probe(loss_fn)

    assert _growth_mb(estimate, 200) < 5
    n_tensors = _n_tensors()
    for _ in range(20):
        estimate()
    gc.collect()
    assert _n_tensors() == n_tensors


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_memory_check_detects_the_create_graph_leak():
    """The measurement above can fail: the classic ``backward(create_graph=True)`` cycle
    (p.grad -> graph -> p) leaks each model and graph, ~2 MB per call here."""

    def leaky():
        _, loss_fn = _big_problem()
        loss_fn().backward(create_graph=True)

    assert _growth_mb(leaky, 20) > 20


def test_argument_errors():
    model, loss_fn, _ = make_problem("mlp")
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"Invalid tol: 0\.0 \(expected 0 < tol < 1\)"):
        ProbeConfig(tol=0.0)
    with pytest.raises(ValueError, match=r"Invalid max_iter: 0 \(expected >= 1\)"):
        LanczosConfig(max_iter=0)
    with pytest.raises(ValueError, match="at least one of sharpness, preconditioned"):
        ProbeConfig(sharpness=False, preconditioned=False)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss, got shape \(3,\)"):
        hvp(lambda: model(torch.zeros(1, 10, dtype=torch.float64)).sum(0), params, params)
    with pytest.raises(TypeError, match="loss_fn must return a torch.Tensor, got float"):
        hvp(lambda: 1.0, params, params)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        CurvatureProbe([torch.zeros(3)], torch.optim.SGD(params, lr=0.1))


def test_periodic_cold_start_catches_an_overtaking_eigenvalue():
    """A warm start that is exactly the old top eigenvector cannot see a new direction
    overtake it (documented); restart_every bounds how long that lasts."""
    theta = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    spectrum = torch.tensor([10.0, 5.0, 1.0, 0.5], dtype=torch.float64)

    def loss_fn():
        return 0.5 * (spectrum * (theta + 1) ** 2).sum()

    opt = torch.optim.SGD([theta], lr=0.01)
    seen = {}
    for every in (0, 2):
        spectrum[:2] = torch.tensor([10.0, 5.0], dtype=torch.float64)
        probe = CurvatureProbe([theta], opt, config=ProbeConfig(tol=1e-9, restart_every=every))
        first = probe(loss_fn)[names.SHARPNESS]
        spectrum[1] = 20.0  # e2 overtakes e1, with no mixing between them
        seen[every] = [first] + [probe(loss_fn)[names.SHARPNESS] for _ in range(2)]
    assert seen[0] == pytest.approx([10.0, 10.0, 10.0])  # stale, as documented
    assert seen[2] == pytest.approx([10.0, 10.0, 20.0])  # call 3 starts cold
