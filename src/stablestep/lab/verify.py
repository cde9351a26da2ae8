r"""Verified remedies: replay from before the onset with each remedy and see which remove it.

Where the run can be replayed (a lab :class:`~stablestep.lab.config.TrainConfig`: a
deterministic problem, optimizer and schedule), :func:`verify_lab` trains to ``lead`` steps
before the finding's onset, keeps that state, and continues ``horizon`` steps once as is
(the control, which must show the incident again for the check to mean anything) and once
per remedy applied to the optimizer (``set-eps``, ``set-lr``, ``amsgrad``; others are
reported as not replayable). A remedy is *verified* when the continuation has no finding of
:func:`stablestep.diagnosis.diagnose` after the snapshot, while the control has one::

    verified: set-eps 0.0015, no incident in the next 300 steps

Outside the lab, :func:`verify_snapshot` does the same from a snapshot of
:class:`stablestep.guard.Guard` (an entry of ``guard.state_dict()["snapshots"]``, taken
before the incident) and the user's own ``train_step(t)`` closure, which must draw the batch
of step ``t`` deterministically for the replays to be comparable.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("stablestep.lab.verify")

REPLAYABLE = ("set-eps", "set-lr", "amsgrad")


@dataclass(frozen=True)
class Verification:
    """Outcome of one replay: ``action``/``value`` of the remedy (``"control"``: none),
    ``incident_at``: the first finding's step after the snapshot (None: none), and a
    one-line ``summary``."""

    action: str
    value: Any
    incident_at: int | None
    horizon: int
    summary: str

    @property
    def removed(self) -> bool:
        """Whether no incident followed within the horizon."""
        return self.incident_at is None


def _apply(opt: Any, action: str, value: Any) -> None:
    for g in opt.param_groups:
        if action == "set-eps":
            g["eps"] = float(value)
        elif action == "set-lr":
            g["lr"] = float(value)
            g["initial_lr"] = float(value)
        elif action == "amsgrad":
            g["amsgrad"] = True
            for p in g["params"]:  # start the running max at the current v (no reset)
                st = opt.state.get(p)
                if st and "exp_avg_sq" in st and "max_exp_avg_sq" not in st:
                    st["max_exp_avg_sq"] = st["exp_avg_sq"].clone()


def _summary(action: str, value: Any, at: int | None, horizon: int) -> str:
    if action == "control":  # the replay must show the incident for the check to mean
        return (f"replayed unchanged: no incident in the next {horizon} steps"
                if at is None else f"replayed unchanged: the incident again at step {at}")
    what = f"{action} {value:.3g}" if isinstance(value, float) else f"{action} {value}"
    return (f"verified: {what}, no incident in the next {horizon} steps"
            if at is None else f"not verified: {what}, incident again at step {at}")


def _first_incident(losses: np.ndarray, start: int) -> int | None:
    from stablestep.diagnosis.core import diagnose_trace
    from stablestep.diagnosis.trace import Trace

    n = int(np.argmax(~np.isfinite(losses))) + 1 if not np.isfinite(losses).all() else losses.size
    tr = Trace(np.arange(n), losses[:n])
    after = [f.step for f in diagnose_trace(tr) if f.step >= start]
    if after:
        return int(min(after))
    return start + int(np.argmax(~np.isfinite(losses[start:]))) if not np.isfinite(
        losses[start:]).all() else None


def verify_lab(config: Any, onset: int, remedies: list[Any], *, lead: int = 20,
               horizon: int = 300) -> list[Verification]:
    """Replay lab ``config`` from ``onset - lead`` for ``horizon`` steps, once unchanged (the
    control, first in the result) and once per replayable remedy (``Remedy`` objects or
    ``{"action", "value"}`` dicts). Deterministic: the batches are drawn as in
    :func:`stablestep.lab.train.train`."""
    import torch

    from stablestep.lab import problems
    from stablestep.lab.train import lr_factor, make_optimizer

    start = max(1, int(onset) - lead)
    problem = problems.build(config)
    opt = make_optimizer(config, problem.model.parameters())
    factor = lr_factor(config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(config.seed + 2)
    losses = np.full(start + horizon, np.nan)

    def one_step(t: int) -> float:
        idx = None
        if config.batch is not None:
            idx = torch.randint(config.n, (config.batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(idx)
        loss.backward()
        value = float(loss.detach())
        if math.isfinite(value):
            opt.step()
            sched.step()
        return value

    for t in range(start):
        losses[t] = one_step(t)
    snap = (copy.deepcopy(problem.model.state_dict()), copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()), gen.get_state())
    out: list[Verification] = []
    todo = [("control", None)] + [
        (r["action"] if isinstance(r, dict) else r.action,
         r["value"] if isinstance(r, dict) else r.value) for r in remedies]
    for action, value in todo:
        if action != "control" and action not in REPLAYABLE:
            out.append(Verification(action, value, None, 0, f"not replayable: {action}"))
            continue
        problem.model.load_state_dict(snap[0])
        opt.load_state_dict(snap[1])
        sched.load_state_dict(snap[2])
        gen.set_state(snap[3])
        if action != "control":
            _apply(opt, action, value)
            if action == "set-lr":  # the schedule multiplies the new base lr from here on
                sched.base_lrs = [float(value)] * len(opt.param_groups)
        seq = losses.copy()
        for t in range(start, start + horizon):
            seq[t] = one_step(t)
            if not math.isfinite(seq[t]):
                break
        at = _first_incident(seq, start)
        summary = _summary(action, value, at, horizon)
        out.append(Verification(action, value, at, horizon, summary))
        log.info(summary)
    return out


def _remedy(r: Any) -> tuple[str, Any]:
    return (r["action"], r["value"]) if isinstance(r, dict) else (r.action, r.value)


def verify_snapshot(model: Any, optimizer: Any, snapshot: Any, train_step: Any,
                    remedies: list[Any], *, horizon: int = 300,
                    history: Any = None) -> list[Verification]:
    """Replay from a Guard snapshot, once unchanged (the control, first in the result) and
    once per replayable remedy (``set-eps``, ``set-lr``, ``amsgrad`` on the optimizer's
    param groups), ``horizon`` steps each, and say which remove the incident.

    ``snapshot``: an entry of ``guard.state_dict()["snapshots"]`` (or the guard's
    ``Snapshot``), restored with :func:`stablestep.guard.snapshot.restore` (model and
    optimizer state; the param groups are the caller's). ``train_step(t) -> float`` runs
    one training step ``t`` (batch ``t``, forward, backward, ``optimizer.step()``) and
    returns its loss; it must draw the same batch for the same ``t``. ``history``: the
    losses of the steps before the snapshot (e.g. the Monitor's stored ``loss``), so the
    detectors start warm. Afterwards the model, the optimizer state and its param groups
    are as they were before the call."""
    from stablestep.guard import snapshot as S

    snap = snapshot if isinstance(snapshot, S.Snapshot) else S.from_state(snapshot)
    start = int(snap.step)
    hist = np.asarray([] if history is None else history, dtype=float)[-start:]
    start_at = hist.size
    now = S.capture(-1, model, optimizer, {})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    out: list[Verification] = []
    try:
        for action, value in [("control", None)] + [_remedy(r) for r in remedies]:
            if action != "control" and action not in REPLAYABLE:
                out.append(Verification(action, value, None, 0, f"not replayable: {action}"))
                continue
            S.restore(snap, model, optimizer)
            for g, saved in zip(optimizer.param_groups, groups, strict=True):
                g.update(saved)
            if action != "control":
                _apply(optimizer, action, value)
            seq = np.r_[hist, np.full(horizon, np.nan)]
            for k in range(horizon):
                seq[start_at + k] = float(train_step(start + k))
                if not math.isfinite(seq[start_at + k]):
                    break
            at = _first_incident(seq[: start_at + k + 1], start_at)
            at = None if at is None else at - start_at + start
            out.append(Verification(action, value, at, horizon,
                                    _summary(action, value, at, horizon)))
            log.info(out[-1].summary)
    finally:
        S.restore(now, model, optimizer)
        for g, saved in zip(optimizer.param_groups, groups, strict=True):
            g.update(saved)
    return out
