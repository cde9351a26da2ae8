"""Each reader on files written in the tests from its format's documented schema, and a
regression test for each input that once gave a traceback, a hang or a silent loss."""

from __future__ import annotations

import json
import logging
import math
import os
import struct

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablestep.diagnosis import SourceError, diagnose, from_series, load
from stablestep.diagnosis.sources import ReadInfo, SourceWarning, build_trace
from stablestep.telemetry import names

LOSS = [2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.8, 0.78, 0.75, 0.74, 0.72, 0.71, 0.70, 7.5, 0.9, 0.75]


def _infos(source, **kw):
    infos: list[ReadInfo] = []
    traces = load(source, infos=infos, **kw)
    assert len(infos) == len(traces)
    return traces, infos


# --- in-memory objects -------------------------------------------------------------

def test_dataframe_series_dict_ndarray_and_list_are_accepted():
    steps = [10 * i for i in range(len(LOSS))]
    df = pd.DataFrame({"step": steps, "loss": LOSS, "lr": 1e-3})
    by_index = pd.DataFrame({"loss": LOSS}, index=pd.Index(steps, name="step"))
    series = pd.Series(LOSS, index=steps, name="train_loss")
    for obj in (df, by_index, series, {"step": steps, "loss": LOSS},
                dict(zip(steps, LOSS, strict=True)), np.column_stack([steps, LOSS]),
                list(zip(steps, LOSS, strict=True)),
                [{"step": s, "loss": v} for s, v in zip(steps, LOSS, strict=True)]):
        (t,) = load(obj)
        assert t.steps.tolist() == steps, type(obj)
        np.testing.assert_allclose(t.loss, LOSS)
    for obj in (np.asarray(LOSS), LOSS, pd.Series(LOSS)):  # no steps: counted from 0
        (t,) = load(obj)
        assert t.steps.tolist() == list(range(len(LOSS)))
    assert load(df)[0].metric(names.LR)[0] == 1e-3
    f = diagnose(df)
    assert [(x.step, x.kind) for x in f] == [(130, "spike")]
    with pytest.raises(SourceError, match="cannot read a set"):
        load({1.0, 2.0})


# --- Hugging Face, W&B, Keras ---------------------------------------------------------

def test_hf_trainer_state_reads_log_history_at_global_steps(tmp_path):
    """transformers.TrainerState.save_to_json: log_history holds one dict per logging step
    (loss, grad_norm, learning_rate, epoch, step), eval dicts (eval_loss, step) and a
    final summary (train_loss = the run's mean, train_runtime...)."""
    history = []
    for i, v in enumerate(LOSS):
        step = 5 * (i + 1)
        history.append({"epoch": step / 80, "grad_norm": 1.0 + (i == 13) * 30,
                        "learning_rate": 5e-5, "loss": v, "step": step})
        if i % 5 == 4:
            history.append({"epoch": step / 80, "eval_loss": 9.9, "eval_runtime": 0.1,
                            "step": step})
    history.append({"epoch": 1.0, "step": 80, "total_flos": 1.0, "train_loss": 1.3,
                    "train_runtime": 3.2})
    state = {"best_metric": None, "epoch": 1.0, "global_step": 80, "logging_steps": 5,
             "log_history": history, "max_steps": 80, "trial_name": None}
    p = tmp_path / "checkpoint-80" / "trainer_state.json"
    p.parent.mkdir()
    p.write_text(json.dumps(state, indent=2))
    (t,), (info,) = _infos(str(p))
    assert t.steps.tolist() == [5 * (i + 1) for i in range(len(LOSS))]
    np.testing.assert_allclose(t.loss, LOSS)
    assert t.metric(names.GRAD_NORM)[13] == 31.0 and t.metric(names.LR)[0] == 5e-5
    assert (info.loss_column, info.step_column, info.points) == ("loss", "step", 16)
    assert [(f.step, f.kind) for f in diagnose(str(p))] == [(70, "spike")]


