"""``stablestep lab list``, ``lab run``, ``sweep``: outputs on disk, one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from stablestep.cli import main
from stablestep.lab.runner import run_all


def test_lab_list(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("late-explosion", "periodic-spikes", "adam-decay", "lr-divergence"):
        assert name in out
    for words in ("late explosion", "periodic spikes", "Adam with lr decay",
                  "lr too high -> NaN"):
        assert words in out
    assert "seed" not in out.lower()


def test_lab_list_names_every_story_in_full_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("late-explosion", "attention-logit-growth", "output-logit-divergence",
                 "fp16-loss-scale"):
        assert name in out  # the name a user types is never cut


def test_help_speaks_of_stories_not_seeds(capsys):
    for argv in (["--help"], ["lab", "--help"], ["lab", "run", "--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "seed" not in out.lower(), (argv, out)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "late explosion" in capsys.readouterr().out


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
        (["sweep", "lr-divergence", "--lr", "inf"], "--lr: values must be finite and >= 0"),
        (["sweep", "lr-divergence", "--lr", "1e-3", "--eps", "nan"],
         "--eps: values must be finite and >= 0"),
        (["sweep", "lr-divergence", "--lr=-1e-3"], "--lr: values must be finite and >= 0"),
        (["lab", "run", "lr-divergence", "--workers", "0"], "--workers must be >= 1"),
        (["lab"], "stablestep lab"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    if argv == ["lab"]:  # no sub-command: the help, exit 2
        assert main(argv) == 2
        assert message in capsys.readouterr().out
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_lab_run_refuses_to_delete_a_foreign_store(tmp_path, capsys):
    store = tmp_path / "run.sqlite"
    store.write_bytes(b"my own precious runs")
    assert main(["lab", "run", "lr-divergence", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert store.read_bytes() == b"my own precious runs"  # untouched
    nested = tmp_path / "all" / "lr-divergence"
    nested.mkdir(parents=True)
    (nested / "run.sqlite").write_bytes(b"more precious runs")
    assert main(["lab", "run", "all", "--out", str(tmp_path / "all"), "--workers", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (nested / "run.sqlite").read_bytes() == b"more precious runs"
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["lr-divergence"]
    from stablestep.lab.runner import prepare_out

    assert prepare_out(tmp_path, "lr-divergence", overwrite=True) == store
    assert not store.exists()


def test_sweep_checks_its_output_before_training(tmp_path, capsys, monkeypatch):
    import importlib

    sweep_mod = importlib.import_module("stablestep.lab.sweep")  # the module, not lab.sweep()

    def no_training(*a, **k):
        raise AssertionError("trained although the output cannot be written")

    monkeypatch.setattr(sweep_mod, "sweep", no_training)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["sweep", "lr-divergence", "--lr", "1e-3", "--out", str(a_file)]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "out" / "sweep.json").mkdir(parents=True)
    assert main(["sweep", "lr-divergence", "--lr", "1e-3", "--out", str(tmp_path / "out")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_sweep_rejects_non_finite_values_in_the_library():
    from stablestep.lab.sweep import sweep

    for kw in ({"lrs": [float("inf")], "epss": [1e-8]}, {"lrs": [1e-3], "epss": [float("nan")]}):
        with pytest.raises(ValueError, match="finite"):
            sweep("lr-divergence", **kw)


def test_sweep_map_in_parallel_processes(tmp_path, capsys):
    argv = ["sweep", "lr-divergence", "--lr", "1e-4,1e-3", "--eps", "1e-8", "--steps", "60",
            "--workers", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    text = (tmp_path / "sweep.json").read_text()
    assert "Infinity" not in text and "NaN" not in text  # standard JSON
    data = json.loads(text)
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
    for page in (report, index):  # the story in words, no "seed 003"
        assert "lr too high -&gt; NaN" in page and "seed" not in page.lower()
    assert outcome.variant("gd-lr1e-3").diverged_at is not None


def test_lab_run_prints_outcome_and_report_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["lab", "run", "lr-divergence", "--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "lr-too-high" in out and "NaN at 28" in out
    assert "lr too high -> NaN" in out and "seed" not in out  # words, not "seed 003"
    assert f"report: {tmp_path / 'report.html'}" in out.replace("\n", "")
    assert (tmp_path / "run.sqlite").exists() and (tmp_path / "report.html").exists()
    from stablestep.lab.runner import prepare_out

    # the store this scenario wrote may be replaced (a second `lab run`); no other's may
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_out(tmp_path, "late-explosion")
    assert (tmp_path / "run.sqlite").exists()
    prepare_out(tmp_path, "lr-divergence")
    assert not (tmp_path / "run.sqlite").exists()


def test_cli_parsers_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, stablestep.lab.cli, stablestep.report.cli; "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
