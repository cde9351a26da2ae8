"""One detector stack: what the Guard saw live is what ``diagnose`` replays from the store."""

from __future__ import annotations

import logging
import math

import torch

from stablestep.diagnosis import diagnose, load
from stablestep.diagnosis.core import incidents
from stablestep.diagnosis.stack import DetectorStack, replay
from stablestep.guard import Guard, GuardPolicy
from stablestep.telemetry import Monitor, names, open_run
from tests.guard.conftest import batches, mlp, regression_data

# the guard acts on these; "precursor" needs optimizer-state metrics the guard never reads
GUARD_KINDS = {"non-finite", "gradient-outlier", "spike", "divergence", "periodic-spikes"}


def _guarded_run(store, *, steps=200, state_every=None):
    x, y = regression_data(n=256)
    idx = batches(len(x), steps, batch=32)
    model = mlp(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # the user's schedule: lr jumps 300x at step 130 (the run diverges there)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 300.0 if 130 <= t < 150 else 1.0)
    with Monitor(model, opt, store=store, run="guarded", state_every=state_every) as monitor:
        guard = Guard(model, opt, monitor=monitor, policy=GuardPolicy(snapshot_every=20))
        for t, i in enumerate(idx):
            opt.zero_grad()
            xb, yb = x[i].clone(), y[i].clone()
            if t in (40, 41):
                xb[0, 0] = float("nan")
            if t == 90:
                yb = yb * 1e4
            loss = ((model(xb) - yb) ** 2).mean()
            loss.backward()
            monitor.observe(loss)
            if guard.check(loss, batch_id=f"b{t}"):
                opt.step()
            sched.step()
    return guard


def test_guard_live_stream_replayed_by_diagnose_gives_the_same_incidents(tmp_path, caplog):
    store = tmp_path / "runs.db"
    with caplog.at_level(logging.INFO, logger="stablestep.guard"):
        guard = _guarded_run(store)
    live = [(i.step, i.kind) for i in guard.incidents]
    kinds = {k for _, k in live}
    assert {"non-finite", "gradient-outlier", "divergence"} <= kinds, live
    replayed = [(i.step, i.kind) for i in incidents(str(store), run="guarded")]
    assert replayed == live  # what diagnose replays from the store is what the guard saw
    # every action: a log line, an event in the store, and in diagnose's evidence
    acts = guard.records
    assert {r.action for r in acts} >= {"skip", "rollback"}
    assert len([r for r in caplog.records if r.name == "stablestep.guard"]) == len(acts)
    events = [e for e in open_run(store, "guarded").events if e.kind == names.EVENT_GUARD]
    assert [e.data for e in events] == [r.to_dict() for r in acts]
    findings = diagnose(str(store))
    shown = [a for f in findings for a in f.evidence.get("guard_actions", [])]
    assert sorted((a["step"], a["action"]) for a in shown) == sorted(
        (r.step, r.action) for r in acts)
    # a rollback is taken only where diagnose finds a divergence
    div_steps = [f.step for f in findings if f.kind == "divergence"]
    for r in acts:
        if r.action == "rollback" and r.reason == "divergence":
            assert any(s <= r.step for s in div_steps), (r, div_steps)
    # the skipped batches are the ones named, recorded with the reason
    s = guard.summary()
    assert s["bad_batches"] == [r.data["batch"] for r in acts if r.action == "skip"]
    assert {"b40", "b90"} <= set(s["bad_batches"])
    assert s["rollbacks"] == guard.counts["rollback"] >= 1


def test_default_monitor_replay_differs_only_by_precursors(tmp_path):
    guard = _guarded_run(tmp_path / "r.db", steps=160, state_every=10)
    (trace,) = load(str(tmp_path / "r.db"), run="guarded")
    replayed = [(i.step, i.kind) for i in replay(trace).incidents if i.kind in GUARD_KINDS]
    assert replayed == [(i.step, i.kind) for i in guard.incidents]


def test_stack_save_load_continue_identically():
    g = torch.Generator().manual_seed(0)
    loss = (2.0 * torch.exp(-torch.arange(600) / 200.0) + 0.3) * torch.exp(
        0.05 * torch.randn(600, generator=g))
    loss[300:312] *= torch.exp(torch.arange(12) * 0.5)
    gn = torch.exp(0.1 * torch.randn(600, generator=g))
    gn[200] = 1e3
    feed = [(s, float(v), float(n)) for s, (v, n) in enumerate(zip(loss, gn, strict=True))]
    feed[150] = (150, math.nan, math.nan)
    a = DetectorStack()
    for s, v, n in feed[:305]:
        a.update(s, v, grad_norm=n)
    b = DetectorStack()
    b.load_state_dict(a.state_dict())
    for s, v, n in feed[305:]:
        assert a.update(s, v, grad_norm=n) == b.update(s, v, grad_norm=n)
    assert a.incidents == b.incidents
    assert {"non-finite", "gradient-outlier", "spike"} <= {i.kind for i in a.incidents}
