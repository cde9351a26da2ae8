"""Runs with known causes: mechanism, detection step, computed remedies.

The runs are trained here (benchmarks/labeled.py, recorded by the Monitor into a store);
the curvature they carry comes from stablestep.curvature, and the remedies are checked
against the stability theory (an eps/lr recomputed from the recorded numbers, and a
re-run showing the remedy removes the instability), not against our own output. The
trajectories are chaotic (another CPU rounds differently), so the tests assert invariants:
the mechanism of every finding, at least N spikes, ranges; injected faults are at known
steps.
"""

import math

import pytest
import torch
from benchmarks.labeled import make_run

from stablestep.diagnosis import diagnose_trace
from stablestep.telemetry import names


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _remedy(f, action):
    return next(r for r in f.remedies if r.action == action)


def test_adaptive_edge_of_stability_is_a_periodic_finding_with_eps_and_amsgrad():
    run = make_run("adaptive-edge-of-stability", seed=0, width=64, act="gelu", steps=900)
    findings = diagnose_trace(run.trace)
    periodic = [f for f in findings if f.kind == "periodic-spikes"]
    assert periodic, [(f.kind, f.step) for f in findings]
    assert {f.mechanism for f in findings} <= {"adaptive-edge-of-stability", "unknown"}
    f = periodic[0]
    assert f.mechanism == "adaptive-edge-of-stability"
    assert f.evidence["n_spikes"] >= 4
    # the detector fires within a step of the labelled onset for most spikes
    labels = [s for s, _ in run.events]
    delays = [min((d - s for d in f.evidence["detected_steps"] if -2 <= d - s <= 20),
                  default=None) for s in labels]
    found = [d for d in delays if d is not None]
    assert len(found) >= 0.7 * len(labels)
    assert sorted(found)[len(found) // 2] <= 1
    # preconditioned sharpness measured at/above 90% of (2+2b1)/(1-b1) = 38
    assert f.evidence[names.PRECOND_THRESHOLD] == pytest.approx(38.0)
    assert f.evidence[names.PRECOND_SHARPNESS] >= 0.9 * 38.0
    # eps from the recorded numbers: eps >= lr_t * lam_max(H) * (1-b1)/(2+2b1)
    eps = _remedy(f, "set-eps").value
    lr_t = 1e-2 / (1 - 0.9 ** f.step)
    expect = lr_t * f.evidence[names.SHARPNESS] * 0.1 / 3.8
    assert expect <= eps <= expect * 1.1
    assert eps > 1e-8
    assert _remedy(f, "amsgrad").value is True
    # telemetry warned before the loss rose (precond. sharpness over 38, or g^2/v_hat)
    assert f.evidence["early_warning"]["lead_steps"] >= 1
    assert _remedy(f, "set-lr").value < 1e-2


def test_the_computed_eps_removes_the_spikes():
    """The remedy is checked by re-training: same run with the computed eps spikes far less."""
    base = make_run("adaptive-edge-of-stability", seed=0, width=64, act="gelu", steps=900,
                    curvature_every=10)
    f = next(f for f in diagnose_trace(base.trace) if f.kind == "periodic-spikes")
    eps = _remedy(f, "set-eps").value
    from benchmarks.labeled import _data, _model, label_spikes

    from stablestep.diagnosis.trace import Trace

    x, y = _data(0)
    model = _model(0, 64, "gelu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps)
    losses = []
    for _ in range(900):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    fixed = Trace(steps=list(range(900)), loss=losses)
    assert len(label_spikes(fixed)) <= len(base.events) // 4


def test_lr_above_gd_bound_is_lr_too_high_with_largest_stable_lr():
    run = make_run("lr-too-high", seed=1)  # heavy ball, mu = 0.9
    onset = run.events[0][0]
    findings = [f for f in diagnose_trace(run.trace) if f.step >= onset - 5]
    assert findings  # (heavy ball's early overshoot, before the lr change, aside)
    assert {g.mechanism for g in findings} == {"lr-too-high"}
    f = findings[0]
    assert f.mechanism == "lr-too-high"
    assert onset - 2 <= f.evidence["detected_at"] <= onset + 1
    assert f.evidence["lr_sharpness_ratio"] > 1.0
    # GD with heavy ball is stable iff lr * lam_max(H) < 2 + 2mu
    lam = f.evidence[names.SHARPNESS]
    assert _remedy(f, "set-lr").value == pytest.approx(0.9 * 3.8 / lam, rel=0.02)


def test_outlier_batches_blame_the_batch_not_adam():
    run = make_run("gradient-outlier", seed=0)
    findings = diagnose_trace(run.trace)
    assert {s for s, _ in run.events} <= {f.step for f in findings}  # each injected batch
    for f in findings:
        assert f.mechanism == "gradient-outlier"
        assert f.evidence["detected_at"] == f.step
        assert f.evidence["grad_norm_z"] >= 6
        clip = _remedy(f, "clip-grad-norm").value
        assert 0 < clip < f.evidence["grad_norm"]
        assert _remedy(f, "skip-batch").value == f.step
        assert not any(r.action in ("set-eps", "amsgrad") for r in f.remedies)
        assert f.evidence.get("early_warning", {"lead_steps": 0})["lead_steps"] == 0


def test_overflow_is_non_finite_with_restore_point():
    run = make_run("non-finite", seed=1)
    findings = diagnose_trace(run.trace)
    assert {s for s, _ in run.events} <= {f.step for f in findings}  # each injected overflow
    assert {(f.kind, f.mechanism) for f in findings} == {("non-finite", "non-finite")}
    for f in findings:
        assert _remedy(f, "restore").value == f.step - 1
        # an fp32 run (the Monitor records the dtypes): no precision advice (#11), the NaN's origin
        assert not any(r.action == "loss-scaling" for r in f.remedies)
        assert "keep_batch" in str(_remedy(f, "find-origin").value)  # our replay, not anomaly mode
        assert not any(r.action in ("amsgrad", "set-lr") for r in f.remedies)


def test_stable_run_has_no_finding():
    run = make_run("stable", seed=2, width=64, act="gelu")
    # the fixed run: no labelled spike, and the diagnosis raises nothing beyond the labels
    assert len(diagnose_trace(run.trace)) <= len(run.events) <= 1


def test_findings_serialise_to_the_json_contract():
    import json

    run = make_run("gradient-outlier", seed=1)
    d = diagnose_trace(run.trace)[0].to_dict()
    assert set(d) == {"step", "kind", "mechanism", "confidence", "evidence", "remedies"}
    assert set(d["remedies"][0]) == {"action", "value", "why"}
    json.dumps(d, allow_nan=False)
    assert not math.isnan(d["confidence"])


def test_make_run_validates_its_arguments():
    with pytest.raises(ValueError, match="Invalid cause: 'oops'"):
        make_run("oops")
    with pytest.raises(ValueError, match="Invalid steps: 100"):
        make_run("non-finite", steps=100)


@pytest.mark.parametrize("start,expect", [(100, "lr-too-high"),
                                          (5000, "adaptive-edge-of-stability")])
def test_adam_blow_up_is_lr_too_high_only_while_v_is_fresh(start, expect):
    """Same numbers, different age: before 1/(1-b2) = 1000 steps v_hat cannot be stale."""
    import numpy as np

    from stablestep.diagnosis import Trace

    steps = np.arange(start, start + 120)
    loss = np.r_[np.linspace(1.0, 0.8, 100), 0.8 * 1.5 ** np.arange(1, 21)]
    ps = np.where(steps >= start + 95, 60.0, 30.0)
    trace = Trace(steps=steps, loss=loss, metrics={
        names.PRECOND_SHARPNESS: ps, names.PRECOND_THRESHOLD: np.full(120, 38.0),
        names.SHARPNESS: np.full(120, 500.0)},
        hyper={"kind": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8})
    (f,) = diagnose_trace(trace)
    assert (f.kind, f.mechanism) == ("divergence", expect)
    lr = _remedy(f, "set-lr").value
    assert lr == pytest.approx(0.9 * 1e-3 * 38 / 60, rel=0.02)


def test_lr_remedy_for_nesterov_sgd_uses_nesterovs_bound_checked_on_torch():
    """SGD momentum 0.9 with Nesterov is stable only below lr*lam = 3.8/2.8 = 1.357 (not
    heavy ball's 3.8): torch's own SGD on a quadratic diverges just above, converges below,
    and the diagnosis' lr lies under it."""
    import numpy as np

    from stablestep.diagnosis import Trace

    lam = 50.0

    def final(lr):
        w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=lr, momentum=0.9, nesterov=True)
        for _ in range(2000):
            opt.zero_grad()
            (0.5 * lam * w.square()).sum().backward()
            opt.step()
        return abs(float(w.detach()))

    bound = 3.8 / 2.8
    assert final(0.98 * bound / lam) < 1e-3 and final(1.02 * bound / lam) > 1e3
    steps = np.arange(120)
    loss = np.r_[np.linspace(1.0, 0.8, 100), 0.8 * 1.5 ** np.arange(1, 21)]
    trace = Trace(steps=steps, loss=loss, metrics={names.SHARPNESS: np.full(120, lam)},
                  hyper={"kind": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True})
    (f,) = diagnose_trace(trace)
    assert f.mechanism == "lr-too-high"
    assert f.evidence[names.GD_THRESHOLD] == pytest.approx(bound)
    lr = _remedy(f, "set-lr").value
    assert 0.8 * bound / lam < lr < bound / lam
