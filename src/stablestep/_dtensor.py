"""DTensor (FSDP2 ``fully_shard``) helpers shared by telemetry, curvature and the guard: one
definition of "this rank's part of a tensor"."""

from __future__ import annotations

from typing import Any

import torch


def _dtensor_cls() -> Any:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    return DTensor


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``."""
    dt = _dtensor_cls()
    return dt is not None and isinstance(x, dt)


def is_sharded(x: Any) -> bool:
    """Whether ``x`` is a DTensor split across ranks (FSDP2's ``Shard`` placement)."""
    return is_dtensor(x) and any(p.is_shard() for p in x.placements)


def local(x: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of ``x``: the local shard of a DTensor (a view sharing its
    storage), ``x`` itself otherwise."""
    return x.to_local() if is_dtensor(x) else x
