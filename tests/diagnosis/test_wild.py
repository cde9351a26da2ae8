"""Diagnosis in the wild (#11): loss-, lr- and secant-aware inference from the default Monitor,
remedies that fit the run, verified remedies in the lab, disjoint benchmark sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablestep import diagnose
from stablestep.diagnosis import infer
from stablestep.diagnosis.core import diagnose_trace
from stablestep.diagnosis.explain import Incident, classify, remedies
from stablestep.diagnosis.stack import replay
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names


def _mlp_run(tmp_path, *, lr, steps, opt="adam", batch=32, jump=None, seed=0, amsgrad=False,
             n=256, width=32):
    from stablestep import Monitor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1))
    o = (torch.optim.SGD(model.parameters(), lr=lr) if opt == "sgd"
         else torch.optim.Adam(model.parameters(), lr=lr, amsgrad=amsgrad))
    sched = None
    if jump is not None:
        at, f = jump
        sched = torch.optim.lr_scheduler.LambdaLR(o, lambda t: f if t >= at else 1.0)
    store = str(tmp_path / "w.db")
    with Monitor(model, o, store=store, run="r",
                 config={"full_batch": batch is None}) as mon:
        for _ in range(steps):
            idx = torch.randint(n, (batch,), generator=g) if batch else slice(None)
            o.zero_grad()
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            mon.observe(loss)
            if not math.isfinite(loss.item()):
                break
            o.step()
            if sched:
                sched.step()
    return store


def test_growth_rate_gives_the_curvature_of_gradient_descent():
    """GD on a quadratic above its bound: the per-step loss ratio r gives lr*lam_max = 1+sqrt(r),
    against torch's exact eigenvalues."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.1, 5.0, 8, dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    lr = 2.6 / float(torch.linalg.eigvalsh(a).max())
    xk = torch.randn(8, generator=g, dtype=torch.float64)
    losses = []
    for _ in range(60):
        losses.append(float(0.5 * xk @ a @ xk))
        xk = xk - lr * (a @ xk)
    tr = Trace(np.arange(60), np.array(losses))
    r = infer.growth(tr, 50)
    assert r is not None and r > 1
    est = infer.gd_curvature_from_growth(r)
    assert est == pytest.approx(lr * float(torch.linalg.eigvalsh(a).max()), rel=0.02)


def test_lr_jump_is_named_as_the_cause(tmp_path):
    store = _mlp_run(tmp_path, lr=1e-3, steps=110, jump=(70, 3000.0))
    fs = diagnose(store)
    hit = [f for f in fs if 68 <= f.step <= 90]
    assert hit, [(f.step, f.mechanism) for f in fs]
    f = hit[0]
    assert f.mechanism == "lr-too-high"
    assert f.evidence["lr_jump"]["step"] == 70 and f.evidence["lr_jump"]["factor"] > 1000
    first = f.remedies[0]
    assert first.action == "set-lr" and first.value <= 1e-3 and "expected" in first.why
    assert not any(r.action in ("set-eps", "amsgrad") for r in f.remedies)


def test_blowup_from_step_zero_is_an_incident_with_an_early_lr_bound(tmp_path):
    store = _mlp_run(tmp_path, lr=4.0, steps=40)
    fs = diagnose(store)
    assert fs and fs[0].step <= 2, [(f.step, f.kind, f.mechanism) for f in fs]
    assert fs[0].mechanism == "lr-too-high"
    lr_rem = [r for r in fs[0].remedies if r.action == "set-lr"]
    assert lr_rem and lr_rem[0].value < 4.0
    if "largest stable lr" in lr_rem[0].why:  # from the secant: it must say how reliable
        assert "unreliable this early" in lr_rem[0].why


