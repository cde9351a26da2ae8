"""The guard does no harm: nothing on healthy noisy training, bounded and reversible
adaptation, non-finite parameters caught, skipped batches remembered across a resume."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

from stablestep.guard import Guard, GuardError, GuardPolicy
from stablestep.guard.guard import skip_batches
from stablestep.lab import problems, scenarios
from stablestep.lab.train import make_optimizer
from tests.guard.conftest import blobs, mlp, regression_data, warm_restarts_run


@pytest.mark.parametrize("batch, lr", [(8, 1e-3), (32, 3e-2), (32, 1e-3)])
def test_noisy_minibatch_training_gets_no_rollback_or_adaptation(batch, lr):
    # the new user's report: default policy, MLP classifier, batch 32, Adam 1e-3 / 3e-2
    x, y = blobs(seed=batch)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    guard = Guard(model, opt)
    g = torch.Generator().manual_seed(3)
    for _ in range(400):
        i = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        if guard.check(loss):
            opt.step()
    s = guard.summary()
    assert s["rollbacks"] == 0 and s["adaptations"] == [] and s["lr_scale"] == 1.0, s
    assert set(s["skipped_by_reason"]) <= {"gradient-outlier"}  # at most a skip
    assert s["skipped"] <= 2, s
    assert not opt.param_groups[0]["amsgrad"]


def test_inf_weight_behind_a_saturated_tanh_is_rolled_back():
    # the loss and the gradients stay finite (tanh(inf) = 1, its derivative 0): only the
    # parameter check sees it
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=10))
    for t in range(60):
        if t == 33:
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if guard.check(loss):
            opt.step()
    (rb,) = [r for r in guard.records if r.action == "rollback"]
    assert rb.reason == "non-finite-state" and 33 <= rb.step <= 33 + 10
    assert rb.data["to_step"] <= 33
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_snapshot_holds_a_non_finite_parameter():
    # a weight turns Inf just after a state check and a snapshot falls due before the next
    # one: the snapshot must not keep it (it is the state read that lets a snapshot be
    # taken), so one rollback, to a snapshot from before the Inf, mends the model
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=15, state_check_every=10))
    for t in range(90):
        if t == 41:
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if guard.check(loss):
            opt.step()
    rbs = [r for r in guard.records if r.action == "rollback"]
    assert len(rbs) == 1, [(r.step, r.reason, r.data["to_step"]) for r in rbs]
    assert rbs[0].reason == "non-finite-state" and rbs[0].data["to_step"] <= 41
    assert 41 <= rbs[0].step <= 41 + 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    held = [s.model for s in guard._snaps]
    assert all(torch.isfinite(v).all() for sd in held for v in sd.values())


def test_lr_cut_is_bounded_then_the_guard_asks_for_a_person():
    # gradient descent at 25x the stable lr: halving to 1/4 (the floor) is not enough
    config = replace(scenarios.get("lr-divergence").base(), lr=1e-2, steps=300)
    pr = problems.build(config)
    opt = make_optimizer(config, pr.model.parameters())
    guard = Guard(pr.model, opt, policy=GuardPolicy(min_lr_scale=0.25, max_rollbacks=4))
    # it gives up either after max_rollbacks or once the loss stays high with the lr at
    # its floor, whichever the trajectory meets first; both ask for a person
    with pytest.raises(GuardError, match="the run needs a person"):
        for _ in range(config.steps):
            opt.zero_grad()
            loss = pr.loss()
            loss.backward()
            if guard.check(loss):
                opt.step()
    assert guard.lr_scale == 0.25  # never below the floor, however many rollbacks
    assert 1 <= guard.counts["rollback"] <= 4
    assert all(r.data["lr_scale"] >= 0.25 for r in guard.records if r.action == "adapt")


def test_lr_cut_is_restored_once_the_run_is_healthy(caplog):
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, policy=GuardPolicy(restore_after=50))
    guard.lr_scale = 0.125  # as after three cuts
    seen = []
    handle = guard.register_action_hook(seen.append)
    with caplog.at_level(logging.WARNING, logger="stablestep.guard"):
        for _ in range(120):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if guard.check(loss):
                opt.step()
        handle.remove()
        for _ in range(60):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if guard.check(loss):
                opt.step()
    restores = [r for r in guard.records if r.action == "restore"]
    assert [r.step for r in restores] == [49, 99, 149]  # every 50 calm steps
    assert guard.lr_scale == 1.0 and opt.param_groups[0]["lr"] == 1e-3
    assert seen == restores[:2]  # the hook saw each action until it was removed
    assert sum("restore (healthy)" in r.getMessage() for r in caplog.records) == 3


def test_skipped_batches_are_saved_and_skipped_on_resume():
    x, y = regression_data(n=256)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard = Guard(model, opt)
    data = [(torch.arange(k * 32, (k + 1) * 32) % 256, k) for k in range(80)]
    for t, (i, k) in enumerate(data):
        xb = x[i].clone()
        if k in (30, 61):
            xb[0, 0] = float("nan")  # two poisoned batches
        opt.zero_grad()
        loss = ((model(xb) - y[i]) ** 2).mean()
        loss.backward()
        if guard.check(loss, batch_id=k):
            opt.step()
        assert guard.step == t + 1
    state = guard.state_dict()
    assert state["bad_batches"] == [30, 61] == guard.summary()["bad_batches"]
    resumed = Guard(model, opt)
    resumed.load_state_dict(state)
    kept = [k for _, k in skip_batches(data, resumed.bad_batches, batch_id=lambda _, b: b[1])]
    assert len(kept) == 78 and 30 not in kept and 61 not in kept
    assert list(skip_batches(range(5), [1, 3])) == [0, 2, 4]
    with torch.no_grad():
        assert math.isfinite(float(((model(x) - y) ** 2).mean()))


@pytest.mark.parametrize("probe", [False, True])
def test_a_harder_data_phase_is_held_when_the_fixed_probe_batch_says_so(probe):
    # from step 150 the batches' targets are 30x larger: the loss jumps ~900x and stays;
    # the model did not diverge (its loss on a fixed batch of the old data barely moved)
    x, y = regression_data(n=256)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    closure = (lambda: ((model(x[:64]) - y[:64]) ** 2).mean()) if probe else None
    guard = Guard(model, opt, curvature_loss=closure, policy=GuardPolicy(snapshot_every=20))
    g = torch.Generator().manual_seed(0)
    for t in range(170):
        i = torch.randint(256, (32,), generator=g)
        opt.zero_grad()
        loss = ((model(x[i]) - (30.0 if t >= 150 else 1.0) * y[i]) ** 2).mean()
        loss.backward()
        if guard.check(loss):
            opt.step()
    acts = {(r.action, r.reason) for r in guard.records}
    if probe:
        assert ("hold", "divergence-not-on-probe-batch") in acts and guard.counts["rollback"] == 0
        hold = next(r for r in guard.records if r.action == "hold")
        assert hold.data["probe_loss"] < 2 * hold.data["probe_loss_at_snapshot"]
    else:
        assert ("rollback", "divergence") in acts  # without a probe batch, the loss decides


def test_warm_restarts_are_held_not_rolled_back():
    # the restarts bring the lr back to where the run trained: the loss rising after each
    # is the schedule, not a divergence to undo (without the exception: rollbacks, the lr
    # cut to 1/16 and a GuardError "the run needs a person" at the fourth restart)
    guard, final = warm_restarts_run(1e-2, seed=2, steps=500)
    s = guard.summary()
    assert s["rollbacks"] == 0 and s["adaptations"] == [] and s["lr_scale"] == 1.0, s
    holds = [r for r in guard.records if r.action == "hold"]
    assert holds and all(r.reason == "lr-schedule-restart" for r in holds)
    assert all(r.data["lr_jump"]["factor"] >= 2 and r.data["progress_lost"] < 0.5
               for r in holds)
    assert final < 0.05
    # with the exception off, the same run is rolled back until the guard gives up (the
    # rule is what holds it)
    try:
        off, _ = warm_restarts_run(1e-2, seed=2, steps=400,
                               guard_policy=GuardPolicy(restart_tolerance=None))
        acted = off.summary()["rollbacks"] >= 1
    except GuardError:
        acted = True
    assert acted


def test_restart_tolerance_is_validated():
    for bad in (0, -1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="restart_tolerance"):
            GuardPolicy(restart_tolerance=bad)
    assert GuardPolicy(restart_tolerance=None).restart_tolerance is None
