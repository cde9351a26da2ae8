"""The top-level ``stablestep`` command: one line on stderr and exit 2 for every error,
a traceback only when asked for, logging through the ``stablestep`` logger."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stablestep import cli
from stablestep.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _boom(exc):
    def func(args):
        raise exc
    return func


@pytest.fixture
def failing(monkeypatch):
    """``stablestep lab list`` made to raise what the test sets."""
    import stablestep.lab.cli as lab_cli

    box = {}
    monkeypatch.setattr(lab_cli, "cmd_list", lambda args: _boom(box["exc"])(args))
    return box


@pytest.mark.parametrize("exc", [ValueError("bad value\nsecond line"), OSError(28, "No space"),
                                 KeyError("no run 'x'"), RecursionError("too deep"),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte"),
                                 OverflowError("int too large"), cli.UsageError("usage")])
def test_expected_errors_are_one_line_exit_2(failing, exc, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    failing["exc"] = exc
    assert main(["lab", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stablestep: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "second line" not in err


def test_unexpected_errors_are_one_line_with_a_hint(failing, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    failing["exc"] = ZeroDivisionError("division by zero")
    assert main(["lab", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError" in err
    assert f"{cli.DEBUG_ENV}=1" in err and "Traceback" not in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # the traceback when asked for
    with pytest.raises(ZeroDivisionError):
        main(["lab", "list"])


def test_error_messages_are_made_printable(failing, capsys):
    failing["exc"] = ValueError("run \x1b[2J\u202eevil\x00 broke")
    assert main(["lab", "list"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err and "\x00" not in err
    assert "\\x1b[2J\\u202eevil\\x00" in err


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["diagnose"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err and "--help" in err


def test_library_messages_go_through_logging(capsys):
    log = logging.getLogger("stablestep.test")
    handler = cli.setup_logging(verbose=0)
    try:
        log.debug("hidden at the default level")
        log.info("shown at the default level")
        log.warning("careful")
    finally:
        logging.getLogger("stablestep").removeHandler(handler)
    err = capsys.readouterr().err
    assert err == "stablestep: shown at the default level\nstablestep: warning: careful\n"
    handler = cli.setup_logging(quiet=True)
    try:
        log.info("not with -q")
    finally:
        logging.getLogger("stablestep").removeHandler(handler)
    assert capsys.readouterr().err == ""


def test_verbose_and_quiet_are_accepted_before_and_after_the_command(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("step,loss\n" + "".join(f"{i},{1.0 / (i + 1)}\n" for i in range(40)))
    for argv in (["-q", "diagnose", str(p)], ["diagnose", str(p), "-q"]):
        assert main(argv) == 0
        assert capsys.readouterr().err == ""
    assert main(["diagnose", str(p), "-v"]) == 0
    assert "40 points" in capsys.readouterr().err


def test_progress_hook_is_a_plain_callback():
    with cli.progress("work", 3) as update:  # not a terminal: draws nothing, never fails
        for i in range(1, 4):
            update(i, 3)


def test_console_follows_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "57")
    assert cli.console().width == 57
    monkeypatch.delenv("COLUMNS")
    assert cli.console().width == 80


def test_directories_and_missing_files_are_one_line(tmp_path, capsys):
    d = tmp_path / "a_dir"
    d.mkdir()
    for argv in (["diagnose", str(d)], ["report", str(d), "-o", str(tmp_path / "r.html")],
                 ["diagnose", str(tmp_path / "missing.csv")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("stablestep: error: ") and err.count("\n") == 1, err


def test_console_script_never_prints_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop(cli.DEBUG_ENV, None)
    res = subprocess.run([sys.executable, "-m", "stablestep.cli", "diagnose", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_warnings_during_a_command_are_one_line_each(failing, capsys):
    import warnings

    def warn_then_fail(args):
        warnings.warn("resolution is coarse\nsecond line", UserWarning, stacklevel=1)
        return 0

    failing["exc"] = None
    import stablestep.lab.cli as lab_cli

    lab_cli.cmd_list = warn_then_fail  # restored by the fixture's monkeypatch
    assert main(["lab", "list"]) == 0
    err = capsys.readouterr().err
    assert err == "stablestep: warning: resolution is coarse\\x0asecond line\n", err


def test_a_failing_command_prints_only_its_error_line(tmp_path, capsys):
    """What was read and reader warnings come after a success; a failure is one line."""
    p = tmp_path / "log.csv"
    p.write_text("step,loss\n" + "".join(f"{i},{1.0 / (i + 1)}\n" for i in range(40))
                 + "40,oops\n")
    assert main(["diagnose", str(p)]) == 0
    assert "40 points" in capsys.readouterr().err
    assert main(["diagnose", str(p), "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stablestep: error: ") and "nope" in err
