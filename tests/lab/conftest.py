"""Shared fixtures: each scenario is run once per test session (as `lab run` does, only
the variants the tests look at) into a temporary directory."""

from __future__ import annotations

import pytest
import torch

from stablestep.lab.runner import run_scenario


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _run(tmp_path_factory, name, variants):
    out = tmp_path_factory.mktemp(name)
    return run_scenario(name, out=out, variants=variants, report=False, verify=False)


@pytest.fixture(scope="session")
def late_explosion(tmp_path_factory):
    return _run(tmp_path_factory, "late-explosion", ["eps1e-8", "eps1e-3", "lr1e-4"])


@pytest.fixture(scope="session")
def periodic_spikes(tmp_path_factory):
    return _run(tmp_path_factory, "periodic-spikes", ["adam", "amsgrad"])


@pytest.fixture(scope="session")
def lr_divergence(tmp_path_factory):
    return _run(tmp_path_factory, "lr-divergence", None)
