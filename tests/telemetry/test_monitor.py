"""Monitor lifecycle: non-finite values, resume, curvature hook, sinks, export, errors."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

import stablestep
from stablestep.cli import main as cli_main
from stablestep.telemetry import Monitor, TensorBoardSink, export_csv, list_runs, names, open_run
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

from .helpers import loss_of, tiny_problem


def train(mon, model, opt, x, y, steps, *, nan_at=()):
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        if mon.step in nan_at:
            loss = loss * float("nan")
        loss.backward()
        mon.observe(loss)
        if mon.step - 1 not in nan_at:  # like GradScaler: skip the step on NaN
            opt.step()
    return mon


def test_public_names_resolve():
    assert stablestep.Monitor is Monitor and stablestep.open_run is open_run
    assert stablestep.list_runs is list_runs


def test_nan_loss_is_an_event_not_a_number(tmp_path):
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Monitor(model, opt, store=tmp_path / "s.db", run="nan", state_every=2) as mon:
        train(mon, model, opt, x, y, 8, nan_at={3, 4})
    run = open_run(tmp_path / "s.db", "nan")
    ev = [e for e in run.events if e.kind == names.EVENT_NONFINITE]
    assert [e.step for e in ev] == [3, 4]
    assert ev[0].data["what"][:2] == ["grad", "loss"]
    assert ev[0].data["tensors"] == {n: p.numel() for n, p in model.named_parameters()}
    steps, loss = run.series("loss")
    assert steps.tolist() == [0, 1, 2, 5, 6, 7] and np.isfinite(loss).all()
    n = sum(p.numel() for p in model.parameters())
    assert run.series("grad_nonfinite")[1].tolist() == [0, 0, 0, n, n, 0, 0, 0]
    for name in run.names():
        assert np.isfinite(run.series(name)[1]).all(), name
    df = run.to_dataframe()
    assert df.index.tolist() == list(range(8)) and math.isnan(df.loc[3, "loss"])
    # the skipped step 4 has no update statistics; step 6 does
    assert 4 not in run.series("update_norm")[0] and 6 in run.series("update_norm")[0]


def _fresh(info=None, seed=0):
    """The tiny problem with a row of the table at lr 2e-2 (torch Adam with AMSGrad when
    ``info`` is None)."""
    model, x, y = tiny_problem(seed)
    if info is None:
        opt = torch.optim.Adam(model.parameters(), lr=2e-2, amsgrad=True)
    else:
        opt = info(model.parameters(), lr=2e-2)
    return model, opt, x, y


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_resume_continues_identically_without_gaps_or_duplicates(tmp_path, info):
    """For every optimizer of the table (tests/optim_table.py)."""
    store = tmp_path / "s.db"
    # reference: one uninterrupted run of 12 steps
    model, opt, x, y = _fresh(info)
    with Monitor(model, opt, store=store, run="ref", state_every=3) as mon:
        train(mon, model, opt, x, y, 12)
    # interrupted: checkpoint after 7 steps, run on to 10, "crash", resume from 7
    model, opt, x, y = _fresh(info)
    mon = Monitor(model, opt, store=store, run="job", state_every=3, flush_every=1)
    train(mon, model, opt, x, y, 7)
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()}
    )
    assert ckpt["mon"]["step"] == 7 and ckpt["mon"]["run"] == "job"
    train(mon, model, opt, x, y, 3)
    mon.flush()  # the abandoned steps 7..9 are on disk; the process dies without close()
    mon._handle.remove()

    model, opt, _, _ = _fresh(info, seed=1)  # different init: everything comes from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with Monitor(model, opt, store=store, state_every=3) as mon2:
        mon2.load_state_dict(ckpt["mon"])
        assert mon2.run_name == "job" and mon2.step == 7
        train(mon2, model, opt, x, y, 5)
    ref, job = open_run(store, "ref"), open_run(store, "job")
    assert list_runs(store) == ["ref", "job"]
    assert job.names() == ref.names()
    for name in ref.names():
        rs, rv = ref.series(name)
        js, jv = job.series(name)
        assert js.tolist() == rs.tolist(), name
        np.testing.assert_allclose(jv, rv, rtol=1e-6, atol=0, err_msg=name)


def test_load_state_dict_after_observe_is_an_error(tmp_path):
    model, opt, x, y = _fresh()
    with Monitor(model, opt, store=tmp_path / "s.db") as mon:
        sd = train(mon, model, opt, x, y, 1).state_dict()
        with pytest.raises(RuntimeError, match="before the first observe"):
            mon.load_state_dict(sd)


class FakeProbe:
    """Stands in for stablestep.curvature.CurvatureProbe: counts calls, keeps state."""

    def __init__(self, params, optimizer):
        self.calls = 0

    def __call__(self, loss_fn):
        self.calls += 1
        loss_fn()
        return {names.SHARPNESS: float(self.calls), names.PRECOND_SHARPNESS: float("inf")}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, sd):
        self.calls = sd["calls"]


def test_curvature_hook_every_n_steps_and_resumes(tmp_path, monkeypatch):
    import stablestep.curvature

    monkeypatch.setattr(stablestep.curvature, "CurvatureProbe", FakeProbe)
    model, opt, x, y = _fresh()
    closure = lambda: loss_of(model, x, y)  # noqa: E731
    mon = Monitor(
        model, opt, store=tmp_path / "s.db", run="c", curvature_every=4, curvature_loss=closure
    )
    train(mon, model, opt, x, y, 9)
    sd = mon.state_dict()
    mon.close()
    assert sd["curvature"] == {"calls": 3}
    model2, opt2, _, _ = _fresh()
    with Monitor(
        model2, opt2, store=tmp_path / "s.db", curvature_every=4, curvature_loss=closure
    ) as mon2:
        mon2.load_state_dict(sd)
        train(mon2, model2, opt2, x, y, 4)  # steps 9..12: probe at 12
    run = open_run(tmp_path / "s.db", "c")
    steps, vals = run.series(names.SHARPNESS)
    assert steps.tolist() == [0, 4, 8, 12] and vals.tolist() == [1, 2, 3, 4]
    nonfinite = [e for e in run.events if e.kind == names.EVENT_NONFINITE]
    assert [e.step for e in nonfinite] == [0, 4, 8, 12]
    assert nonfinite[0].data["what"] == [names.PRECOND_SHARPNESS]


def test_real_curvature_probe_records_sharpness(tmp_path):
    model, x, y = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(
        model,
        opt,
        store=tmp_path / "s.db",
        curvature_every=5,
        curvature_loss=lambda: loss_of(model, x, y),
    ) as mon:
        train(mon, model, opt, x, y, 6)
    run = open_run(tmp_path / "s.db")
    steps, lam = run.series(names.SHARPNESS)
    assert steps.tolist() == [0, 5] and (lam > 0).all()
    _, lr_lam = run.series(names.LR_SHARPNESS)
    np.testing.assert_allclose(lr_lam, 0.1 * lam, rtol=1e-6)


def test_hook_is_removed_on_close_and_context_manager(tmp_path):
    model, opt, x, y = _fresh()
    with Monitor(model, opt, store=tmp_path / "s.db", run="a") as mon:
        train(mon, model, opt, x, y, 2)
    assert not opt._optimizer_step_post_hooks
    with pytest.raises(RuntimeError, match="after close"):
        mon.observe(1.0)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()  # no monitor attached any more: nothing recorded
    assert open_run(tmp_path / "s.db").series("loss")[0].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "Invalid every: 0"),
        ({"state_every": -1}, "Invalid state_every: -1"),
        ({"top_k": -1}, "Invalid top_k: -1"),
        ({"flush_seconds": 0}, "Invalid flush_seconds: 0"),
        ({"curvature_every": 5}, "curvature_every and curvature_loss must be given together"),
        ({"config": {"optimizer": "x"}}, "config key 'optimizer' is reserved"),
        ({"quantile_sample": 0}, "Invalid quantile_sample: 0"),
    ],
)
def test_argument_errors(tmp_path, kwargs, message):
    model, opt, _, _ = _fresh()
    with pytest.raises(ValueError, match=message):
        Monitor(model, opt, store=tmp_path / "s.db", **kwargs)


_SUFFIX_CONTRACT = "overwrite" in __import__("inspect").signature(
    __import__("stablestep.telemetry.store", fromlist=["RunWriter"]).RunWriter
).parameters


@pytest.mark.skipif(not _SUFFIX_CONTRACT, reason="store without the run-name suffix contract")
def test_same_run_name_twice_gets_a_visible_suffix_or_is_overwritten(tmp_path, caplog):
    model, opt, x, y = _fresh()
    with Monitor(model, opt, store=tmp_path / "s.db", run="a") as mon:
        train(mon, model, opt, x, y, 2)
    with caplog.at_level("INFO", logger="stablestep.telemetry"):
        with Monitor(model, opt, store=tmp_path / "s.db", run="a") as mon:
            train(mon, model, opt, x, y, 3)
    assert mon.run_name != "a" and mon.run_name.startswith("a")
    assert mon.run_name in caplog.text
    assert len(open_run(tmp_path / "s.db", "a").series("loss")[0]) == 2
    assert len(open_run(tmp_path / "s.db", mon.run_name).series("loss")[0]) == 3
    with Monitor(model, opt, store=tmp_path / "s.db", run="a", overwrite=True) as mon:
        train(mon, model, opt, x, y, 4)
    assert mon.run_name == "a"
    assert len(open_run(tmp_path / "s.db", "a").series("loss")[0]) == 4


def test_config_cadence_and_extras(tmp_path):
    model, opt, x, y = _fresh()
    with Monitor(
        model,
        opt,
        store=tmp_path / "s.db",
        every=2,
        state_every=None,
        config={"scenario": "seed-001"},
    ) as mon:
        train(mon, model, opt, x, y, 5)
    run = open_run(tmp_path / "s.db")
    cfg = run.config
    assert cfg["scenario"] == "seed-001" and cfg["optimizer"] == "Adam"
    assert cfg["hyper"]["amsgrad"] is True and cfg["hyper"]["eps"] == 1e-8
    assert cfg["n_params"] == sum(p.numel() for p in model.parameters())
    assert cfg["torch_version"] == torch.__version__ and cfg["started_at"].endswith("+00:00")
    assert run.series("loss")[0].tolist() == [0, 2, 4]
    assert "eff_step_max" not in run.names()


def test_csv_export_and_cli(tmp_path, capsys):
    model, opt, x, y = _fresh()
    with Monitor(model, opt, store=tmp_path / "s.db", run="r", state_every=2) as mon:
        train(mon, model, opt, x, y, 4, nan_at={1})
    out = tmp_path / "r.csv"
    assert cli_main(["export", str(tmp_path / "s.db"), "--csv", "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    run = open_run(tmp_path / "s.db", "r")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert rows[1]["loss"] == ""  # the NaN step: an empty cell
    assert float(rows[2]["loss"]) == run.series("loss")[1][1]
    assert rows[1]["eff_step_max"] == "" and rows[2]["eff_step_max"] != ""
    assert export_csv(tmp_path / "s.db", tmp_path / "b.csv", name="r") == 4
    assert (tmp_path / "b.csv").read_text() == out.read_text()
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "s.db"), "--csv", "--run", "r"]) == 0
    assert capsys.readouterr().out == out.read_text()
    assert cli_main(["export", str(tmp_path / "s.db"), "--list"]) == 0
    assert capsys.readouterr().out == "r\n"
    assert cli_main(["export", str(tmp_path / "s.db")]) == 0  # CSV is the default
    assert capsys.readouterr().out == out.read_text()
    assert cli_main(["export", str(tmp_path / "nope.db"), "--csv"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "s.db"), "--csv", "--run", "zz"]) == 2
    assert "no run 'zz'" in capsys.readouterr().err


def test_tensorboard_sink(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, opt, x, y = _fresh()
    sink = TensorBoardSink(tmp_path / "tb")
    with Monitor(model, opt, store=tmp_path / "s.db", sinks=[sink]) as mon:
        train(mon, model, opt, x, y, 3, nan_at={2})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("stablestep/loss")]
    stored = open_run(tmp_path / "s.db").series("loss")
    assert [s for s, _ in loss] == stored[0].tolist() == [0, 1]
    assert [v for _, v in loss] == pytest.approx(stored[1].tolist(), rel=1e-6)
    assert "stablestep/eff_step_p99" in acc.Tags()["scalars"]


def test_buffered_writes_flush_by_count_time_and_close(tmp_path):
    model, opt, x, y = _fresh()
    lazy = Monitor(
        model, opt, store=tmp_path / "s.db", run="lazy", flush_every=1000, flush_seconds=1e9
    )
    train(lazy, model, opt, x, y, 3)
    eager = Monitor(
        model, opt, store=tmp_path / "s.db", run="eager", flush_every=1000, flush_seconds=1e-9
    )
    lazy._handle.remove()  # only `eager` watches the optimizer now
    train(eager, model, opt, x, y, 3)
    counted = Monitor(
        model, opt, store=tmp_path / "s.db", run="counted", flush_every=2, flush_seconds=1e9
    )
    eager._handle.remove()
    train(counted, model, opt, x, y, 3)
    assert open_run(tmp_path / "s.db", "eager").series("loss")[0].tolist() == [0, 1, 2]
    assert open_run(tmp_path / "s.db", "counted").series("loss")[0].tolist() == [0, 1]
    with pytest.raises(KeyError):
        open_run(tmp_path / "s.db", "lazy").series("loss")
    for mon in (lazy, eager, counted):
        mon.close()
    for name in ("lazy", "eager", "counted"):
        assert open_run(tmp_path / "s.db", name).series("loss")[0].tolist() == [0, 1, 2]
