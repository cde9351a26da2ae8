"""One finding per regime, and a new one per cause (``diagnosis.infer.fold``): full-batch
gradient descent above its stable lr catapults again at the same lr (one finding); an lr
jump later in a run already called lr-too-high is a cause of its own (its own finding)."""

from __future__ import annotations

import numpy as np

from stablestep.diagnosis import diagnose_trace, from_series


def _smooth(n: int, seed: int, noise: float = 0.005) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.exp(-np.arange(n) / 300) + 0.2) * np.exp(noise * rng.standard_normal(n))


def test_full_batch_sgd_spikes_at_one_lr_are_one_finding():
    loss = _smooth(300, 0)
    for s in (100, 200):  # two catapults that come back
        loss[s:s + 6] *= np.exp(np.array([0.8, 1.6, 1.2, 0.6, 0.2, 0.0]))
    hyper = {"kind": "sgd", "full_batch": True, "momentum": 0.0}
    lr = (np.arange(300), np.full(300, 0.5))
    fs = diagnose_trace(from_series(np.arange(300), loss, hyper=hyper, metrics={"lr": lr}))
    assert len(fs) == 1 and fs[0].mechanism == "lr-too-high", [(f.step, f.kind) for f in fs]
    assert 195 <= max(fs[0].evidence["follow_on_alarms"]) <= 205


def test_an_lr_jump_in_a_run_already_too_high_is_its_own_finding():
    rng = np.random.default_rng(1)
    n = 300
    loss = 1.5 * np.exp(0.1 * rng.standard_normal(n))
    loss[0], loss[1] = 1.0, 4.0  # a blow-up at step 1 that comes back (a noisy first batch)
    loss[150:] *= 10.0  # the lr jumps x100 at step 150: the loss jumps and stays
    lr = np.where(np.arange(n) >= 150, 0.1, 1e-3)
    hyper = {"kind": "adam", "full_batch": False}
    fs = diagnose_trace(from_series(np.arange(n), loss, hyper=hyper,
                                    metrics={"lr": (np.arange(n), lr)}))
    later = [f for f in fs if f.step >= 140]
    assert later and later[0].mechanism == "lr-too-high", [(f.step, f.kind) for f in fs]
    assert later[0].evidence["lr_jump"]["factor"] >= 50
