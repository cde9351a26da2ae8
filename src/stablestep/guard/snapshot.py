"""Snapshots of model + optimizer state on the CPU, restored in place.

A snapshot holds ``model.state_dict()`` (parameters *and* buffers, e.g. BatchNorm's running
statistics) and the optimizer's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``,
...), cloned to the CPU. It deliberately does **not** hold the optimizer's param groups
(lr, eps, amsgrad): those carry the user's schedule and the guard's adaptations, which a
rollback must keep. Restoring copies into the existing tensors, so the optimizer's
references to the parameters stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    return x


@dataclass
class Snapshot:
    """State at the start of guard step ``step`` (before that step's update)."""

    step: int
    model: dict[str, torch.Tensor]
    optim: list[dict[str, Any]]  # per parameter, in param_groups order
    guard: dict[str, Any]  # the guard's detector statistics at that point

    def nbytes(self) -> int:
        """Memory held by the snapshot's tensors."""
        ts = list(self.model.values()) + [
            v for s in self.optim for v in s.values() if isinstance(v, torch.Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in ts)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def capture(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            guard: dict[str, Any]) -> Snapshot:
    """Copy model and optimizer state to the CPU."""
    with torch.no_grad():
        model_sd = {k: _cpu(v) for k, v in model.state_dict().items()}
        optim = [{k: _cpu(v) for k, v in optimizer.state.get(p, {}).items()}
                 for p in _params(optimizer)]
    return Snapshot(step=step, model=model_sd, optim=optim, guard=guard)


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy ``snap`` back into ``model`` and the optimizer's state (tensors updated in place
    where shapes agree; parameters without state at the snapshot lose theirs)."""
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, v in snap.model.items():
            live[k].copy_(v)
        for p, saved in zip(_params(optimizer), snap.optim, strict=True):
            if not saved:
                optimizer.state.pop(p, None)
                continue
            state = optimizer.state[p]
            for k in [k for k in state if k not in saved]:
                del state[k]
            for k, v in saved.items():
                cur = state.get(k)
                if isinstance(v, torch.Tensor):
                    if isinstance(cur, torch.Tensor) and cur.shape == v.shape:
                        cur.copy_(v)
                    else:
                        dev = p.device if v.dim() > 0 else v.device
                        state[k] = v.to(dev, copy=True)
                else:
                    state[k] = v


def to_state(snap: Snapshot) -> dict[str, Any]:
    """Plain form for :meth:`Guard.state_dict` (tensors stay CPU tensors)."""
    return {"step": snap.step, "model": snap.model, "optim": snap.optim, "guard": snap.guard}


def from_state(d: dict[str, Any]) -> Snapshot:
    """Inverse of :func:`to_state`."""
    return Snapshot(step=int(d["step"]), model=dict(d["model"]),
                    optim=[dict(s) for s in d["optim"]], guard=d["guard"])
