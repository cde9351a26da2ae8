"""Validation messages, Monitor events, and the public names."""

from __future__ import annotations

import pytest
import torch

from stablestep.diagnosis.detectors import SpikeConfig
from stablestep.diagnosis.stack import StackConfig
from stablestep.guard import Guard, GuardPolicy, GuardRecord
from stablestep.telemetry import Monitor, names, open_run
from tests.guard.conftest import mlp, regression_data


@pytest.mark.parametrize("kwargs, message", [
    ({"outlier_action": "drop"},
     "Invalid outlier_action: 'drop' (expected 'skip', 'clip' or None)"),
    ({"clip_z": -1.0}, "Invalid clip_z: -1.0 (need > 0)"),
    ({"snapshot_every": 0}, "Invalid snapshot_every: 0 (need an int >= 1)"),
    ({"keep_snapshots": 1.5}, "Invalid keep_snapshots: 1.5 (need an int >= 1)"),
    ({"adapt_after": True}, "Invalid adapt_after: True (need an int >= 1)"),
    ({"max_rollbacks": -1}, "Invalid max_rollbacks: -1 (need an int >= 0 or None)"),
    ({"restore_after": 0}, "Invalid restore_after: 0 (need an int >= 1 or None)"),
    ({"lr_backoff": 1.0}, "Invalid lr_backoff: 1.0 (need 0 < lr_backoff < 1)"),
    ({"min_lr_scale": 0.0}, "Invalid min_lr_scale: 0.0 (need 0 < min_lr_scale <= 1)"),
    ({"remedies": ("amsgrad", "warmup")},
     "Invalid remedy: 'warmup' (expected one of 'amsgrad', 'eps', 'lr')"),
    ({"remedies": "lr"}, "Invalid remedies: 'lr' (need a tuple of names)"),
])
def test_policy_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        GuardPolicy(**kwargs)
    assert str(err.value) == message


def test_policy_is_keyword_only_and_round_trips():
    with pytest.raises(TypeError):
        GuardPolicy(True)  # noqa: FBT003
    p = GuardPolicy(outlier_action=None, stack=StackConfig(spike=SpikeConfig(window=20)),
                    remedies=("lr",))
    assert GuardPolicy.from_dict(p.to_dict()) == p


def test_guard_argument_errors():
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        Guard([], opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        Guard(model, {})
    with pytest.raises(TypeError, match="policy must be a GuardPolicy, got dict"):
        Guard(model, opt, policy={"outlier_z": 3})
    with pytest.raises(TypeError, match="monitor must have a record_event"):
        Guard(model, opt, monitor=object())
    with pytest.raises(TypeError, match="curvature_loss must be a callable"):
        Guard(model, opt, curvature_loss=1.0)


def test_actions_are_monitor_events(tmp_path):
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    store = tmp_path / "runs.db"
    with Monitor(model, opt, store=store, run="guarded", state_every=None) as monitor:
        guard = Guard(model, opt, monitor=monitor)
        for t in range(30):
            opt.zero_grad()
            xb = x.clone()
            if t == 12:
                xb[0, 0] = float("inf")
            loss = ((model(xb) - y) ** 2).mean()
            loss.backward()
            monitor.observe(loss)
            if guard.check(loss):
                opt.step()
    events = [e for e in open_run(store, "guarded").events if e.kind == names.EVENT_GUARD]
    assert len(events) == 1 and events[0].step == 12
    assert events[0].data == guard.records[0].to_dict()
    assert events[0].data["action"] == "skip" and events[0].data["reason"] == "non-finite"
    assert isinstance(guard.records[0], GuardRecord)


def test_public_name():
    import stablestep.guard as g

    assert g.Guard.__doc__ and g.GuardPolicy.__doc__ and g.GuardRecord.__doc__
    assert {"Guard", "GuardPolicy", "GuardRecord", "GuardError"} <= set(g.__all__)


def test_public_start_step_numbers_monitor_and_guard_alike(tmp_path):
    from stablestep.telemetry import Monitor, open_run

    x, y = regression_data(n=32)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Monitor(model, opt, store=tmp_path / "s.db", run="r", start_step=1) as mon:
        guard = Guard(model, opt, monitor=mon, start_step=1)
        assert mon.start_step == guard.start_step == 1 and mon.step == guard.step == 1
        for t in range(5):
            opt.zero_grad()
            xb = x.clone()
            if t == 2:
                xb[0, 0] = float("nan")
            loss = ((model(xb) - y) ** 2).mean()
            loss.backward()
            mon.observe(loss)
            if guard.check(loss):
                opt.step()
        guard.close()
    steps, _ = open_run(tmp_path / "s.db", "r").series("loss")
    assert steps.tolist() == [1, 2, 4, 5]  # step 3 (the NaN batch) is an event, not a number
    assert [(r.step, r.action) for r in guard.records] == [(3, "skip")]
    assert guard.bad_batches == [3]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="start_step"):
            Guard(model, opt, start_step=bad)
        with pytest.raises(ValueError, match="start_step"):
            Monitor(model, opt, store=tmp_path / "t.db", start_step=bad)