def test_wandb_history_export_uses_steps_and_ignores_unlogged_cells(tmp_path):
    """wandb.Api().run(...).history() / the UI's CSV: one row per wandb.log call, keys not
    logged in that call left empty; _step, _runtime, _timestamp always present."""
    rows = []
    for i, v in enumerate(LOSS):
        rows.append({"_step": 2 * i, "_runtime": i, "_timestamp": 1.7e9 + i,
                     "train/loss": v, "train/learning_rate": 1e-4, "train/global_step": 10 * i})
        rows.append({"_step": 2 * i + 1, "_runtime": i, "_timestamp": 1.7e9 + i,
                     "eval/loss": 3.0, "train/global_step": 10 * i})
    p = tmp_path / "wandb_export.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    (t,), (info,) = _infos(str(p))
    assert info.step_column == "train/global_step" and info.loss_column == "train/loss"
    assert t.steps.tolist() == [10 * i for i in range(len(LOSS))]
    assert np.isfinite(t.loss).all() and t.nonfinite_steps == frozenset()
    assert t.metric(names.LR)[0] == 1e-4
    # without train/global_step, W&B's own _step (not the row number)
    pd.DataFrame(rows).drop(columns="train/global_step").to_csv(p, index=False)
    (t,) = load(str(p))
    assert t.steps.tolist() == [2 * i for i in range(len(LOSS))]


def test_wandb_chart_export_reads_each_runs_value_column(tmp_path):
    """The chart menu's 'Download CSV': Step, then per run '<run> - <key>' with
    '__MIN'/'__MAX' band columns; runs that did not log a step have empty cells."""
    df = pd.DataFrame({"Step": range(len(LOSS))})
    for run, scale in (("sunny-1", 1.0), ("rainy-2", 2.0)):
        df[f"{run} - train/loss"] = [scale * v for v in LOSS]
        df[f"{run} - train/loss__MIN"] = 0.0
        df[f"{run} - train/loss__MAX"] = 100.0
    df.loc[3, "rainy-2 - train/loss"] = np.nan
    p = tmp_path / "chart.csv"
    df.to_csv(p, index=False)
    traces, infos = _infos(str(p))
    assert [t.name for t in traces] == ["sunny-1", "rainy-2"]
    np.testing.assert_allclose(traces[0].loss, LOSS)
    assert 3 not in traces[1].steps.tolist() and traces[1].nonfinite_steps == frozenset()
    np.testing.assert_allclose(traces[1].loss, [2 * v for i, v in enumerate(LOSS) if i != 3])
    (only,) = load(str(p), run="rainy-2")
    assert only.name == "rainy-2"
    with pytest.raises(SourceError, match="no run 'x' in .*; runs: sunny-1, rainy-2"):
        load(str(p), run="x")


def test_keras_history_warns_that_it_is_epoch_level(tmp_path, caplog):
    p = tmp_path / "history.json"
    p.write_text(json.dumps({"loss": LOSS, "val_loss": LOSS}))
    caplog.set_level(logging.INFO, logger="stablestep.diagnosis.sources")
    with pytest.warns(SourceWarning, match="one point per epoch"):
        (t,), (info,) = _infos(str(p))
    assert info.coarse and info.step_column is None
    assert "read 'loss' (16 points" in caplog.text
    # a per-step log is not called coarse
    q = tmp_path / "steps.csv"
    q.write_text("step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(LOSS)))
    _, (info,) = _infos(str(q))
    assert not info.coarse and str(info).startswith(f"{q}: read 'loss' (16 points, steps 0..15")


def test_json_lines_are_streamed_record_by_record(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": i, "loss": v, "lr": 1e-3}) + "\n"
                         for i, v in enumerate(LOSS)))
    (t,) = load(str(p))
    np.testing.assert_allclose(t.loss, LOSS)
    p.write_text(p.read_text() + "{broken\n")
    with pytest.raises(SourceError, match="not valid JSON Lines .* at line 17"):
        load(str(p))


# --- CSV dialects and missing values ---------------------------------------------------

def test_semicolon_csv_with_decimal_commas(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_text("Schritt;loss;lr\n" + "".join(
        f"{i};{str(v).replace('.', ',')};0,001\n" for i, v in enumerate(LOSS)))
    (t,), (info,) = _infos(str(p))
    assert info.step_column is None or t.steps.tolist() == list(range(len(LOSS)))
    np.testing.assert_allclose(t.loss, LOSS)
    assert t.metric(names.LR)[0] == 0.001
    tsv = tmp_path / "log.tsv"
    tsv.write_text("step\tloss\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(LOSS)))
    np.testing.assert_allclose(load(str(tsv))[0].loss, LOSS)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"step","loss","note"\n' + "".join(
        f'{i},{v},"a, b"\n' for i, v in enumerate(LOSS)))
    np.testing.assert_allclose(load(str(quoted))[0].loss, LOSS)


