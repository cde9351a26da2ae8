"""Skipping: NaN never reaches Adam's moments; an outlier batch is dropped exactly."""

from __future__ import annotations

import math

import torch

from stablestep.guard import Guard, GuardPolicy
from tests.guard.conftest import batches, mlp, regression_data


def _train(model, opt, guard, x, y, idx, *, nan_at=(), outlier_at=(), drop=()):
    losses = []
    for t, i in enumerate(idx):
        if t in drop:
            continue
        xb, yb = x[i].clone(), y[i].clone()
        if t in nan_at:
            xb[0, 0] = float("nan")
        if t in outlier_at:
            yb = yb * 1000.0
        opt.zero_grad()
        loss = ((model(xb) - yb) ** 2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        if guard is None or guard.check(loss):
            opt.step()
    return losses


def test_nan_injected_run_keeps_training_and_ends_finite():
    x, y = regression_data()
    idx = batches(len(x), 300)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = Guard(model, opt)
    nan_at = {50, 51, 120, 250}
    losses = _train(model, opt, guard, x, y, idx, nan_at=nan_at)
    skips = [r for r in guard.records if r.action == "skip"]
    assert [r.step for r in skips] == sorted(nan_at)
    assert all(r.reason == "non-finite" for r in skips)
    assert guard.counts["skip"] == 4 and guard.counts["rollback"] == 0
    for state in opt.state.values():  # no NaN ever got into the moments
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
        assert int(state["step"]) == 300 - len(nan_at)
    clean = mlp()
    opt_c = torch.optim.Adam(clean.parameters(), lr=3e-3)
    _train(clean, opt_c, None, x, y, idx)
    with torch.no_grad():
        final = float(((model(x) - y) ** 2).mean())
        ref = float(((clean(x) - y) ** 2).mean())
    assert math.isfinite(final) and final < 0.2 * losses[0] and final < 1.5 * ref
    # the same run without the guard is NaN from the first injection on
    model0 = mlp()
    opt0 = torch.optim.Adam(model0.parameters(), lr=3e-3)
    _train(model0, opt0, None, x, y, idx[:60], nan_at=nan_at)
    assert not all(torch.isfinite(p).all() for p in model0.parameters())


def test_outlier_batch_is_skipped_and_the_run_matches_the_run_without_it():
    x, y = regression_data()
    idx = batches(len(x), 200)
    a, b = mlp(), mlp()
    opt_a = torch.optim.Adam(a.parameters(), lr=3e-3)
    opt_b = torch.optim.Adam(b.parameters(), lr=3e-3)
    guard = Guard(a, opt_a)
    _train(a, opt_a, guard, x, y, idx, outlier_at={120})
    _train(b, opt_b, None, x, y, idx, drop={120})
    assert [(r.step, r.action, r.reason) for r in guard.records] == [
        (120, "skip", "gradient-outlier")]
    assert guard.records[0].data["z"] >= 6.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_clip_instead_of_skip_scales_the_gradient_to_the_running_bound():
    x, y = regression_data()
    idx = batches(len(x), 120)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy=GuardPolicy(outlier_action="clip", clip_z=3.0))
    _train(model, opt, guard, x, y, idx[:100])
    i = idx[100]
    opt.zero_grad()
    loss = ((model(x[i]) - 1000.0 * y[i]) ** 2).mean()
    loss.backward()
    assert guard.check(loss) is True
    (rec,) = guard.records
    assert (rec.action, rec.reason) == ("clip", "gradient-outlier")
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    expected = math.exp(math.log(rec.data["median"]) + 3.0 * rec.data["sigma"])
    assert math.isclose(norm, expected, rel_tol=1e-5)
    assert math.isclose(rec.data["clip_to"], expected, rel_tol=1e-12)


def test_a_stable_run_gets_no_action():
    x, y = regression_data()
    idx = batches(len(x), 800)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=50))
    _train(model, opt, guard, x, y, idx)
    assert guard.records == []
    assert guard.counts == {"skip": 0, "clip": 0, "rollback": 0, "adapt": 0, "restore": 0,
                            "spike": 0}
    assert guard.summary()["skipped"] == 0 and guard.summary()["lr_scale"] == 1.0
    snaps = guard.snapshots  # kept every 50 calm steps, two at most
    assert len(snaps) == 2 and snaps[1] - snaps[0] >= 50 and snaps[1] >= 700
