"""Every CLI command on hostile input: exit status 0 or 2, at most one error line on
stderr, never a traceback. ``main(argv)`` runs in-process (fast); a few cases run as a
real subprocess, as a user runs them."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablestep.cli import main
from tests.fuzz._inputs import HOSTILE_NAMES, csv_texts, json_texts, names, text_logs

FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


class Hung(BaseException):
    """Not an OSError (TimeoutError is one, and a bare ``except OSError`` would hide it)."""


@contextlib.contextmanager
def _deadline(seconds: int, argv: list[str]):
    """A hang (a FIFO opened for reading waits for a writer forever) fails the test."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(*_):
        raise Hung(f"stablestep {argv!r} hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``stablestep ARGV`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(), _deadline(60, argv):
        warnings.simplefilter("ignore")
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def check(argv: list[str]) -> tuple[int, str, str]:
    rc, out, err = run_cli(argv)
    assert rc in (0, 2), (argv, rc, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # info lines may come first
    if rc == 2:
        assert len(errors) == 1, err[-2000:]
    return rc, out, err


def _file(text: str | bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


@FUZZ
@given(st.one_of(csv_texts().map(lambda t: (t, ".csv")), json_texts().map(lambda t: (t, ".json")),
                 text_logs().map(lambda t: (t, ".log")),
                 st.binary(max_size=300).map(lambda b: (b, ".db"))),
       st.one_of(st.none(), names), st.booleans())
def test_diagnose_and_export(case, run, as_json):
    text, suffix = case
    path = _file(text, suffix)
    try:
        argv = ["diagnose", path] + (["--json"] if as_json else [])
        argv += ["--run", run] if run is not None and "\x00" not in run else []
        rc, out, _ = check(argv)
        if rc == 0 and as_json:
            assert out.count("\n") == 1
        check(["export", path] + (["--run", run] if run and "\x00" not in run else []))
    finally:
        os.unlink(path)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(csv_texts(), st.sampled_from(["file", "dir", "missing-dir"]))
def test_report(text, where):
    path = _file(text, ".csv")
    with tempfile.TemporaryDirectory() as d:
        out = {"file": os.path.join(d, "r.html"), "dir": d,
               "missing-dir": os.path.join(d, "no", "such", "r.html")}[where]
        try:
            check(["report", path, "-o", out])
        finally:
            os.unlink(path)


def test_paths_that_are_not_logs(tmp_path):
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for p in (str(tmp_path), str(fifo), str(empty), str(tmp_path / "missing.csv"), "/dev/null"):
        for cmd in (["diagnose", p], ["export", p], ["report", p, "-o", str(tmp_path / "r.html")]):
            assert check(cmd)[0] == 2, cmd


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(HOSTILE_NAMES + ["nope", "all-the-things"]),
       st.sampled_from(["inf", "nan", "-1", "abc", "1e309", ",", "0"]),
       st.sampled_from(["0", "-5", "x"]))
def test_lab_and_sweep_refuse_bad_arguments_before_training(name, lr, steps):
    if "\x00" in name or name in ("", " ", "-2"):
        name = "nope"
    with tempfile.TemporaryDirectory() as d:
        check(["lab", "run", name, "--out", d])
        check(["sweep", name, "--lr", lr, "--steps", steps, "--workers", "1", "--out",
               os.path.join(d, "sweep")])
        check(["sweep", "periodic-spikes", "--lr", lr, "--steps", steps, "--workers", "1",
               "--out", os.path.join(d, "sweep")])
    check(["lab", "list"])


SCRIPT = "import sys; from stablestep.cli import main; sys.exit(main())"  # the console script


def test_real_subprocesses_print_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("step;loss\n0;1,0\n1;\x1b[2Jtext\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50_000)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "..", "src"),
         os.environ.get("PYTHONPATH", "")]))
    for argv in (["diagnose", str(deep)], ["export", str(tmp_path)],
                 ["diagnose", str(bad), "--run", "nope"]):
        p = subprocess.run([sys.executable, "-c", SCRIPT, *argv], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (argv, p.stderr)
        errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
        assert "Traceback" not in p.stderr and len(errors) == 1, p.stderr
        assert "\x1b" not in p.stderr
