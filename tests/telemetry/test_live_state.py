"""The Monitor follows the optimizer as it is now (#16): param groups replaced by
``optimizer.load_state_dict()``, a NaN step count; and it does not sync the host per step."""

from __future__ import annotations

import copy
import math
import sys
import time

import pytest
import torch

from stablestep.telemetry import Monitor, open_run
from stablestep.telemetry import probes as P
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

from .helpers import loss_of, tiny_problem


def _steps(mon, model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        mon.observe(loss)
        opt.step()


def test_resume_follows_the_param_groups_load_state_dict_installs(tmp_path):
    store = tmp_path / "s.db"
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    with Monitor(model, opt, store=store, run="a", state_every=1) as mon:
        _steps(mon, model, opt, x, y, 4)
        ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()}
        ckpt = copy.deepcopy(ckpt)  # load_state_dict aliases the state tensors: keep it intact

    def resumed(run, monitor_first):
        m, _, _ = tiny_problem(seed=1)
        m.load_state_dict(ckpt["model"])
        o = torch.optim.Adam(m.parameters(), lr=1.0)  # the documented resume: a fresh optimizer
        if monitor_first:  # the Monitor sees the fresh groups, then load_state_dict replaces them
            mon = Monitor(m, o, store=store, run=run, state_every=1)
            o.load_state_dict(copy.deepcopy(ckpt["opt"]))
        else:  # reference: the Monitor is built on the already loaded optimizer
            o.load_state_dict(copy.deepcopy(ckpt["opt"]))
            mon = Monitor(m, o, store=store, run=run, state_every=1)
        if run == "a":
            mon.load_state_dict(ckpt["mon"])
        with mon:
            _steps(mon, m, o, x, y, 3)
        return open_run(store, mon.run_name)

    got = resumed("a", monitor_first=True)
    ref = resumed("ref", monitor_first=False)
    for name in ("eff_step_max", "eff_step_p50", "amsgrad_gap", "g2v_rms", "lr"):
        s_got, v_got = got.series(name)
        s_ref, v_ref = ref.series(name)
        assert s_got.tolist()[-3:] == [4, 5, 6], name
        assert v_got[-3:].tolist() == pytest.approx(v_ref.tolist(), rel=1e-6), name
    assert got.series("lr")[1][-1] == pytest.approx(1e-2)


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_a_nan_step_count_is_an_event_not_an_exception(tmp_path, info):
    info.skip_unless("eff_step")  # SGD keeps no step count
    model, x, y = tiny_problem()
    opt = info(model.parameters())
    with Monitor(model, opt, store=tmp_path / "s.db", run="nan", state_every=1) as mon:
        _steps(mon, model, opt, x, y, 3)
        for p in model.parameters():
            st = opt.state[p]
            st["step"] = torch.full_like(st["step"], math.nan) if torch.is_tensor(
                st["step"]) else math.nan
        _steps(mon, model, opt, x, y, 2)  # must not raise into opt.step()
    run = open_run(tmp_path / "s.db", "nan")
    events = [e for e in run.events if e.kind == "non-finite"]
    assert events and events[0].step == 3
    assert any(w.startswith("eff_step") for w in events[0].data["what"])
    steps, _ = run.series("eff_step_max")
    assert steps.tolist() == [0, 1, 2]  # the NaN statistics are not stored as numbers


def _count_host_reads(monkeypatch, opt) -> list[str]:
    """Calls of .item()/.tolist()/float()/int()/bool()/.numpy()/.cpu() made from the
    telemetry's code, the secant curvature's included (a CPU step counter read as a float,
    and probes._cpu_read, which only ever reads CPU tensors, are host memory, not a sync,
    and are left out)."""
    calls: list[str] = []

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            frame = sys._getframe(1)
            code = frame.f_code
            if ("stablestep/telemetry" in code.co_filename
                    and code.co_name not in ("to_host", "_cpu_read")
                    and not is_step(self)):
                calls.append(f"{name} in {code.co_name}:{frame.f_lineno}")
            return orig(self, *a, **k)

        return wrapper

    def is_step(t):
        return any(st.get("step") is t for st in opt.state.values())

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls


