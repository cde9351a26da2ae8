"""The free secant curvature (telemetry.secant): exact on quadratics, reads Adam's bound at the
adaptive edge of stability, survives save -> load -> continue, and the Monitor records it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablestep import formulas as F
from stablestep.telemetry import names
from stablestep.telemetry.secant import SecantTracker, secant


def _quadratic(seed: int = 0, dim: int = 12):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.logspace(-1, 1, dim, dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    x = torch.randn(dim, generator=g, dtype=torch.float64).requires_grad_()
    return a, x


def _run(opt_fn, steps: int, a, x, tracker=None):
    opt = opt_fn([x])
    tr = tracker or SecantTracker(1)
    qs = []
    for t in range(steps):
        opt.zero_grad()
        loss = 0.5 * x @ a @ x
        loss.backward()
        r = tr.observe(t, [x], [x.grad])
        qs.append(r["q"] if r else math.nan)
        opt.step()
        tr.after_step(opt, [x])
    return qs, tr, opt


def _make(kind):
    if kind == "sgd":
        return lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    if kind == "adam":
        return lambda p: torch.optim.Adam(p, lr=0.01)
    from stablestep.optim import Adam

    return lambda p: Adam(p, lr=0.01, eps=1e-3, eps_mode="tf")


@pytest.mark.parametrize("kind", ["sgd", "adam", "adam-tf"])
def test_secant_is_the_exact_rayleigh_quotient_on_a_quadratic(kind):
    """q = u.A u / (u.P u) with torch's own A, the update u and the optimizer's P^-1 = d, and
    never above lam_max(P^-1 A) (the generalised Rayleigh bound; exact eigenvalues)."""
    from stablestep.optim import inspect

    a, x = _quadratic()
    opt = _make(kind)([x])
    tr = SecantTracker(1)
    prev = None
    checked = 0
    for t in range(6):
        opt.zero_grad()
        (0.5 * x @ a @ x).backward()
        r = tr.observe(t, [x], [x.grad])
        if r is not None:
            u, d = prev
            ref = float(u @ a @ u) / float((u * u / d).sum())
            assert r["q"] == pytest.approx(ref, rel=1e-9)
            m = torch.diag(d.sqrt()) @ a @ torch.diag(d.sqrt())
            assert r["q"] <= float(torch.linalg.eigvalsh(m).max()) * (1 + 1e-9)
            checked += 1
        theta = x.detach().clone()
        opt.step()
        tr.after_step(opt, [x])
        d = inspect.effective_step(opt, x).expand_as(theta).double()
        prev = (x.detach() - theta, d)
    assert checked == 5


def test_pure_form_matches_formulas():
    a, x = _quadratic(1)
    u = torch.randn_like(x.detach())
    g0 = a @ x.detach()
    g1 = a @ (x.detach() + u)
    d = torch.rand_like(u) + 0.1
    assert secant([u], [g0], [g1], [d]) == pytest.approx(
        float(u @ a @ u) / float((u * u / d).sum()), rel=1e-12)


def test_save_load_continue_identically():
    a, x0 = _quadratic(2)
    qs_full, _, _ = _run(lambda p: torch.optim.Adam(p, lr=0.02), 12, a, x0.detach().clone()
                         .requires_grad_())
    # interrupted run: stop after step 5's update, save everything, continue in new objects
    x = x0.detach().clone().requires_grad_()
    qs_a, tr, opt = _run(lambda p: torch.optim.Adam(p, lr=0.02), 6, a, x)
    sd_t, sd_o, xv = tr.state_dict(), opt.state_dict(), x.detach().clone()
    assert sd_t["open"] is not None
    x2 = xv.clone().requires_grad_()
    opt2 = torch.optim.Adam([x2], lr=0.02)
    opt2.load_state_dict(sd_o)
    tr2 = SecantTracker(1)
    tr2.load_state_dict(sd_t)
    qs_b = []
    for t in range(6, 12):
        opt2.zero_grad()
        (0.5 * x2 @ a @ x2).backward()
        r = tr2.observe(t, [x2], [x2.grad])
        qs_b.append(r["q"])
        opt2.step()
        tr2.after_step(opt2, [x2])
    np.testing.assert_allclose(qs_a + qs_b, qs_full, rtol=1e-12, equal_nan=True)


def test_full_batch_adam_reads_the_bound_at_spike_onsets_and_zero_while_stable():
    """Adaptive edge of stability (Cohen et al. 2022): spikes begin when lam_max(P^-1 H)
    crosses (2+2*b1)/(1-b1) = 38; the secant along the update reads it there."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = torch.sin(x.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    tr = SecantTracker(1)
    losses, qs = [], []
    for t in range(650):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        r = tr.observe(t, params, [p.grad for p in params])
        qs.append(r["q"] if r else math.nan)
        losses.append(loss.item())
        opt.step()
        tr.after_step(opt, params)
    L, Q = np.array(losses), np.array(qs)
    bound = F.adam_threshold(0.9)
    onsets = [t for t in range(60, len(L)) if L[t] > 2 * L[t - 50:t].min()
              and not (L[t - 1] > 2 * L[t - 51:t - 1].min())]
    assert onsets, "the run shows no spike: the scenario no longer reaches the edge"
    near = [np.nanmax(Q[t - 5:t + 3]) for t in onsets]
    assert all(0.8 * bound <= v <= 1.2 * bound for v in near), near
    calm = Q[100:300]  # a stable stretch, long before the first spike
    assert np.nanmedian(np.abs(calm)) < 0.05 * bound


def test_monitor_records_secant_and_dtypes(tmp_path):
    from stablestep import Monitor, open_run

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    store = str(tmp_path / "r.db")
    with Monitor(model, opt, store=store, run="r", secant_every=1) as mon:
        for _ in range(5):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            mon.observe(loss)
            opt.step()
        sd = mon.state_dict()
    run = open_run(store, "r")
    steps, q = run.series(names.SECANT)
    assert list(steps) == [1, 2, 3, 4] and np.all(np.isfinite(q))
    # full-batch least squares: q = lr * a Rayleigh quotient of H = 2/n Z^T Z, Z = [x, 1]
    z = torch.cat([x, torch.ones(16, 1)], 1).double()
    lam = torch.linalg.eigvalsh(2 * z.T @ z / 16)
    assert np.all(q >= 0.1 * float(lam.min()) * 0.99) and np.all(q <= 0.1 * float(lam.max()) * 1.01)
    assert run.config["dtypes"] == ["float32"]
    assert sd["secant"]["version"] == 1
    with Monitor(model, opt, store=store, run="default") as mon:  # default cadence: every 10
        for _ in range(23):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            mon.observe(loss)
            opt.step()
    assert list(open_run(store, "default").series(names.SECANT)[0]) == [1, 11, 21]


def test_no_update_records_no_secant_and_no_nonfinite_event(tmp_path):
    """u = 0 (lr 0, a dead network) leaves q undefined: nothing is stored, no NaN event."""
    from stablestep import Monitor, open_run

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with Monitor(model, opt, store=str(tmp_path / "z.db"), run="z", secant_every=1) as mon:
        for _ in range(4):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            mon.observe(loss)
            opt.step()
    run = open_run(str(tmp_path / "z.db"), "z")
    assert names.SECANT not in run.names()
    assert not [e for e in run.events if e.kind == names.EVENT_NONFINITE]
