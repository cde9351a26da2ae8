"""``stablestep lab list``, ``lab run``, ``sweep``: outputs on disk, one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from stablestep.cli import main
from stablestep.lab.runner import run_all


def test_lab_list(capsys):
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("late-explosion", "periodic-spikes", "adam-decay", "lr-divergence"):
        assert name in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "run", "nope"], "unknown scenario 'nope'"),
        (["sweep", "nope", "--lr", "1e-3"], "unknown scenario 'nope'"),
        (["sweep", "lr-divergence", "--lr", "abc"], "--lr: not a number: 'abc'"),
        (["sweep", "lr-divergence", "--lr", "0"], "--lr: learning rates must be > 0"),
        (["sweep", "lr-divergence", "--lr", "1e-3", "--amsgrad", "maybe"],
         "--amsgrad: expected true or false; got 'maybe'"),
        (["sweep", "lr-divergence", "--lr", "1e-3", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_sweep_map_in_parallel_processes(tmp_path, capsys):
    argv = ["sweep", "lr-divergence", "--lr", "1e-4,1e-3", "--eps", "1e-8", "--steps", "60",
            "--workers", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    cells = {c["lr"]: c for c in data["cells"]}
    assert cells[1e-3]["diverged_at"] is not None and cells[1e-3]["final_loss"] is None
    assert cells[1e-4]["diverged_at"] is None and math.isfinite(cells[1e-4]["final_loss"])
    html = (tmp_path / "sweep.html").read_text()
    assert "data:image/png;base64," in html
    assert "stability map" in capsys.readouterr().out


def test_run_all_writes_store_report_and_index(tmp_path):
    (outcome,) = run_all(out=tmp_path, names=["lr-divergence"], workers=1)
    assert (tmp_path / "lr-divergence" / "run.sqlite").exists()
    report = (tmp_path / "lr-divergence" / "report.html").read_text()
    assert report.count("<img ") >= 6 and "lr-too-high" in report
    index = (tmp_path / "index.html").read_text()
    assert 'href="lr-divergence/report.html"' in index
    assert outcome.variant("gd-lr1e-3").diverged_at is not None


def test_lab_run_prints_outcome_and_report_path(tmp_path, capsys):
    assert main(["lab", "run", "lr-divergence", "--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "lr-too-high" in out and "NaN at 28" in out
    assert f"report: {tmp_path / 'report.html'}" in out.replace("\n", "")
    assert (tmp_path / "run.sqlite").exists() and (tmp_path / "report.html").exists()


def test_cli_parsers_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, stablestep.lab.cli, stablestep.report.cli; "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