def test_jump_then_stay_high_is_measured_against_the_best_loss():
    # the detector stack's jump rule (the one the Guard runs live), replayed on a trace
    loss = np.r_[[5.4, 3.0, 2.6, 2.5, 2.4, 2.3], np.full(40, 16.0) + np.sin(np.arange(40))]
    tr = Trace(np.arange(loss.size), loss, hyper={"kind": "adam", "beta1": 0.9})
    extra = [i for i in replay(tr).incidents if i.rule == "jump"]
    div = [i for i in extra if i.kind == "divergence"]
    assert div and 5 <= div[0].onset <= 6
    assert div[0].baseline <= 2.6
    # an early jump is alarmed at once (a spike at its first steps), the divergence
    # follows when it stays: one divergence finding, alarmed at the first
    assert extra[0].step <= div[0].step and extra[0].onset == div[0].onset
    fs = [f for f in diagnose_trace(tr) if f.kind == "divergence"]
    assert len(fs) == 1 and 5 <= fs[0].step <= 6
    assert fs[0].evidence["detected_at"] == extra[0].step < div[0].step
    healthy = Trace(np.arange(60), 3.0 * np.exp(-np.arange(60) / 20) + 0.1 *
                    np.random.default_rng(0).random(60))
    assert [i for i in replay(healthy).incidents if i.rule == "jump"] == []


def _trace(n=80, **hyper):
    rng = np.random.default_rng(1)
    loss = 1.0 + 0.02 * rng.standard_normal(n)
    gn = 1.0 + 0.02 * rng.standard_normal(n)
    return loss, gn, dict(hyper)


def test_full_batch_never_gets_batch_advice_nor_an_outlier_mechanism():
    loss, gn, h = _trace(kind="adam", beta1=0.9, beta2=0.999, lr=1e-3, full_batch=True)
    loss[60:63] = [3.0, 2.0, 1.0]
    gn[60] = 50.0
    tr = Trace(np.arange(80), loss, metrics={names.GRAD_NORM: gn}, hyper=h)
    inc = Incident(onset=60, detected=60, kind="spike", peak=3.0, peak_step=60, baseline=1.0,
                   recovered=True)
    mech, _, ev = classify(tr, inc)
    assert mech != "gradient-outlier"
    assert not any(r.action in ("skip-batch", "clip-grad-norm")
                   for m in (mech, "gradient-outlier") for r in remedies(tr, m, inc, ev))
    h2 = dict(h, full_batch=False)
    tr2 = Trace(np.arange(80), loss, metrics={names.GRAD_NORM: gn}, hyper=h2)
    assert classify(tr2, inc)[0] == "gradient-outlier"


def test_no_amsgrad_for_an_amsgrad_run():
    loss, gn, h = _trace(kind="adam", beta1=0.9, beta2=0.999, lr=1e-3, amsgrad=True)
    tr = Trace(np.arange(80), loss, hyper=h)
    inc = Incident(onset=60, detected=61, kind="spike", peak=3.0, peak_step=61, baseline=1.0,
                   recovered=True)
    ev = {"secant": {"q": 40.0, "bound": 38.0, "trusted": True}}
    rs = remedies(tr, "adaptive-edge-of-stability", inc, ev)
    assert not any(r.action == "amsgrad" for r in rs)
    assert remedies(Trace(np.arange(80), loss, hyper=dict(h, amsgrad=False)),
                    "adaptive-edge-of-stability", inc, ev)[-1].action == "amsgrad"
    assert all("expected" in r.why for r in rs)


@pytest.mark.parametrize("dtype,blowup", [("float32", True), ("float16", False)])
def test_precision_advice_only_for_half_precision(dtype, blowup):
    loss = np.r_[np.linspace(1.0, 0.9, 30), [5.0, 80.0] if blowup else [0.9, 0.9], [np.nan]]
    tr = Trace(np.arange(loss.size), loss,
               hyper={"kind": "adam", "beta1": 0.9, "lr": 1000.0, "dtypes": [dtype]},
               nonfinite_steps=frozenset({32}))
    fs = diagnose(tr)
    assert fs
    acts = [r.action for f in fs for r in f.remedies]
    if dtype == "float32":  # the NaN ends a blow-up: never blamed on the number format
        assert "loss-scaling" not in acts
        assert all(f.mechanism != "non-finite" for f in fs)
    else:
        assert "loss-scaling" in acts and fs[-1].mechanism == "non-finite"


