"""Helpers shared by the framework callbacks: the Monitor's argument checks and run names,
and the ``guard=`` option of the Lightning and Hugging Face callbacks."""

from __future__ import annotations

from typing import Any

from stablestep.telemetry._common import check_every, default_run_name, utc_now

__all__ = ["check_every", "default_run_name", "guard_policy", "utc_now"]


def guard_policy(guard: Any) -> Any:
    """Validate a callback's ``guard`` option: ``None`` (off) stays ``None``; ``True`` gives the
    default :class:`stablestep.guard.GuardPolicy`; a ``GuardPolicy`` is returned as is."""
    if guard is None:
        return None
    from stablestep.guard import GuardPolicy

    if guard is True:
        return GuardPolicy()
    if not isinstance(guard, GuardPolicy):
        raise TypeError(f"guard must be None, True or a GuardPolicy, got {guard!r}")
    return guard
