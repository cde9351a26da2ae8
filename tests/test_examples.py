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
# integration tests and seed_001 by the lab tests.
EXAMPLES = ["quickstart", "monitor_quickstart", "curvature_seed003", "guard_quickstart"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "an example should show the user what happened"
    assert "Traceback" not in proc.stderr


def test_readme_five_lines_run_and_store_a_diagnosable_run(tmp_path, monkeypatch):
    import torch

    import stablestep

    text = (ROOT / "README.md").read_text()
    section = text.split("## Five lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    batches = [(x, x.sum(1, keepdim=True))] * 30
    exec(code, {"model": model, "batches": batches, "loss_fn": torch.nn.functional.mse_loss})
    run = stablestep.open_run(tmp_path / "runs.db", "baseline")
    steps, loss = run.series("loss")
    assert len(steps) == 30 and loss[-1] < loss[0]
    assert isinstance(stablestep.diagnose(str(tmp_path / "runs.db")), list)
