"""One spike definition: the lab's counter, the detector stack and diagnose agree."""

import numpy as np

from stablestep.diagnosis import DetectorStack, diagnose_trace, from_series
from stablestep.lab.spikes import spike_steps


def _spiky(n=3000, every=250, seed=0):
    rng = np.random.default_rng(seed)
    loss = (1.0 * np.exp(-np.arange(n) / 400) + 0.05) * np.exp(0.01 * rng.standard_normal(n))
    for s in range(400, n - 40, every):  # a geometric rise to ~20x, then back
        k = np.arange(12)
        loss[s:s + 12] *= np.exp(0.25 * k)
        loss[s + 12:s + 30] *= np.exp(0.25 * 11 * (1 - np.arange(1, 19) / 18))
    return loss


def test_lab_stack_and_diagnose_count_the_same_spikes():
    loss = _spiky()
    stack = DetectorStack()
    for t, v in enumerate(loss.tolist()):
        stack.update(t, v)
    alarms = [i.step for i in stack.incidents if i.kind == "spike"]
    assert len(alarms) >= 8  # ten injected spikes
    assert spike_steps(loss, factor=1.01, window=50) == alarms  # the lab: the same alarms
    assert set(spike_steps(loss, factor=3.0, window=50)) <= set(alarms)  # large ones only
    findings = diagnose_trace(from_series(np.arange(loss.size), loss))
    (periodic,) = [f for f in findings if f.kind == "periodic-spikes"]
    assert periodic.evidence["spike_steps"] == alarms  # diagnose: the same alarms
