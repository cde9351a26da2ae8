"""Every source kind reads into the same trace, and unusable input fails with one line."""

import json
import math

import numpy as np
import pytest
import torch

import stablestep
from stablestep.diagnosis import SourceError, diagnose, load
from stablestep.telemetry import names

LOSS = [2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.8, 0.78, 0.75, 0.74, 0.72, 0.71, 0.70, 7.5, 0.9, 0.75]


def _check(trace, steps=None):
    steps = list(range(len(LOSS))) if steps is None else steps
    assert trace.steps.tolist() == steps
    np.testing.assert_allclose(trace.loss, LOSS)


def test_csv_with_optional_columns(tmp_path):
    p = tmp_path / "log.csv"
    rows = ["iteration,lm_loss,learning_rate,grad_norm"]
    rows += [f"{10 * i},{v},0.001,{1.0 if i != 13 else 40.0}" for i, v in enumerate(LOSS)]
    p.write_text("\n".join(rows) + "\n")
    (t,) = load(str(p))
    _check(t, [10 * i for i in range(len(LOSS))])
    assert t.metric(names.LR)[0] == 0.001
    assert t.metric(names.GRAD_NORM)[13] == 40.0
    f = diagnose(str(p))
    assert [(x.step, x.kind) for x in f] == [(130, "spike")]


def test_csv_nan_rows_are_non_finite_and_run_column_splits(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("run,step,loss\na,0,1.0\na,1,nan\nb,0,2.0\nb,1,1.9\n")
    ta, tb = load(str(p))
    assert (ta.name, tb.name) == ("a", "b")
    assert ta.nonfinite_steps == {1} and math.isnan(ta.loss[1])
    (only_b,) = load(str(p), run="b")
    assert only_b.loss.tolist() == [2.0, 1.9]
    with pytest.raises(SourceError, match=r"no run 'c' in .*log.csv; runs: a, b"):
        load(str(p), run="c")


def test_keras_history_json_counts_epochs_from_zero(tmp_path):
    p = tmp_path / "history.json"
    p.write_text(json.dumps({"loss": LOSS, "val_loss": LOSS[::-1], "accuracy": [0.5] * 16}))
    (t,) = load(str(p))
    _check(t)
    p2 = tmp_path / "wrapped.json"
    p2.write_text(json.dumps({"history": {"loss": LOSS}, "params": {"epochs": 16}}))
    _check(load(str(p2))[0])


def test_json_of_parallel_arrays_and_records(tmp_path):
    p = tmp_path / "arrays.json"
    p.write_text(json.dumps({"epoch": list(range(0, 1600, 100)), "train_loss": LOSS,
                             "test_loss": [1.0] * 16}))
    _check(load(str(p))[0], list(range(0, 1600, 100)))
    p2 = tmp_path / "records.json"
    p2.write_text(json.dumps([{"step": i, "loss": v} for i, v in enumerate(LOSS)]))
    _check(load(str(p2))[0])


def test_llmc_text_log_ignores_validation_lines(tmp_path):
    p = tmp_path / "main.log"
    lines = ["s:0 tel:3.0"] + [f"s:{i} trl:{v} lr:0.0006 norm:0.5" for i, v in enumerate(LOSS)]
    p.write_text("\n".join(lines) + "\ns:16 tel:0.7\n")
    (t,) = load(str(p))
    _check(t)
    assert t.metric(names.GRAD_NORM)[0] == 0.5


def test_tensorboard_directory(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tb"))
    for i, v in enumerate(LOSS):
        w.add_scalar("train/loss", v, i)
        w.add_scalar("val/loss", 1.0, i)
        w.add_scalar("lr", 1e-3, i)
    w.close()
    (t,) = load(str(tmp_path / "tb"))
    np.testing.assert_allclose(t.loss, LOSS, rtol=1e-6)
    assert t.metric(names.LR)[0] == pytest.approx(1e-3)


def test_tensorboard_keras_layout_skips_the_validation_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for sub, values in (("train", LOSS), ("validation", [5.0] * len(LOSS))):
        w = SummaryWriter(str(tmp_path / "logs" / sub))
        for i, v in enumerate(values):
            w.add_scalar("epoch_loss", v, i)
        w.close()
    (t,) = load(str(tmp_path / "logs"))
    assert t.name == "" and t.loss[0] == pytest.approx(LOSS[0])


@pytest.mark.parametrize("content,match", [
    ("a,b\n1,2\n", "no training-loss column"),
    ("{not json", "not valid JSON"),
    ('{"acc": [1, 2]}', "no training-loss array"),
    ("hello world\n", "no line with a step and a training loss"),
])
def test_unusable_input_one_line_errors(tmp_path, content, match):
    ext = ".json" if content.startswith("{") else (".csv" if "," in content else ".log")
    p = tmp_path / f"bad{ext}"
    p.write_text(content)
    with pytest.raises(SourceError, match=match) as exc:
        load(str(p))
    assert "\n" not in str(exc.value)


def test_missing_path():
    with pytest.raises(SourceError, match="no such file or directory"):
        load("/nonexistent/run.csv")


def test_store_written_by_monitor_is_diagnosed_end_to_end(tmp_path):
    """Adam at its adaptive edge of stability, recorded by the Monitor with curvature:
    the diagnosis names the mechanism and computes eps from the stored numbers."""
    torch.set_num_threads(1)
    from benchmarks.labeled import _data, _model

    x, y = _data(0)
    model = _model(0, 64, "gelu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mse = torch.nn.functional.mse_loss
    store = tmp_path / "runs.db"
    with stablestep.Monitor(model, opt, store=store, run="aeos", state_every=1,
                            curvature_every=10,
                            curvature_loss=lambda: mse(model(x), y)) as mon:
        for _ in range(700):
            opt.zero_grad()
            loss = mse(model(x), y)
            loss.backward()
            mon.observe(loss)
            opt.step()
    findings = diagnose(str(store), run="aeos")
    # invariants, not the count of a chaotic trajectory (another CPU groups the same spikes
    # into separate spike findings): every finding is Adam's edge of stability, >= 3 spikes,
    # and every eps remedy is the one the stored numbers give
    assert findings and {f.mechanism for f in findings} == {"adaptive-edge-of-stability"}
    assert sum(f.evidence.get("n_spikes", 1) for f in findings) >= 3
    with_eps = [f for f in findings if any(r.action == "set-eps" for r in f.remedies)]
    assert with_eps
    for f in with_eps:
        eps = next(r for r in f.remedies if r.action == "set-eps").value
        lam = f.evidence[names.SHARPNESS]
        assert eps == pytest.approx(1e-2 / (1 - 0.9 ** f.step) * lam * 0.1 / 3.8, rel=0.1)
    run = stablestep.open_run(str(store), "aeos")
    assert diagnose(run)[0].to_dict() == findings[0].to_dict()
    with pytest.raises(SourceError, match="no run 'other' in .*runs: aeos"):
        diagnose(str(store), run="other")
    # the telemetry's CSV export reads back with every metric the diagnosis needs
    from stablestep.telemetry import export_csv

    export_csv(str(store), tmp_path / "aeos.csv", name="aeos")
    from_csv = diagnose(str(tmp_path / "aeos.csv"))
    assert [(g.step, g.kind, g.mechanism) for g in from_csv] == [
        (f.step, f.kind, f.mechanism) for f in findings]
