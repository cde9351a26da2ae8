"""Online detectors: behaviour on synthetic curves, validation, and state round trips."""

import copy
import math

import numpy as np
import pytest

from stablestep.diagnosis import (
    DivergenceDetector,
    NonFiniteDetector,
    PeriodicDetector,
    PrecursorDetector,
    SpikeConfig,
    SpikeDetector,
)


def _curve(seed=0, n=600):
    rng = np.random.default_rng(seed)
    base = 2.0 * np.exp(-np.arange(n) / 300) + 0.5
    return base * np.exp(0.01 * rng.standard_normal(n))


def test_geometric_spike_detected_at_onset_not_peak():
    loss = _curve()
    for k in range(8):  # grows 1.6x per step from step 300, then recovers
        loss[300 + k] *= 1.6 ** (k + 1) / 1.6
    loss[300] *= 1.0
    det = SpikeDetector()
    alarms = [a for s, v in enumerate(loss) if (a := det.update(s, float(v)))]
    assert len(alarms) == 1
    assert alarms[0].step <= 302  # the peak is at 307
    exc = det.excursions[0]
    assert exc.peak_step == 307 and exc.recovered


def test_noise_alone_gives_no_alarm():
    det = SpikeDetector()
    for s, v in enumerate(_curve(seed=3, n=5000)):
        assert det.update(s, float(v)) is None


def test_config_validation_messages():
    with pytest.raises(ValueError, match="Invalid window: 1"):
        SpikeConfig(window=1)
    with pytest.raises(ValueError, match="Invalid recover: 1.5"):
        SpikeConfig(recover=1.5)


@pytest.mark.parametrize("make", [
    lambda: SpikeDetector(SpikeConfig(warmup=5)),
    lambda: DivergenceDetector(),
    lambda: PrecursorDetector(),
])
def test_save_load_continue_identically(make):
    loss = _curve(seed=1, n=400)
    loss[200:215] *= np.exp(np.arange(15) * 0.5)  # spike / growth in the middle
    a = make()
    out_a = [a.update(s, float(v)) for s, v in enumerate(loss[:210])]
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    rest_a = [a.update(s, float(v)) for s, v in enumerate(loss[210:], start=210)]
    rest_b = [b.update(s, float(v)) for s, v in enumerate(loss[210:], start=210)]
    assert rest_a == rest_b
    assert a.state_dict() == b.state_dict()
    assert any(out_a + rest_a)


def test_nonfinite_fires_once_per_run_of_bad_values():
    det = NonFiniteDetector()
    vals = [1.0, math.nan, math.inf, 1.0, 1.0, math.nan]
    alarms = [det.update(s, v) for s, v in enumerate(vals)]
    assert [a.step for a in alarms if a] == [1, 5]
    assert det.update(6, 1.0) is None
    assert det.update(7, 1.0, nonfinite=True).step == 7  # e.g. NaN gradients, finite loss
    d2 = NonFiniteDetector()
    d2.load_state_dict(det.state_dict())
    assert d2.update(8, math.nan) is None  # still in the same bad run
    assert d2.state_dict() == {"bad": True, "count": 3}


def test_periodic_detector_period_and_regularity():
    det = PeriodicDetector()
    alarms = [det.update(s) for s in (100, 200, 305, 400, 498)]
    fired = [a for a in alarms if a]
    assert len(fired) == 1 and fired[0].step == 400
    assert det.period == pytest.approx(np.mean([100, 105, 95, 98]))
    assert det.cv == pytest.approx(np.std([100, 105, 95, 98], ddof=1) / det.period)
    d2 = PeriodicDetector()
    d2.load_state_dict(det.state_dict())
    assert d2.update(600) == det.update(600)
    assert d2.state_dict() == det.state_dict()


def test_divergence_detector_fires_on_sustained_growth_only():
    det = DivergenceDetector()
    loss = list(_curve(n=100)) + [0.6 * 1.5**k for k in range(1, 12)]
    alarms = [a for s, v in enumerate(loss) if (a := det.update(s, float(v)))]
    assert len(alarms) == 1 and 100 <= alarms[0].onset <= 101
    assert alarms[0].value / alarms[0].baseline >= 4


