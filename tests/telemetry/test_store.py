"""The run store: round trip, many runs per file, errors, concurrent reading."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from stablestep.telemetry import SCHEMA_VERSION, Event, list_runs, open_run
from stablestep.telemetry.store import RunWriter


def test_round_trip_many_runs(tmp_path):
    path = tmp_path / "s.db"
    for name, scale in (("a", 1.0), ("b", 2.0)):
        w = RunWriter(path, name, config={"optimizer": "Adam", "variant": name})
        for s in range(5):
            w.add(s, {"loss": scale * s, "lr": 0.1})
        w.add(5, {"loss": float("nan"), "lr": 0.1})
        w.event(5, "non-finite", {"what": ["loss"]})
        w.close()
    assert list_runs(path) == ["a", "b"]
    run = open_run(path, "b")
    assert run.name == "b" and run.config == {"optimizer": "Adam", "variant": "b"}
    assert run.names() == ["loss", "lr"]
    steps, values = run.series("loss")
    assert steps.dtype == np.int64 and values.dtype == np.float64
    assert steps.tolist() == [0, 1, 2, 3, 4] and values.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert run.series("lr")[0].tolist() == list(range(6))
    assert run.events == [Event(5, "non-finite", {"what": ["loss"]})]
    assert run.last_step() == 5
    assert open_run(path).name == "b"  # run=None: the latest run
    df = run.to_dataframe()
    assert list(df.columns) == ["loss", "lr"] and np.isnan(df.loc[5, "loss"])
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_errors_are_exact(tmp_path):
    path = tmp_path / "s.db"
    with pytest.raises(FileNotFoundError, match="no run store at"):
        open_run(path)
    RunWriter(path, "a", config={}).close()
    with pytest.raises(KeyError, match=r"no run 'zz' in .*; runs: \['a'\]"):
        open_run(path, "zz")
    with pytest.raises(KeyError, match="has no metric 'loss'"):
        open_run(path, "a").series("loss")
    with pytest.raises(ValueError, match="run 'a' already exists"):
        RunWriter(path, "a", config={})
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="is not a stablestep run store"):
        open_run(junk)
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version=99")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="schema version 99, newer than"):
        open_run(path)


def test_resume_from_replaces_the_abandoned_tail(tmp_path):
    path = tmp_path / "s.db"
    w = RunWriter(path, "r", config={})
    for s in range(10):
        w.add(s, {"loss": 1.0})
    w.event(8, "guard", {})
    w.close()
    w = RunWriter(path, "r", config={}, resume_from=6)
    w.add(6, {"loss": 2.0})
    w.close()
    steps, values = open_run(path, "r").series("loss")
    assert steps.tolist() == list(range(7)) and values[-1] == 2.0
    assert open_run(path, "r").events == []


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from stablestep.telemetry import Monitor
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with Monitor(model, opt, store=sys.argv[1], run="live", flush_every=5) as mon:
        for i in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.observe(loss)
            opt.step()
            time.sleep(0.02)
    """
)


def test_read_while_another_process_writes(tmp_path):
    path = tmp_path / "s.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    seen = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                steps, values = open_run(path, "live").series("loss")
            except (FileNotFoundError, KeyError, ValueError):
                time.sleep(0.02)
                continue
            assert steps.tolist() == list(range(len(steps)))  # a clean prefix, never torn
            assert np.isfinite(values).all()
            seen.append(len(steps))
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert len(set(seen)) >= 3, seen  # saw the run grow while it was written
    assert 0 < min(seen) < 60
    assert open_run(path, "live").series("loss")[0].tolist() == list(range(60))
