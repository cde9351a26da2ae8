"""The README's five lines and the one-screen examples run as a user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The quick examples (a few seconds each); the Keras/Lightning ones are covered by the
# integration tests and periodic_spikes by the lab tests.
EXAMPLES = ["quickstart", "monitor_quickstart", "lr_divergence_curvature", "guard_quickstart"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "an example should show the user what happened"
    assert "Traceback" not in proc.stderr


def _readme_five_lines() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_five_lines(code):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    batches = [(x, x.sum(1, keepdim=True))] * 30
    exec(code, {"model": model, "batches": batches, "loss_fn": torch.nn.functional.mse_loss})


def test_readme_five_lines_run_and_store_a_diagnosable_run(tmp_path, monkeypatch):
    import stablestep

    monkeypatch.chdir(tmp_path)
    _run_five_lines(_readme_five_lines())
    run = stablestep.open_run(tmp_path / "runs.db", "baseline")
    steps, loss = run.series("loss")
    assert len(steps) == 30 and loss[-1] < loss[0]
    assert isinstance(stablestep.diagnose(str(tmp_path / "runs.db")), list)


def test_readme_five_lines_twice_in_a_row(tmp_path, monkeypatch):
    """What a user does next: run the same script again. The second run must not crash
    and must not overwrite the first; it is stored under a visible suffix of "baseline"
    (the store's rule for a repeated run name), and both are reported."""
    import stablestep

    monkeypatch.chdir(tmp_path)
    code = _readme_five_lines()
    _run_five_lines(code)
    _run_five_lines(code)  # crashed with "run 'baseline' already exists"
    runs = stablestep.list_runs(tmp_path / "runs.db")
    assert len(runs) == 2 and "baseline" in runs, runs
    (second,) = [r for r in runs if r != "baseline"]
    assert second.startswith("baseline"), runs  # the suffix is visible, the name kept
    for name in runs:
        assert len(stablestep.open_run(tmp_path / "runs.db", name).series("loss")[0]) == 30
    from stablestep.cli import main

    assert main(["report", str(tmp_path / "runs.db"), "-o", str(tmp_path / "r.html")]) == 0
