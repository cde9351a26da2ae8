"""The Monitor with curvature on trains a Hugging Face GPT-2 (sdpa attention) without error."""

from __future__ import annotations

import math

from stablestep.telemetry import Monitor, names
from stablestep.telemetry.store import open_run
from tests.curvature.gpt2 import tiny_gpt2


def test_monitor_with_curvature_trains_gpt2_sdpa(tmp_path):
    model, loss_fn, opt = tiny_gpt2(seed=1)
    mon = Monitor(model, opt, store=tmp_path / "s.db", run="gpt2", state_every=None,
                  curvature_every=3, curvature_loss=loss_fn)
    for _ in range(7):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        mon.observe(loss)
        opt.step()
    mon.close()
    run = open_run(tmp_path / "s.db", "gpt2")
    steps, sharp = run.series(names.SHARPNESS)
    assert list(steps) == [0, 3, 6] and all(math.isfinite(x) and x > 0 for x in sharp)
    _, pre = run.series(names.PRECOND_SHARPNESS)
    assert len(pre) == 3 and all(math.isfinite(x) and x > 0 for x in pre)
    _, secs = run.series(names.CURV_SECONDS)
    assert len(secs) == 3 and all(s > 0 for s in secs)
    assert mon._probe.backend == "math"  # the flash kernel's missing double backward


def test_a_failed_estimate_is_an_event_and_training_goes_on(tmp_path):
    model, loss_fn, opt = tiny_gpt2(seed=2)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("probe batch missing")
        return loss_fn()

    mon = Monitor(model, opt, store=tmp_path / "s.db", run="r", state_every=None,
                  curvature_every=2, curvature_loss=flaky)
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        mon.observe(loss)
        opt.step()
    mon.close()
    run = open_run(tmp_path / "s.db", "r")
    events = [e for e in run.events if e.kind == names.EVENT_CURVATURE]
    assert len(events) == 1 and events[0].step == 0
    assert "RuntimeError: probe batch missing" in events[0].data["error"]
    steps, _ = run.series(names.SHARPNESS)
    assert list(steps) == [2]
