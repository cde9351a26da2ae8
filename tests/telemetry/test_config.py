"""MonitorConfig: one typed, validated set of Monitor settings; the old keywords still work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stablestep.telemetry import Monitor, open_run
from stablestep.telemetry.config import MonitorConfig

from .helpers import loss_of, tiny_problem


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, r"^Invalid every: 0 \(a positive int\)$"),
        ({"every": True}, r"^Invalid every: True \(a positive int\)$"),
        ({"state_every": 0}, r"^Invalid state_every: 0 \(a positive int\)$"),
        ({"flush_every": 2.5}, r"^Invalid flush_every: 2.5 \(a positive int\)$"),
        ({"quantile_sample": 0}, r"^Invalid quantile_sample: 0 \(a positive int\)$"),
        ({"top_k": -1}, r"^Invalid top_k: -1 \(an int >= 0\)$"),
        ({"flush_seconds": float("nan")}, r"^Invalid flush_seconds: nan \(a finite number > 0\)$"),
        ({"flush_seconds": 0}, r"^Invalid flush_seconds: 0 \(a finite number > 0\)$"),
        ({"curvature_every": 5}, r"^curvature_every and curvature_loss must be given together$"),
        ({"curvature_every": 5, "curvature_loss": 3}, r"^Invalid curvature_loss: not callable"),
        ({"sinks": "tb"}, r"^Invalid sinks: 'tb' \(a list of sink objects\)$"),
        ({"sinks": [object()]}, r"^Invalid sink object: no write\(\) method$"),
        ({"overwrite": "yes"}, r"^Invalid overwrite: 'yes' \(True or False\)$"),
        ({"distributed": "auto"}, r"^Invalid distributed: 'auto' \(None, True or False\)$"),
        ({"extra": {"monitor": 1}}, r"^config key 'monitor' is reserved for the Monitor$"),
        ({"extra": [1]}, r"^Invalid extra: list \(a dict of run config entries\)$"),
    ],
)
def test_invalid_settings_give_one_exact_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MonitorConfig(**kwargs)


def test_config_is_frozen_and_replace_validates():
    cfg = MonitorConfig(state_every=50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.every = 3  # type: ignore[misc]
    assert cfg.replace(every=2).every == 2 and cfg.replace(every=2).state_every == 50
    with pytest.raises(ValueError, match="Invalid every"):
        cfg.replace(every=0)


def _run(tmp_path, name, **kw):
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Monitor(model, opt, store=tmp_path / "s.db", run=name, **kw) as mon:
        for _ in range(6):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            mon.observe(loss)
            opt.step()
    return mon


def test_monitor_takes_a_config_and_keywords_win(tmp_path):
    cfg = MonitorConfig(every=2, state_every=3, extra={"scenario": "s"})
    mon = _run(tmp_path, "cfg", config=cfg)
    run = open_run(tmp_path / "s.db", "cfg")
    assert run.series("loss")[0].tolist() == [0, 2, 3, 4]  # every 2, and detail steps
    assert run.series("update_norm")[0].tolist() == [0, 3]
    assert run.config["scenario"] == "s" and run.config["monitor"]["state_every"] == 3
    assert mon.config is cfg
    mon = _run(tmp_path, "kw", config=cfg, every=1)  # a keyword wins over the config field
    assert open_run(tmp_path / "s.db", "kw").series("loss")[0].tolist() == list(range(6))
    assert mon.config.state_every == 3


def test_dict_config_still_means_run_config_extras(tmp_path):
    _run(tmp_path, "d", config={"scenario": "old-style"}, state_every=None)
    run = open_run(tmp_path / "s.db", "d")
    assert run.config["scenario"] == "old-style"
    assert "update_norm" not in run.names()


def test_config_of_wrong_type_is_a_clear_error(tmp_path):
    model, _, _ = tiny_problem()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="config must be a MonitorConfig or a dict"):
        Monitor(model, opt, store=tmp_path / "s.db", config=[("every", 2)])
