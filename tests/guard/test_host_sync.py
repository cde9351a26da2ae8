"""The guarded step is cheap: one host read per ``check`` (loss, gradient norm and, every
``state_check_every`` steps, the parameter and optimizer-state norms, together), and with a
Monitor attached no second gradient norm: the Monitor's per-tensor norms are reused.

Counted on the CPU: calls of ``.item()``/``.tolist()``/``float()``/``int()``/``bool()``/
``.numpy()``/``.cpu()`` on tensors made from the guard's code, and ``torch._foreach_norm``
calls over the gradients made from it."""

from __future__ import annotations

import sys

import torch

from stablestep.guard import Guard, GuardPolicy
from stablestep.telemetry import Monitor
from tests.guard.conftest import mlp, regression_data

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


def _count_reads(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            code = sys._getframe(1).f_code
            if "stablestep/guard" in code.co_filename:
                calls.append(f"{name} in {code.co_name}")
            return orig(self, *a, **k)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls


def _count_grad_norms(monkeypatch, model) -> list[str]:
    grads_seen: list[str] = []
    orig = torch._foreach_norm

    def counting(tensors, *a, **k):
        code = sys._getframe(1).f_code
        ids = {id(p.grad) for p in model.parameters() if p.grad is not None}
        if "stablestep/guard" in code.co_filename and any(id(t) in ids for t in tensors):
            grads_seen.append(code.co_name)
        return orig(tensors, *a, **k)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    return grads_seen


def _loop(model, opt, guard, x, y, steps, monitor=None, calls=None):
    per_check = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if monitor is not None:
            monitor.observe(loss)
        before = len(calls)
        ok = guard.check(loss)
        per_check.append(len(calls) - before)
        if ok:
            opt.step()
    return per_check


def test_one_host_read_per_check_without_a_monitor(monkeypatch):
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, policy=GuardPolicy(state_check_every=10, snapshot_every=15))
    calls = _count_reads(monkeypatch)
    per_check = _loop(model, opt, guard, x, y, 40, calls=calls)
    assert per_check == [1] * 40, calls  # state-check and snapshot steps included
    assert guard.summary()["rollbacks"] == 0 and guard.snapshots


def test_with_a_monitor_its_gradient_norms_are_reused(monkeypatch, tmp_path):
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Monitor(model, opt, store=tmp_path / "s.db", run="r", state_every=10) as mon:
        guard = Guard(model, opt, monitor=mon, policy=GuardPolicy(state_check_every=10))
        calls = _count_reads(monkeypatch)
        norms = _count_grad_norms(monkeypatch, model)
        per_check = _loop(model, opt, guard, x, y, 30, monitor=mon, calls=calls)
        guard.close()
    assert per_check == [1] * 30, calls
    assert norms == [], norms  # the gradient norm is the Monitor's, never computed again
    # ... and it is the same number: the stack saw the Monitor's stored gradient norms
    stored = mon.read().series("grad_norm")[1].tolist()
    assert len(stored) == 30 and guard.stack._out["n"] > 0


def test_the_reused_norms_give_the_same_decisions(tmp_path):
    """NaN batches and an outlier batch in minibatch training: the guard with a Monitor
    (reused norms) takes the same decisions, at the same steps, as the guard alone."""
    from tests.guard.conftest import batches
    from tests.guard.test_skip import _train

    def run(with_monitor: bool):
        x, y = regression_data()
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        mon = Monitor(model, opt, store=tmp_path / f"{with_monitor}.db", run="r") \
            if with_monitor else None
        guard = Guard(model, opt, monitor=mon)
        if mon is not None:  # the Monitor observes right before the guard checks
            check = guard.check
            guard.check = lambda loss: (mon.observe(loss), check(loss))[1]
        _train(model, opt, guard, x, y, batches(len(x), 200), nan_at={50, 120},
               outlier_at={150})
        if mon is not None:
            mon.close()
        return [(r.step, r.action, r.reason) for r in guard.records]

    alone = run(False)
    assert (50, "skip", "non-finite") in alone and (150, "skip", "gradient-outlier") in alone
    assert run(True) == alone
