"""The Monitor under torch.distributed (2 gloo processes on CPU): DDP and FSDP2 store the
numbers one process stores on the concatenated batch, in one run, written by rank 0."""

from __future__ import annotations

import math

import pytest
import torch

from stablestep.telemetry import Monitor, list_runs, open_run

from ._launch import data, launch, tiny_model, wrap

STEPS = 6


def _train(model, opt, mon, x, y, *, stop_at=None, nan=False):
    for t in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if nan and t == stop_at:
            loss = loss * float("nan")
        loss.backward()
        mon.observe(loss)
        if t == stop_at:
            break
        opt.step()
    mon.close()


def _worker(rank, world, mode, store, nan=None):
    model = wrap(tiny_model(), mode, world)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x, y = data()
    half = len(x) // world
    xl, yl = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    mon = Monitor(model, opt, store=store, run=mode, state_every=2, flush_every=4,
                  secant_every=1)
    stop_at = nan[1] if nan is not None else None  # every rank stops there
    _train(model, opt, mon, xl, yl, stop_at=stop_at, nan=nan is not None and nan[0] == rank)


def _reference(store):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x, y = data()
    # the secant curvature at every step: its dot products are summed over ranks (DDP:
    # the tensors rank 0 counts; FSDP2: every rank's shards)
    _train(model, opt, Monitor(model, opt, store=store, run="one", state_every=2,
                               secant_every=1), x, y)
    return open_run(store, "one")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_store_the_numbers_of_one_process_on_the_whole_batch(tmp_path, mode):
    store = tmp_path / "dist.db"
    launch(_worker, mode, str(store))
    assert list_runs(store) == [mode]  # one run, rank 0 wrote it
    run = open_run(store, mode)
    ref = _reference(tmp_path / "one.db")
    assert run.config["world_size"] == 2
    names = set(run.names())
    want = set(ref.names())
    assert want <= names, want - names  # same names: DDP's "module." prefix is not added
    assert {"secant_curvature", "secant_cos"} <= want
    assert len(run.series("secant_curvature")[0]) == STEPS - 1  # every step after the first
    assert "loss_spread" in names
    for name in sorted(want):
        steps, values = run.series(name)
        rsteps, rvalues = ref.series(name)
        assert steps.tolist() == rsteps.tolist(), name
        assert values.tolist() == pytest.approx(rvalues.tolist(), rel=1e-4, abs=1e-9), name
    # the per-rank losses differ (different halves of the batch): their range is stored
    _, spread = run.series("loss_spread")
    assert len(spread) == STEPS and (spread > 0).all()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_is_an_event_naming_that_rank(tmp_path, mode):
    store = tmp_path / "dist.db"
    launch(_worker, mode, str(store), (1, 3))
    run = open_run(store, mode)
    events = [e for e in run.events if e.kind == "non-finite"]
    assert events, "no non-finite event"
    first = events[0]
    assert first.step == 3 and first.data["ranks"] == [1] and "loss" in first.data["what"]
    steps, values = run.series("loss")
    assert 3 not in steps.tolist() and all(math.isfinite(v) for v in values.tolist())


def _amsgrad_first(model):
    """Adam with AMSGrad on the first tensor only: the rank that reads it is the only one
    with AMSGrad statistics (the packed layout must still match on every rank)."""
    first, *rest = model.parameters()
    return torch.optim.Adam([{"params": [first], "amsgrad": True}, {"params": rest}], lr=3e-2)


def _balanced_worker(rank, world, store):
    """DDP with AMSGrad on one tensor, a quantile sample smaller than the model, rank 0
    writing by its timer at every step and flushing alone mid-run (as a checkpoint on rank
    0 does)."""
    import torch.distributed as dist

    model = wrap(tiny_model(), "ddp", world)
    opt = _amsgrad_first(model)
    x, y = data()
    half = len(x) // world
    xl, yl = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    mon = Monitor(model, opt, store=store, run="ddp", state_every=2, flush_every=4,
                  flush_seconds=1e-9, quantile_sample=50, secant_every=1)
    # the replicas' statistics are split: each tensor is read by exactly one rank
    counted = [None] * world
    dist.all_gather_object(counted, mon._rec.weights)
    assert [sum(c) for c in zip(*counted, strict=True)] == [1.0] * len(counted[0])
    assert all(sum(c) > 0 for c in counted), counted
    for t in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xl), yl)
        loss.backward()
        mon.observe(loss)
        opt.step()
        if rank == 0 and t in (1, 2):  # no collective: this must neither hang nor lose a step
            mon.flush() if t == 1 else mon.state_dict()
    mon.close()


def test_ddp_splits_the_work_and_a_flush_on_rank_0_alone_neither_hangs_nor_loses_a_step(
        tmp_path):
    store = tmp_path / "dist.db"
    launch(_balanced_worker, str(store))
    assert list_runs(store) == ["ddp"]
    run = open_run(store, "ddp")
    model = tiny_model()
    opt = _amsgrad_first(model)
    x, y = data()
    one = Monitor(model, opt, store=tmp_path / "one.db", run="one", state_every=2,
                  quantile_sample=50, secant_every=1)
    _train(model, opt, one, x, y)
    ref = open_run(tmp_path / "one.db", "one")
    assert one._rec.sample.exact is False  # the quantiles below come from a sample
    want = set(ref.names())
    assert {"amsgrad_gap", "eff_step_p50", "eff_step_p99", "secant_curvature"} <= want
    assert want <= set(run.names()), want - set(run.names())
    for name in sorted(want):
        steps, values = run.series(name)
        rsteps, rvalues = ref.series(name)
        assert steps.tolist() == rsteps.tolist(), name  # every step, once
        assert values.tolist() == pytest.approx(rvalues.tolist(), rel=1e-4, abs=1e-9), name
