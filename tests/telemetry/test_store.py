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
from stablestep.telemetry.store import RunNotFoundError, RunWriter, StoreError


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
    with pytest.raises(KeyError, match=r"no run 'zz' in .*; runs: a$"):
        open_run(path, "zz")
    with pytest.raises(KeyError, match="has no metric 'loss'"):
        open_run(path, "a").series("loss")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="is not a stablestep run store"):
        open_run(junk)
    with pytest.raises(StoreError, match="is a directory, not a run store"):
        list_runs(tmp_path)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not a stablestep run store"):
        open_run(foreign)
    with pytest.raises(StoreError, match="SQLite database but not a stablestep run store"):
        RunWriter(foreign, "a", config={})
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


def test_missing_run_is_one_message_listing_the_runs(tmp_path):
    path = tmp_path / "s.db"
    for name in ("a", "b"):
        RunWriter(path, name, config={}).close()
    with pytest.raises(RunNotFoundError) as exc:
        open_run(path, "nope")
    assert str(exc.value) == f"no run 'nope' in {path}; runs: a, b"
    assert exc.value.available == ["a", "b"] and isinstance(exc.value, KeyError)


def test_same_name_again_gets_a_visible_suffix_and_overwrite_replaces(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="stablestep.telemetry.store")
    path = tmp_path / "s.db"
    names = []
    for k in range(3):
        w = RunWriter(path, "baseline", config={"k": k})
        w.add(0, {"loss": float(k)})
        names.append(w.run)
        w.close()
    assert names == ["baseline", "baseline-2", "baseline-3"]
    assert "recording this one as 'baseline-3'" in caplog.text
    assert [open_run(path, n).series("loss")[1][0] for n in names] == [0.0, 1.0, 2.0]
    # a run literally named like a suffix does not confuse the numbering
    w = RunWriter(path, "baseline-2", config={})
    assert w.run == "baseline-2-2"
    w.close()
    w = RunWriter(path, "baseline", config={"k": 9}, overwrite=True)
    assert w.run == "baseline"
    w.add(5, {"loss": 9.0})
    w.close()
    run = open_run(path, "baseline")
    assert run.config == {"k": 9} and run.series("loss")[0].tolist() == [5]
    assert list_runs(path) == ["baseline-2", "baseline-3", "baseline-2-2", "baseline"]
    with pytest.raises(ValueError, match="exclude each other"):
        RunWriter(path, "baseline", config={}, resume_from=3, overwrite=True)


def test_damaged_config_events_and_values_do_not_stop_a_reader(tmp_path):
    path = tmp_path / "s.db"
    w = RunWriter(path, "r", config={})
    w.add(0, {"loss": 1.0, "note": "text", "lr": "0.1"})
    with pytest.raises(ValueError, match="beyond int64"):
        w.add(2 ** 63, {"loss": 1.0})
    w.event(0, "guard", {"a": 1})
    w.close()
    run = open_run(path, "r")
    assert run.names() == ["loss", "lr"] and run.series("lr")[1].tolist() == [0.1]
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET config = '[1, 2]'")
    con.execute("UPDATE metrics SET value = 'text' WHERE name_id = "
                "(SELECT id FROM names WHERE name = 'lr')")
    con.execute("UPDATE events SET data = '{not json'")
    con.commit()
    con.close()
    run = open_run(path, "r")
    assert run.config == {} and run.events == [Event(0, "guard", {})]
    assert np.isnan(run.series("lr")[1]).all() and run.series("loss")[1].tolist() == [1.0]
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET config = '{bad'")
    con.commit()
    con.close()
    assert open_run(path, "r").config == {}


def test_corrupt_pages_give_a_one_line_store_error(tmp_path):
    path = tmp_path / "s.db"
    w = RunWriter(path, "r", config={})
    for s in range(3000):
        w.add(s, {"loss": 1.0, "lr": 0.1})
    w.close()
    data = bytearray(path.read_bytes())
    for i in range(4096 * 3, len(data), 97):  # scribble over every page after the schema
        data[i] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as exc:
        open_run(path, "r").series("loss")
    assert "\n" not in str(exc.value)


CREATE = textwrap.dedent(
    """
    import sys, time
    from stablestep.telemetry.store import RunWriter
    start = float(sys.argv[2])
    while time.time() < start:
        time.sleep(0.001)
    w = RunWriter(sys.argv[1], "job", config={})
    w.add(0, {"loss": 1.0})
    w.close()
    print(w.run)
    """
)


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    """Several processes create the same new store and claim the same run name in the
    same millisecond: every one succeeds under its own name (a failure 5 times in 60
    before the schema and the name claim became one BEGIN IMMEDIATE transaction)."""
    for round_ in range(3):
        path = tmp_path / f"s{round_}.db"
        start = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", CREATE, str(path), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(5)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0] * 5, [e for _, e in outs]
        got = sorted(o.strip() for o, _ in outs)
        assert got == sorted(["job", "job-2", "job-3", "job-4", "job-5"])
        assert sorted(list_runs(path)) == got


def test_export_writes_csv_by_default_and_errors_are_one_line(tmp_path, capsys):
    from stablestep.cli import main

    path = tmp_path / "s.db"
    w = RunWriter(path, "r", config={})
    for s in range(3):
        w.add(s, {"loss": 1.0 + s, "lr": 0.1})
    w.close()
    assert main(["export", str(path)]) == 0  # no --csv needed
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "step,loss,lr" and out[1] == "0,1.0,0.1" and len(out) == 4
    assert main(["export", str(path), "--csv", "-o", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "step,loss,lr"
    assert "wrote 3 steps of run 'r'" in capsys.readouterr().err
    cases = {str(tmp_path): "is a directory without a run.sqlite",
             str(tmp_path / "none.db"): "no run store at"}
    for p, msg in cases.items():
        assert main(["export", p]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(path), "--run", "zz"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no run 'zz' in {path}; runs: r")
    assert main(["export", str(path), "-o", str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err


def test_series_steps_with_and_without_gaps(tmp_path):
    """Steps every integer from first to last are not read (the count proves them); with
    gaps, strides or non-finite values left out they are read as stored."""
    path = tmp_path / "s.db"
    w = RunWriter(path, "r", config={})
    for s in range(5, 105):
        m = {"loss": float(s), "every": float(s)}
        if s % 10 == 0:
            m["tenth"] = -float(s)
        if s != 50:
            m["gap"] = 1.0
        w.add(s, m)
    w.add(105, {"loss": float("nan")})
    w.close()
    run = open_run(path, "r")
    steps, values = run.series("every")
    assert steps.dtype == np.int64 and steps.tolist() == list(range(5, 105))
    assert values.tolist() == [float(s) for s in range(5, 105)]
    assert run.series("tenth")[0].tolist() == list(range(10, 105, 10))
    assert run.series("tenth")[1].tolist() == [-float(s) for s in range(10, 105, 10)]
    assert run.series("gap")[0].tolist() == [s for s in range(5, 105) if s != 50]
    assert run.series("loss")[0].tolist() == list(range(5, 105))  # the NaN step is absent
    with pytest.raises(KeyError):
        run.series("nothing")
