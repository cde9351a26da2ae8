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
