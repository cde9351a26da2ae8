"""Snapshots of model + optimizer state on the CPU, restored in place.

A snapshot holds ``model.state_dict()`` (parameters *and* buffers, e.g. BatchNorm's running
statistics) and the optimizer's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``,
...), cloned to the CPU. It deliberately does **not** hold the optimizer's param groups
(lr, eps, amsgrad): those carry the user's schedule and the guard's adaptations, which a
rollback must keep. Restoring copies into the existing tensors, so the optimizer's
references to the parameters stay valid.

Sharded state (FSDP2 ``fully_shard``: DTensor parameters, buffers and optimizer state) is
captured as this rank's local shard only, ``{"local_shard": tensor}``, and copied back
into the live DTensor's local shard, so each rank holds and restores its own part and a
rollback is bit for bit. A snapshot is plain tensors and dicts (``torch.save`` /
``torch.load(weights_only=True)`` work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stablestep._dtensor import is_dtensor as _is_dtensor

LOCAL = "local_shard"


def _cpu(x: Any) -> Any:
    if _is_dtensor(x):
        return {LOCAL: x.to_local().detach().to("cpu", copy=True)}
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    return x


def _tensor_of(v: Any) -> torch.Tensor | None:
    """The saved tensor of a snapshot entry (a tensor or a local shard), else ``None``."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, dict) and isinstance(v.get(LOCAL), torch.Tensor):
        return v[LOCAL]
    return None


def _copy_into(cur: Any, v: Any) -> bool:
    """Copy saved ``v`` into the live tensor ``cur`` in place; False if shapes differ."""
    src = _tensor_of(v)
    dst = cur.to_local() if _is_dtensor(cur) else cur
    if not isinstance(dst, torch.Tensor) or src is None or dst.shape != src.shape:
        return False
    dst.copy_(src)
    return True


def _rebuild(v: Any, p: torch.Tensor) -> Any:
    """A new state entry from saved ``v``, placed like parameter ``p`` (a DTensor with
    ``p``'s mesh and placements for a saved local shard)."""
    src = _tensor_of(v)
    if src is None:
        return v
    if isinstance(v, dict):  # a local shard: state tensors of a DTensor are laid out like it
        from torch.distributed.tensor import DTensor

        loc = src.to(p.to_local().device, copy=True)
        return DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    dev = p.device if src.dim() > 0 else src.device
    return src.to(dev, copy=True)


@dataclass
class Snapshot:
    """State at the start of guard step ``step`` (before that step's update)."""

    step: int
    model: dict[str, torch.Tensor]
    optim: list[dict[str, Any]]  # per parameter, in param_groups order
    guard: dict[str, Any]  # the guard's detector statistics at that point

    def nbytes(self) -> int:
        """Memory held by the snapshot's tensors."""
        ts = [_tensor_of(v) for v in self.model.values()] + [
            _tensor_of(v) for s in self.optim for v in s.values()
        ]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _cpu_into(x: Any, buf: Any) -> Any:
    """:func:`_cpu` of ``x``, copied into ``buf`` (an older snapshot's entry) when it is a
    plain CPU tensor of the same shape and dtype (no new allocation), else fresh."""
    if (isinstance(x, torch.Tensor) and not _is_dtensor(x) and isinstance(buf, torch.Tensor)
            and buf.shape == x.shape and buf.dtype == x.dtype and buf is not x):
        return buf.copy_(x.detach())
    return _cpu(x)


def capture(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            guard: dict[str, Any], *, into: Snapshot | None = None) -> Snapshot:
    """Copy model and optimizer state to the CPU (into the buffers of ``into``, a
    snapshot no longer needed, where they fit)."""
    params = _params(optimizer)
    with torch.no_grad():
        if into is None:
            model_sd = {k: _cpu(v) for k, v in model.state_dict().items()}
            optim = [{k: _cpu(v) for k, v in optimizer.state.get(p, {}).items()}
                     for p in params]
        else:
            model_sd = {k: _cpu_into(v, into.model.get(k))
                        for k, v in model.state_dict().items()}
            old = into.optim if len(into.optim) == len(params) else [{}] * len(params)
            optim = [{k: _cpu_into(v, o.get(k)) for k, v in optimizer.state.get(p, {}).items()}
                     for p, o in zip(params, old, strict=True)]
    return Snapshot(step=step, model=model_sd, optim=optim, guard=guard)


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy ``snap`` back into ``model`` and the optimizer's state (tensors updated in place
    where shapes agree; parameters without state at the snapshot lose theirs)."""
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, v in snap.model.items():
            if not _copy_into(live[k], v):
                raise RuntimeError(f"snapshot entry {k!r} does not fit the model any more")
        for p, saved in zip(_params(optimizer), snap.optim, strict=True):
            if not saved:
                optimizer.state.pop(p, None)
                continue
            state = optimizer.state[p]
            for k in [k for k in state if k not in saved]:
                del state[k]
            for k, v in saved.items():
                if _tensor_of(v) is None:
                    state[k] = v
                elif not (k in state and _copy_into(state[k], v)):
                    state[k] = _rebuild(v, p)


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict) and isinstance(v.get(LOCAL), torch.Tensor):
        return {LOCAL: v[LOCAL].clone()}
    return v


def to_state(snap: Snapshot) -> dict[str, Any]:
    """Plain form for :meth:`Guard.state_dict`: copies of the CPU tensors (the guard reuses
    a snapshot's buffers for a later one, a checkpoint must not change with them)."""
    return {"step": snap.step, "model": {k: _copy(v) for k, v in snap.model.items()},
            "optim": [{k: _copy(v) for k, v in s.items()} for s in snap.optim],
            "guard": snap.guard}


def from_state(d: dict[str, Any]) -> Snapshot:
    """Inverse of :func:`to_state`."""
    return Snapshot(step=int(d["step"]), model=dict(d["model"]),
                    optim=[dict(s) for s in d["optim"]], guard=d["guard"])
