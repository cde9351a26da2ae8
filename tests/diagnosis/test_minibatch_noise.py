"""Minibatch noise is not an incident; real incidents still are, at their first step."""

from __future__ import annotations

import numpy as np

from stablestep.diagnosis.core import diagnose_trace
from stablestep.diagnosis.spike import SpikeConfig, SpikeDetector
from stablestep.diagnosis.stack import DetectorStack, replay
from stablestep.diagnosis.trace import Trace


def _noisy(n=400, seed=0, sigma=0.15):
    """A falling minibatch loss with heavy-tailed batch-to-batch spread: lognormal noise
    plus an occasional hard batch 2-3x the level."""
    rng = np.random.default_rng(seed)
    level = 0.1 + 2.0 * np.exp(-np.arange(n) / 60)
    loss = level * np.exp(sigma * rng.standard_normal(n))
    hard = rng.random(n) < 0.03
    loss[hard] *= rng.uniform(2.0, 3.0, hard.sum())
    return loss


def _alarms(loss, **cfg):
    det = SpikeDetector(SpikeConfig(**cfg))
    return [a for s, v in enumerate(loss) if (a := det.update(s, float(v)))]


def test_noise_gate_keeps_hard_batches_out_and_real_spikes_in():
    gated = sum(len(_alarms(_noisy(seed=s))) for s in range(10))
    ungated = sum(len(_alarms(_noisy(seed=s), mad_z=0.0)) for s in range(10))
    assert gated < ungated / 3  # the gate speaks where batches are noisy
    assert gated <= 2
    loss = _noisy(seed=1)
    loss[250] *= 40.0  # a corrupted batch: far outside the spread
    assert any(a.step == 250 for a in _alarms(loss))
    smooth = np.r_[np.linspace(1.0, 0.3, 100), np.full(200, 0.3)]
    smooth[150:153] *= [1.15, 1.3, 1.15]  # full batch: no spread, a 30% spike counts
    assert len(_alarms(smooth)) == 1


def test_noise_gate_state_round_trips():
    loss = _noisy(seed=2)
    a, b = SpikeDetector(), SpikeDetector()
    for s, v in enumerate(loss[:150]):
        a.update(s, float(v))
    b.load_state_dict(a.state_dict())
    rest = [(a.update(s, float(v)), b.update(s, float(v)))
            for s, v in enumerate(loss[150:], start=150)]
    assert all(x == y for x, y in rest)


def test_one_hard_batch_is_no_finding_only_where_the_run_says_minibatch():
    loss = np.r_[np.linspace(2.0, 0.5, 60), np.full(140, 0.5)]
    loss[120] = 2.0  # one batch 4x the level, back at once; no gradient, lr or curvature
    minibatch = Trace(np.arange(loss.size), loss, hyper={"kind": "adam", "full_batch": False})
    foreign = Trace(np.arange(loss.size), loss, hyper={"kind": "adam"})
    assert not diagnose_trace(minibatch)
    assert any(f.step == 120 for f in diagnose_trace(foreign))


def test_blowup_from_the_first_step_is_alarmed_at_once():
    loss = np.r_[[5.4, 48.8, 170.0], np.full(30, 60.0)]
    stack = DetectorStack()
    first = next(i for s, v in enumerate(loss) for i in stack.update(s, float(v)))
    assert first.step <= 2 and first.onset <= 1  # not after the 10-record hold
    fs = diagnose_trace(Trace(np.arange(loss.size), loss, hyper={"kind": "adam"}))
    assert len(fs) == 1 and fs[0].kind == "divergence"
    assert fs[0].evidence["detected_at"] <= 2
    assert [i.kind for i in replay(Trace(np.arange(loss.size), loss)).incidents
            if i.rule == "jump"][-1] == "divergence"


def test_late_explosion_of_full_batch_adam_is_the_edge_of_stability():
    loss = np.r_[np.geomspace(1.0, 1e-5, 400), 1e-5 * 1.8 ** np.arange(1, 25)]
    tr = Trace(np.arange(loss.size), loss,
               hyper={"kind": "adam", "beta1": 0.9, "beta2": 0.999, "lr": 1e-2,
                      "full_batch": True})
    fs = diagnose_trace(tr)
    assert fs and fs[-1].kind == "divergence"
    assert fs[-1].mechanism == "adaptive-edge-of-stability"
    with_jump = Trace(tr.steps, loss, hyper={**tr.hyper},
                      metrics={"lr": np.r_[np.full(400, 1e-2), np.full(24, 1.0)]})
    assert diagnose_trace(with_jump)[-1].mechanism == "lr-too-high"


def test_a_corrupted_batch_without_gradient_norm_is_still_a_finding():
    loss = np.r_[np.linspace(2.0, 0.5, 60), np.full(140, 0.5)]
    loss[120] = 0.5 * 40  # the loss alone shows it (Keras records no gradient norm here)
    tr = Trace(np.arange(loss.size), loss, hyper={"kind": "adam", "full_batch": False})
    assert any(f.step == 120 for f in diagnose_trace(tr))


def test_non_finite_gradients_recorded_every_tenth_step_are_one_incident():
    from stablestep.telemetry import names

    n = 60
    loss = np.full(n, 1.0)
    gnf = np.full(n, np.nan)
    gnf[::10] = 0.0
    gnf[20::10] = 5.0  # from step 20 on, every recorded step holds non-finite gradients
    tr = Trace(np.arange(n), loss, metrics={names.GRAD_NONFINITE: gnf})
    nf = [i for i in replay(tr).incidents if i.kind == "non-finite"]
    assert len(nf) == 1 and nf[0].step == 20


def _blowup_with_marks(nan_loss_at: int | None = None, guard_at: int | None = None) -> Trace:
    """SGD blown up at step 1 (loss 2 -> ~80 and staying), the parameters non-finite from
    step 10 on, seen at each detailed step (10, 20, ... as the Monitor records them)."""
    rng = np.random.default_rng(3)
    n = 80
    loss = np.concatenate([[2.0], 80.0 * np.exp(0.05 * rng.standard_normal(n - 1))])
    marks = set(range(10, n, 10))
    if nan_loss_at is not None:
        loss[nan_loss_at] = np.nan
        marks.add(nan_loss_at)
    events = [] if guard_at is None else [
        {"step": guard_at, "kind": "guard", "data": {"action": "skip", "reason": "non-finite"}}]
    return Trace(steps=np.arange(n), loss=loss, nonfinite_steps=frozenset(marks),
                 metrics={"lr": np.full(n, 12.0)},
                 hyper={"kind": "sgd", "lr": 12.0, "momentum": 0.0}, events=events)


def test_non_finite_state_after_a_blow_up_is_part_of_it_a_nan_loss_is_not():
    """Non-finite parameters recorded at every detailed step after a blow-up are the
    blow-up's (one finding, the step in its evidence), not one finding per record; a NaN
    loss, or a step the guard acted on, stays a finding of its own."""
    found = diagnose_trace(_blowup_with_marks())
    assert [f.mechanism for f in found].count("lr-too-high") == 1
    assert not any(f.kind == "non-finite" for f in found)
    assert found[0].evidence.get("non_finite_at") == 10
    nan_loss = diagnose_trace(_blowup_with_marks(nan_loss_at=45))
    assert [f.step for f in nan_loss if f.kind == "non-finite"] == [45]
    skipped = diagnose_trace(_blowup_with_marks(guard_at=30))
    assert 30 in [f.step for f in skipped if f.kind == "non-finite"]
