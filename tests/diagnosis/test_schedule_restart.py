"""A warm restart is the user's schedule, not an incident: the one test the Guard holds on
and ``diagnose`` drops a divergence by (``stablestep.diagnosis.infer.held_by_schedule``)."""

from __future__ import annotations

import math

import pytest
import torch

from stablestep import diagnose
from stablestep.diagnosis.infer import RESTART_TOLERANCE, lr_restart, progress_lost
from stablestep.guard import GuardPolicy
from tests.guard.conftest import warm_restarts_run


def _highest(steps, lrs):
    def before(st):
        prev = [v for s, v in zip(steps, lrs, strict=True) if s < st]
        return max(prev) if prev else None
    return before


def test_lr_restart_is_a_return_to_an_lr_the_run_trained_at():
    t = list(range(300))
    sgdr = [1e-2 * (0.5 * (1 + math.cos(math.pi * (s % 100) / 100))) + 1e-5 for s in t]
    at = 205  # five steps after the second restart
    r = lr_restart(t[:at + 1], sgdr[:at + 1], _highest(t, sgdr))
    assert r is not None and r["step"] in (100, 200) and r["factor"] >= 2
    assert r["to"] <= 1e-2 + 1e-5
    # a jump to a new, higher lr (the lr x10 at step 150) is not a restart
    jump = [1e-3] * 150 + [1e-2] * 150
    assert lr_restart(t[:160], jump[:160], _highest(t, jump)) is None
    # nor a decaying lr, nor the warm-up's first rise (no higher lr before its low)
    decay = [1e-2 * 0.99 ** s for s in t]
    assert lr_restart(t[:200], decay[:200], _highest(t, decay)) is None
    warm = [1e-4 * (s + 1) for s in t]
    assert lr_restart(t[:50], warm[:50], _highest(t, warm)) is None


def test_progress_lost_is_the_share_of_the_descent_given_back():
    assert progress_lost([2.0] * 5, [0.6] * 10, level=0.2) == pytest.approx(0.4 / 1.8)
    assert progress_lost([2.0] * 5, [2.2] * 10, level=0.2) > 1  # back past the start
    assert progress_lost([0.1] * 5, [0.3] * 10, level=0.2) == math.inf  # no progress made
    assert progress_lost([], [0.3], level=0.2) == math.inf


def test_warm_restarts_are_no_finding_and_a_new_lr_still_is(tmp_path):
    torch.set_num_threads(1)
    store = tmp_path / "s.db"
    warm_restarts_run(1e-2, seed=2, steps=500, guard=False, store=store)
    findings = diagnose(store)
    assert not [f for f in findings if f.kind == "divergence"], \
        [(f.kind, f.step, f.mechanism) for f in findings]
    # the same numbers hold the guard: no rollback, the holds carry the same evidence
    guard, _ = warm_restarts_run(1e-2, seed=2, steps=500)
    holds = [r for r in guard.records if r.action == "hold"]
    assert holds and guard.summary()["rollbacks"] == 0
    assert all(r.data["progress_lost"] < RESTART_TOLERANCE for r in holds)
    assert GuardPolicy().restart_tolerance == RESTART_TOLERANCE  # one default