def test_pandas_nan_as_empty_cell_and_nan_text_are_non_finite(tmp_path):
    loss = list(LOSS)
    loss[14] = float("nan")
    p = tmp_path / "pandas.csv"
    pd.DataFrame({"step": range(len(loss)), "loss": loss, "lr": 1e-3}).to_csv(p, index=False)
    assert ",," in p.read_text() or "14,,0.001" in p.read_text()
    (t,) = load(str(p))
    assert t.nonfinite_steps == {14} and math.isnan(t.loss[14])
    assert any(f.kind in ("non-finite", "divergence") and f.step <= 14 for f in diagnose(str(p)))
    q = tmp_path / "nan.csv"
    q.write_text("step,loss\n0,1.0\n1,NaN\n2,inf\n3,1.0\n")
    assert load(str(q))[0].nonfinite_steps == {1, 2}


# --- regressions: inputs that gave tracebacks, hangs or silent losses ------------------

def test_hostile_csv_shapes_are_read_or_refused_in_one_line(tmp_path):
    p = tmp_path / "wide_row.csv"
    p.write_text("step,loss\n0,1.0\n1,1.0,extra,fields\n2,1.0\n")
    (t,) = load(str(p))  # fields beyond the header are ignored (pandas does the same)
    assert t.steps.tolist() == [0, 1, 2]
    shifted = tmp_path / "shifted.csv"
    shifted.write_text("step,note,loss\n0,a,1.0\n1,a,b,2.0\n2,c,1.0\n")
    with pytest.warns(SourceWarning, match="skipped 1 record"):
        assert load(str(shifted))[0].steps.tolist() == [0, 2]
    big = tmp_path / "big_step.csv"
    big.write_text("step,loss\n0,1.0\n99999999999999999999999,2.0\n2,1.0\n")
    with pytest.warns(SourceWarning, match="beyond int64"):
        assert load(str(big))[0].steps.tolist() == [0, 2]
    field = tmp_path / "field.csv"
    field.write_text("step,loss,note\n0,1.0," + "x" * 200_000 + "\n1,2.0,ok\n")
    assert load(str(field))[0].steps.tolist() == [0, 1]
    text = tmp_path / "text.csv"
    text.write_text("step,loss,grad_norm\n0,1.0,abc\n1,oops,1.0\n2,1.0,2.0\n")
    with pytest.warns(SourceWarning, match="skipped 1 record"):
        (t,) = load(str(text))
    assert t.steps.tolist() == [0, 2] and t.metric(names.GRAD_NORM)[1] == 2.0
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(50_000)) + ",step,loss\n"
                    + "," * 50_000 + "0,1.0\n")
    assert load(str(wide))[0].loss.tolist() == [1.0]


def test_hostile_json_and_text_logs(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SourceError, match="nested too deeply"):
        load(str(deep))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"step": 0, "loss": 1.0}, {"step": 1, "loss": {"a": 1}},
                               {"step": 2 ** 70, "loss": 1.0}, {"step": 3, "loss": "x"},
                               {"step": 4, "loss": None}, {"step": 5, "loss": 2.0}]))
    with pytest.warns(SourceWarning):
        (t,) = load(str(odd))
    assert t.steps.tolist() == [0, 4, 5] and t.nonfinite_steps == {4}
    log = tmp_path / "long.log"
    log.write_text("s:0 trl:1.0\n" + "a" * 80_000 + "\n" + "x:" * 40_000 + "\ns:1 trl:2.0\n")
    assert load(str(log))[0].loss.tolist() == [1.0, 2.0]


def test_fifo_and_directories_are_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file"):
        load(str(fifo))
    with pytest.raises(SourceError, match="neither TensorBoard event files nor a run store"):
        load(str(tmp_path))
    with pytest.raises(SourceError, match="not a valid path"):
        load("log\x00.csv")


def _tb(path, values):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(path))
    for i, v in enumerate(values):
        w.add_scalar("train/loss", v, i)
    w.close()
    (f,) = [os.path.join(path, n) for n in os.listdir(path) if "tfevents" in n]
    return f


def test_tensorboard_corrupt_record_is_skipped_with_a_warning(tmp_path):
    values = [1.0] * 200
    values[150] = 50.0
    f = _tb(tmp_path / "tb", values)
    data = bytearray(open(f, "rb").read())
    # find the record of step 33 and flip a byte of its payload
    pos, k = 0, 0
    while k < 34:  # the file-version record, then steps 0..32
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 16 + n
        k += 1
    data[pos + 14] ^= 0xFF
    open(f, "wb").write(bytes(data))
    with pytest.warns(SourceWarning, match="damaged event file: skipped .* corrupt bytes"):
        (t,) = load(str(tmp_path / "tb"))
    assert len(t) == 199 and 33 not in t.steps.tolist() and t.loss.max() == 50.0
    # a record cut short at the end (a crash while writing) is said too
    open(f, "wb").write(bytes(data[:-7]))
    with pytest.warns(SourceWarning, match="truncated record"):
        load(str(tmp_path / "tb"))