def test_adam_secant_names_the_edge_of_stability(tmp_path):
    """Full-batch Adam with the default Monitor (no HVP): the secant names the mechanism."""
    store = _mlp_run(tmp_path, lr=1e-2, steps=500, batch=None, seed=3, n=64, width=64)
    fs = diagnose(store)
    assert fs, "no incident: the run no longer reaches the edge"
    assert fs[0].mechanism == "adaptive-edge-of-stability"
    sec = fs[0].evidence.get("secant")
    assert sec is None or sec["bound"] == pytest.approx(38.0)


def test_verified_remedies_in_the_lab():
    from stablestep.lab.config import TrainConfig
    from stablestep.lab.train import train
    from stablestep.lab.verify import verify_lab

    cfg = TrainConfig(problem="sin-regression", n=64, dim=4, width=64, lr=1e-2, steps=400)
    res = train(cfg)
    fs = diagnose(Trace(np.arange(cfg.steps), res.losses))
    assert fs
    vs = verify_lab(cfg, fs[0].step, [{"action": "set-lr", "value": 2.5e-3},
                                      {"action": "warmup", "value": 100}], horizon=200)
    assert vs[0].action == "control" and not vs[0].removed  # the replay shows the incident
    assert vs[1].removed and vs[1].summary.startswith("verified: set-lr")
    assert vs[2].summary.startswith("not replayable")


def test_benchmark_sets_are_disjoint():
    """The held-out set shares no seed and no setting with any tuning file: seeds, data
    generators, widths, learning rates, batch sizes (full batch aside), lr jumps and
    outlier scales and steps; and it has every kind of run, at least 10 Keras runs and a
    fifth healthy runs, full batch and minibatch."""
    from benchmarks import (
        wild_heldout,
        wild_tuning,
        wild_tuning2,
        wild_tuning3,
        wild_tuning4,
        wild_tuning5,
    )

    tuning = (wild_tuning.RUNS + wild_tuning2.RUNS + wild_tuning3.RUNS + wild_tuning4.RUNS
              + wild_tuning5.RUNS)
    held = wild_heldout.RUNS
    assert len(held) >= 40

    def values(runs, key, default=None):
        return {r.get(key, default) for r in runs}

    assert not values(tuning, "seed") & values(held, "seed")
    assert not values(tuning, "lr") & values(held, "lr")
    assert not (values(tuning, "batch") & values(held, "batch")) - {None}
    assert not values(tuning, "data", "default") & values(held, "data", "default")
    for key in ("factor", "at"):
        inc = lambda runs: [r for r in runs if r["kind"] in ("jump", "outlier")]  # noqa: E731
        assert not values(inc(tuning), key) & values(inc(held), key)
    width = lambda runs: {(r.get("model", "mlp"), r.get("width", 32), r.get("depth", 2))  # noqa: E731
                          for r in runs}
    assert not width(tuning) & width(held)
    key = ("kind", "model", "opt", "lr", "batch", "width", "momentum", "at", "factor")
    sig = lambda runs: {tuple(r.get(k) for k in key) for r in runs}  # noqa: E731
    assert not sig(tuning) & sig(held)
    kinds = {r["kind"] for r in held}
    assert kinds >= {"healthy", "blowup0", "jump", "plateau", "sgd-high", "aeos", "outlier"}
    keras_kinds = {r["kind"] for r in held if r.get("model") == "keras"}
    assert {"healthy", "blowup0", "jump", "outlier"} <= keras_kinds
    assert sum(r.get("model") == "keras" for r in held) >= 10
    healthy = [r for r in held if r["kind"] == "healthy"]  # both regimes, not a token few
    assert len(healthy) >= len(held) // 5
    assert {r["batch"] is None for r in healthy} == {True, False}