def _bump(loss, at, size, width=6):
    """Multiply a smooth rise-and-fall of peak factor ``size`` into ``loss`` at ``at``."""
    k = np.arange(2 * width + 1)
    loss[at: at + k.size] *= np.exp(np.log(size) * np.sin(np.pi * k / (k.size - 1)))


@pytest.mark.parametrize(("size", "alarmed"), [(1.07, False), (1.2, True)])
def test_rise_must_clear_the_ten_percent_bar(size, alarmed):
    """A 7% wobble of a flat, noiseless loss is under the 10% that defines an episode in
    the labels (min_rise = log 1.1), whatever the noise scale says; a 20% rise is not."""
    loss = np.full(400, 0.3)
    _bump(loss, 200, size)
    det = SpikeDetector()
    alarms = [a for s, v in enumerate(loss) if (a := det.update(s, float(v)))]
    assert bool(alarms) is alarmed


def test_early_overshoot_is_not_an_incident():
    """The same 20% bump raises no alarm when it begins before step ``settle`` (Adam's
    first steps overshoot the first minimum), one when it begins after, and one when the
    log starts mid-run (steps count from the start of training, not from the record); an
    early 3x blow-up is an incident."""
    loss = np.concatenate([np.linspace(0.8, 0.2, 10), np.full(300, 0.2)])
    early, late = loss.copy(), loss.copy()
    _bump(early, 10, 1.2)
    _bump(late, 150, 1.2)
    big = loss.copy()
    _bump(big, 10, 3.0)
    for curve, first_step, n_alarms in ((early, 0, 0), (late, 0, 1), (early, 5000, 1),
                                        (big, 0, 1)):
        det = SpikeDetector()
        alarms = [a for s, v in enumerate(curve, start=first_step)
                  if (a := det.update(s, float(v)))]
        assert len(alarms) == n_alarms
    with pytest.raises(ValueError, match="Invalid settle: -1"):
        SpikeConfig(settle=-1)


def test_label_spikes_skips_the_early_transient():
    """The offline labels follow the detector's definition: an episode under 1.5x whose
    onset is before step ``settle`` is training's early overshoot, a larger one is not;
    ``start`` skips the steps before it."""
    from benchmarks.labeled import label_spikes

    from stablestep.diagnosis.trace import from_series

    loss = np.concatenate([np.linspace(0.8, 0.2, 10), np.full(390, 0.2)])
    for at in (10, 150, 300):
        _bump(loss, at, 1.3)
    tr = from_series(list(range(loss.size)), loss.tolist())
    on = label_spikes(tr)
    assert len(on) == 2 and 150 <= on[0] <= 153 and 300 <= on[1] <= 303
    assert len(label_spikes(tr, settle=0)) == 3
    assert label_spikes(tr, start=200) == on[1:]
    blowup = loss.copy()
    _bump(blowup, 10, 3.0)
    assert len(label_spikes(from_series(list(range(loss.size)), blowup.tolist()))) == 3


def test_label_spikes_splits_a_new_climb_out_of_ringing():
    """Rises of 2 steps while the loss rings after a spike stay in its episode; a
    12-step climb to 20x inside it (the loss never quiet for 25 steps) is a new one."""
    from benchmarks.labeled import label_spikes

    from stablestep.diagnosis.trace import from_series

    loss = np.full(400, 0.01)
    _bump(loss, 100, 20.0)
    for a, b in ((113, 150), (175, 200)):  # 3x ringing, 2-step rises
        loss[a:b] *= 1.0 + 2.0 * (np.arange(b - a) % 4 < 2)
    ring = loss.copy()
    ring[150:175] *= 3.0
    _bump(loss, 150, 20.0, width=12)
    tr = lambda v: from_series(list(range(v.size)), v.tolist())  # noqa: E731
    assert len(label_spikes(tr(ring))) == 1
    on = label_spikes(tr(loss))
    assert len(on) == 2 and 150 <= on[1] <= 153
    assert len(label_spikes(tr(loss), climb=20)) == 1  # the old rule merged them
