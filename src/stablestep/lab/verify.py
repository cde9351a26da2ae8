r"""Verified remedies: replay from before the onset with each remedy and see which remove it.

Where the run can be replayed (a lab :class:`~stablestep.lab.config.TrainConfig`: a
deterministic problem, optimizer and schedule), :func:`verify_lab` trains to ``lead`` steps
before the finding's onset, keeps that state, and continues ``horizon`` steps once as is
(the control, which must show the incident again for the check to mean anything) and once
per remedy applied to the optimizer (``set-eps``, ``set-lr``, ``amsgrad``; others are
reported as not replayable). A remedy is *verified* when the continuation has no finding of
:func:`stablestep.diagnosis.diagnose` after the snapshot, while the control has one::

    verified: set-eps 0.0015, no incident in the next 300 steps
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
        if action == "control":  # the replay must show the incident for the check to mean
            summary = (f"replayed unchanged: no incident in the next {horizon} steps"
                       if at is None else f"replayed unchanged: the incident again at step {at}")
        else:
            what = f"{action} {value:.3g}" if isinstance(value, float) else f"{action} {value}"
            summary = (f"verified: {what}, no incident in the next {horizon} steps"
                       if at is None else f"not verified: {what}, incident again at step {at}")
        out.append(Verification(action, value, at, horizon, summary))
        log.info(summary)
    return out