def test_host_transfers_only_when_the_store_is_written(tmp_path, monkeypatch):
    """No device-to-host transfer on a step; one per write (counted on the CPU:
    :func:`_count_host_reads`), the secant curvature's steps included."""
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = _count_host_reads(monkeypatch, opt)
    per_step = []
    start = P.HOST_TRANSFERS[0]
    with Monitor(model, opt, store=tmp_path / "s.db", run="sync", state_every=5,
                 flush_every=10, flush_seconds=1e9) as mon:
        for _ in range(30):
            before = P.HOST_TRANSFERS[0]
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            mon.observe(loss)
            opt.step()
            per_step.append(P.HOST_TRANSFERS[0] - before)
    assert not calls  # no host read outside the counted to_host()
    # step s's record completes in opt.step(): a write every 10 recorded steps, then close
    assert per_step == [1 if (s + 1) % 10 == 0 else 0 for s in range(30)]
    assert P.HOST_TRANSFERS[0] - start == 3
    run = open_run(tmp_path / "s.db", "sync")
    assert len(run.series("loss")[0]) == 30
    # the secant path ran (secant_every=10 by default: measured at steps 1, 11, 21)
    assert run.series("secant_curvature")[0].tolist() == [1, 11, 21]


@pytest.mark.parametrize("kw", [{}, {"every": 3}], ids=["default", "every-3"])
def test_the_default_monitor_reads_the_host_only_to_write(tmp_path, monkeypatch, kw):
    """The Monitor as the README builds it (no Guard, default MonitorConfig: loss every
    step, state every 10, secant every 10, a write every 100 recorded steps or 10 s), and
    with steps that record nothing: no host read outside the store's writes, at most one
    transfer on a step, none on a step that records nothing."""
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = _count_host_reads(monkeypatch, opt)
    every = kw.get("every", 1)
    per_step, n = [], 240
    t0 = time.monotonic()
    with Monitor(model, opt, store=tmp_path / "s.db", run="default", **kw) as mon:
        for _ in range(n):
            before = P.HOST_TRANSFERS[0]
            _steps(mon, model, opt, x, y, 1)
            per_step.append(P.HOST_TRANSFERS[0] - before)
    elapsed = time.monotonic() - t0
    assert not calls, calls[:5]
    assert max(per_step) <= 1
    # writes: every 100 recorded steps, or after 10 s; a step that records nothing never
    writes = n // every // 100 + int(elapsed // 10) + 1
    assert sum(per_step) <= writes
    run = open_run(tmp_path / "s.db", "default")
    recorded = set(run.series("loss")[0].tolist())
    # step s's record completes in the optimizer step of step s: a step that records
    # nothing transfers nothing
    assert all(c == 0 for s, c in enumerate(per_step) if s not in recorded)
    assert len(recorded) == n if every == 1 else len(recorded) < n * 0.6
    if every == 1:  # the secant curvature and the Adam state were recorded too
        assert len(run.series("secant_curvature")[0]) == n // 10
        assert len(run.series("eff_step_max")[0]) == n // 10


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: torch.cuda.set_sync_debug_mode needs one (the CPU "
                    "tests above count host transfers instead)")
def test_no_cuda_sync_on_steps_that_do_not_write(tmp_path):
    """torch's CUDA sync debug mode raises on any synchronising call inside the Monitor's
    per-step work (observe and the step hook), except on the steps that write the store."""
    model, x, y = tiny_problem()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # foreach; its step count on the CPU
    # step hooks run in registration order: sync checks on around the Monitor's hook only
    opt.register_step_post_hook(lambda *a: torch.cuda.set_sync_debug_mode("error"))
    with Monitor(model, opt, store=tmp_path / "s.db", run="cuda", state_every=5,
                 flush_every=1000, flush_seconds=1e9) as mon:
        opt.register_step_post_hook(lambda *a: torch.cuda.set_sync_debug_mode("default"))
        for _ in range(20):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                mon.observe(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.step()
    run = open_run(tmp_path / "s.db", "cuda")
    assert len(run.series("loss")[0]) == 20 and len(run.series("eff_step_max")[0]) == 4
