"""The spike counter, configuration validation and scenario lookup."""

from __future__ import annotations

import numpy as np
import pytest

from stablestep.lab import scenarios
from stablestep.lab.config import TrainConfig
from stablestep.lab.spikes import count_spikes, spike_steps


def test_spike_steps_finds_each_spike_once():
    x = np.full(600, 1.0)
    x[200:205] = [5, 20, 40, 10, 3]  # one spike, several steps above the bar
    x[400] = 4.0
    assert spike_steps(x, factor=3.0, window=50) == [200, 400]
    assert count_spikes(x, factor=10.0, window=50) == 1


def test_spike_floor_ignores_round_off_at_tiny_loss():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(1.0, 1e-13, 200), 1e-13 * (1 + 4 * rng.random(400))])
    assert count_spikes(x, factor=3.0, window=50) == 0  # 5x jitter at 1e-13 is not a spike
    x[500] = 1e-3
    assert spike_steps(x, factor=3.0, window=50) == [500]


def test_spike_count_stops_at_non_finite():
    x = np.ones(300)
    x[150] = np.nan
    x[200] = 100.0
    assert count_spikes(x, window=20) == 0


def test_spike_arguments_are_validated():
    with pytest.raises(ValueError, match="factor must be > 1; got 1.0"):
        spike_steps(np.ones(10), factor=1.0)
    with pytest.raises(ValueError, match="window must be >= 1; got 0"):
        spike_steps(np.ones(10), window=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "Invalid learning rate: 0.0"),
        ({"eps": -1.0}, "Invalid epsilon value: -1.0"),
        ({"problem": "mnist"}, "problem must be one of"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"steps": 0}, "steps must be >= 1; got 0"),
        ({"batch": 999, "n": 10}, "batch must be in [1, n=10] or None; got 999"),
        ({"curvature_every": -1}, "curvature_every must be >= 0; got -1"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**kwargs)
    assert message in str(err.value)


def test_scenarios_are_data():
    assert scenarios.names() == ["late-explosion", "periodic-spikes", "adam-decay",
                                 "lr-divergence"]
    for name in scenarios.names():
        sc = scenarios.get(name)
        assert sc.variants[0].role == "failing"
        assert any(v.role == "fix" for v in sc.variants)
        assert len({v.name for v in sc.variants}) == len(sc.variants)
        assert TrainConfig(**{**sc.base().to_dict(), "betas": tuple(sc.base().betas)}) == sc.base()
    with pytest.raises(KeyError, match="choose from late-explosion.*epsilon-scale"):
        scenarios.get("nope")
    with pytest.raises(KeyError, match="has no variant 'x'"):
        scenarios.get("adam-decay").variant("x")
