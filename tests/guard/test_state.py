"""Save -> load -> continue identically, through skips, rollbacks and adaptations."""

from __future__ import annotations

import io

import torch

from stablestep.diagnosis.stack import OutlierConfig, StackConfig
from stablestep.guard import Guard, GuardPolicy
from tests.guard.conftest import mlp, regression_data

POLICY = GuardPolicy(snapshot_every=10, stack=StackConfig(outlier=OutlierConfig(warmup=5)),
                     remedies=("lr",))


def _objects():
    model = mlp(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # the user's schedule: lr jumps 300x at step 130 (the run diverges there)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 300.0 if t >= 130 else 1.0)
    return model, opt, sched, Guard(model, opt, policy=POLICY)


def _run(model, opt, sched, guard, x, y, steps):
    for t in steps:
        opt.zero_grad()
        xb = x.clone()
        if t in (25, 120):
            xb[3, 1] = float("nan")
        yb = y * 1e4 if t == 90 else y
        loss = ((model(xb) - yb) ** 2).mean()
        loss.backward()
        if guard.check(loss):
            opt.step()
        sched.step()


def _save(*objs) -> bytes:
    buf = io.BytesIO()
    torch.save([o.state_dict() for o in objs], buf)
    return buf.getvalue()


def test_save_load_continue_identically():
    x, y = regression_data(n=128)
    a = _objects()
    _run(*a, x, y, range(0, 100))
    blob = _save(*a)
    _run(*a, x, y, range(100, 220))

    b = _objects()
    for obj, sd in zip(b, torch.load(io.BytesIO(blob), weights_only=False), strict=True):
        obj.load_state_dict(sd)
    _run(*b, x, y, range(100, 220))

    ga, gb = a[3], b[3]
    actions = {(r.action, r.reason) for r in ga.records}
    assert {("skip", "non-finite"), ("skip", "gradient-outlier"), ("rollback", "divergence"),
            ("adapt", "after-rollback")} <= actions  # the checkpoint is crossed by all kinds
    assert any(r.action == "rollback" and r.step > 100 for r in ga.records)
    assert [r.to_dict() for r in ga.records] == [r.to_dict() for r in gb.records]
    assert ga.counts == gb.counts and ga.lr_scale == gb.lr_scale < 1.0
    assert ga.snapshots == gb.snapshots and ga.step == gb.step == 220
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    # the optimizer holds the user's lr, the guard its scale: a resume cannot compound them
    assert sb["param_groups"][0]["lr"] == b[2].get_last_lr()[0]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])


def test_a_saved_state_keeps_its_snapshots_when_the_guard_reuses_their_buffers():
    x, y = regression_data(n=64)
    model = mlp(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=5, keep_snapshots=2))

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if guard.check(loss):
                opt.step()

    steps(12)
    saved = guard.state_dict()
    frozen = [{k: v.clone() for k, v in s["model"].items()} for s in saved["snapshots"]]
    steps(20)  # four more snapshots, written into the buffers of the dropped ones
    assert guard.snapshots == [25, 30]
    for snap, ref in zip(saved["snapshots"], frozen, strict=True):
        assert all(torch.equal(snap["model"][k], v) for k, v in ref.items())
    live = guard._snaps[-1]  # a copy of step 30's state, never an alias of the model
    assert not any(live.model[k].data_ptr() == v.data_ptr()
                   for k, v in model.state_dict().items())


def test_save_load_continue_identically_across_warm_restarts():
    # the schedule-restart hold reads the lr history, the first and the recent losses:
    # all of it goes into the state, so a resume holds (and never acts) where the
    # uninterrupted run does
    from tests.guard.conftest import blobs

    x, y = blobs(seed=2, n=1024, flip=0.0)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(len(x), (32,), generator=g) for _ in range(420)]

    def objects():
        torch.manual_seed(2)
        nn = torch.nn
        model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100,
                                                                     eta_min=1e-5)
        return model, opt, sched, Guard(model, opt)

    def run(model, opt, sched, guard, steps):
        for t in steps:
            i = batches[t]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()
            if guard.check(loss):
                opt.step()
            sched.step()

    a = objects()
    run(*a, range(0, 290))
    blob = _save(*a)
    run(*a, range(290, 420))
    b = objects()
    for obj, sd in zip(b, torch.load(io.BytesIO(blob), weights_only=False), strict=True):
        obj.load_state_dict(sd)
    run(*b, range(290, 420))
    ga, gb = a[3], b[3]
    assert [r.to_dict() for r in ga.records] == [r.to_dict() for r in gb.records]
    assert ga.counts.get("rollback", 0) == 0
    assert any(r.action == "hold" and r.reason == "lr-schedule-restart" and r.step > 290
               for r in ga.records)  # the resumed part holds at a restart
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q)