def test_run_name_on_a_single_run_source_must_match(tmp_path):
    _tb(tmp_path / "tb", LOSS)
    with pytest.raises(SourceError, match="no run 'nope' in"):
        load(str(tmp_path / "tb"), run="nope")
    from stablestep.cli import main

    assert main(["diagnose", str(tmp_path / "tb"), "--run", "nope"]) == 2


def test_a_run_without_metrics_does_not_hide_the_others(tmp_path):
    from stablestep.telemetry.store import RunWriter

    path = tmp_path / "s.db"
    w = RunWriter(path, "good", config={})
    for s, v in enumerate(LOSS):
        w.add(s, {"loss": v})
    w.close()
    RunWriter(path, "crashed", config={}).close()  # died before its first flush
    with pytest.warns(SourceWarning, match="skipped 1 run.* no loss recorded .*'crashed'"):
        (t,) = load(str(path))
    assert t.name == "good"
    with pytest.raises(SourceError, match="'crashed' has no 'loss'"):
        load(str(path), run="crashed")


# --- the vectorised trace builder is from_series ----------------------------------------

_steps = st.lists(st.integers(-5, 40), max_size=30)


@settings(max_examples=60, deadline=None)
@given(s=_steps, data=st.data())
def test_build_trace_equals_from_series(s, data):
    vals = st.one_of(st.floats(-1e3, 1e3), st.just(math.nan))
    loss = data.draw(st.lists(vals, min_size=len(s), max_size=len(s)))
    ms = data.draw(_steps)
    mv = data.draw(st.lists(vals, min_size=len(ms), max_size=len(ms)))
    nf = data.draw(st.lists(st.integers(-5, 40), max_size=4))
    a = from_series(s, loss, metrics={"lr": (ms, mv)}, nonfinite_steps=nf)
    b = build_trace(s, loss, metrics={"lr": (ms, mv)}, nonfinite_steps=nf)
    assert a.steps.tolist() == b.steps.tolist()
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.metrics["lr"], b.metrics["lr"])
    assert a.nonfinite_steps == b.nonfinite_steps


@pytest.mark.parametrize("sep,decimal", [(",", "."), (";", ",")])
def test_small_and_large_csvs_read_the_same_by_either_parser(tmp_path, monkeypatch, sep, decimal):
    """Small logs go through the csv module (no pandas import), large ones through pandas'
    C parser: the same file gives the same trace either way, text and empty cells included."""
    from stablestep.diagnosis.sources import tabular

    rows = [f"step{sep}loss{sep}lr"]
    for i in range(300):
        loss = "" if i == 120 else ("oops" if i == 130 else f"{1.0 / (i + 1):.6f}")
        rows.append(f"{i}{sep}{loss.replace('.', decimal)}{sep}{'0.001'.replace('.', decimal)}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    small = load(str(path))[0]
    monkeypatch.setattr(tabular, "_PANDAS_MIN_BYTES", 0)
    monkeypatch.setattr(tabular, "_PANDAS_MIN_ROWS", 0)
    large = load(str(path))[0]
    assert small.steps.tolist() == large.steps.tolist()
    np.testing.assert_array_equal(small.loss, large.loss)  # NaN where empty, as in pandas
    assert math.isnan(small.loss[120]) and 120 in small.nonfinite_steps
    np.testing.assert_array_equal(small.metric("lr"), large.metric("lr"))


def test_a_callbacks_log_directory_is_read_as_its_store(tmp_path):
    """The Lightning/HF/Keras callbacks write ``stablestep.db`` into their framework's log
    directory; ``diagnose DIR`` reads it like a lab directory's ``run.sqlite``."""
    from stablestep.telemetry.store import RunWriter

    w = RunWriter(str(tmp_path / "stablestep.db"), "cb", config={})
    for s in range(5):
        w.add(s, {"loss": 1.0 / (s + 1)})
    w.close()
    assert load(str(tmp_path))[0].loss.tolist() == [1.0, 0.5, 1 / 3, 0.25, 0.2]
