"""A tiny run store written by the real Monitor, with hostile run names and labels."""

from __future__ import annotations

import pytest
import torch

from stablestep.telemetry import Monitor

HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def _write_run(store, name, *, lr, label, steps=40):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with Monitor(model, opt, store=store, run=name, config={"label": label}, state_every=2,
                 curvature_every=10,
                 curvature_loss=lambda: torch.mean((model(x) - y) ** 2)) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.mean((model(x) - y) ** 2)
            loss.backward()
            mon.observe(loss)
            opt.step()


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("store") / "runs.sqlite"
    _write_run(path, "plain", lr=1e-2, label="Adam lr=1e-2")
    _write_run(path, HOSTILE, lr=3e-2, label=HOSTILE + "'label'")
    return path
