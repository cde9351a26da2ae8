"""Helpers shared by the framework callbacks: their MonitorConfig, where the store goes by
default, the ``guard=`` option, and how the guard's actions reach the framework's logger."""

from __future__ import annotations

import logging
import os
from typing import Any

from stablestep.telemetry._common import default_run_name

__all__ = [
    "LOG_PREFIX",
    "STORE_FILE",
    "GuardReport",
    "default_run_name",
    "guard_policy",
    "make_parent",
    "monitor_config",
    "resolve_store",
]

log = logging.getLogger("stablestep.integrations")

STORE_FILE = "stablestep.db"
"""File name of the run store inside a framework's log directory."""

LOG_PREFIX = "stablestep/"
"""Prefix of every value a callback hands to a framework's logger (TensorBoard, History...)."""


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


def monitor_config(config: Any, **settings: Any) -> Any:
    """The callback's :class:`~stablestep.telemetry.config.MonitorConfig`: ``config`` (a
    ``MonitorConfig``, a dict of run config extras, or ``None``) with the keyword ``settings``
    (its field names: ``every=``, ``state_every=``, ``overwrite=`` ...) applied on top. The
    fields are declared and validated once, in ``MonitorConfig``; an unknown keyword is a
    ``TypeError`` naming the fields."""
    import dataclasses

    from stablestep.telemetry.config import UNSET, MonitorConfig, resolve_config

    fields = [f.name for f in dataclasses.fields(MonitorConfig)]
    for key in settings:
        if key not in fields:
            raise TypeError(
                f"unknown setting {key!r}; MonitorConfig fields are: {', '.join(fields)}"
            )
    return resolve_config(config, **{k: v for k, v in settings.items() if v is not UNSET})


def resolve_store(store: str | os.PathLike | None, default_dir: str | os.PathLike) -> str:
    """The run store's path: ``store`` as given when it names a file; ``<store>/stablestep.db``
    when it is an existing directory; ``<default_dir>/stablestep.db`` when ``None`` (the
    framework's log directory). Nothing is created here (:func:`make_parent` does, before
    the first record is written)."""
    if store is None:
        path = os.path.join(os.fspath(default_dir), STORE_FILE)
    else:
        path = os.fspath(store)
        if os.path.isdir(path):
            path = os.path.join(path, STORE_FILE)
    return path


def make_parent(path: str) -> None:
    """Create the directory that will hold the store at ``path``."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


class GuardReport:
    """What the guard did since the last look, as a framework logger wants it.

    :meth:`attach` subscribes to the guard's actions (its ``register_action_hook`` where the
    Guard has one; otherwise its ``records`` are read after each step, and each new one is
    also logged here, at WARNING on ``stablestep.integrations``, since such a Guard does not
    log). :meth:`new` returns the actions since the previous call; :meth:`values` the
    running totals under ``stablestep/guard_<action>`` plus ``stablestep/guard_lr_scale``,
    the numbers the callbacks hand to ``pl_module.log`` and the Trainer's ``logs``.
    """

    ACTIONS = ("skip", "clip", "rollback", "adapt", "restore")

    def __init__(self) -> None:
        self._seen = 0
        self._fresh: list[Any] = []
        self._handle: Any = None

    def attach(self, guard: Any) -> None:
        """Follow ``guard`` from now on (records it already holds, e.g. restored from a
        checkpoint, are not new)."""
        self.detach()
        self._fresh.clear()
        self._seen = len(getattr(guard, "records", []))
        register = getattr(guard, "register_action_hook", None)
        if callable(register):
            self._handle = register(self._fresh.append)

    def detach(self) -> None:
        """Stop following the guard."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def new(self, guard: Any) -> list[Any]:
        """The guard's actions since the last call."""
        if self._handle is not None:
            fresh = list(self._fresh)
            self._fresh.clear()  # the hook holds this very list
            return fresh
        records = list(getattr(guard, "records", []))
        fresh, self._seen = records[self._seen :], len(records)
        for rec in fresh:
            log.warning(
                "guard: step %s %s (%s)",
                getattr(rec, "step", "?"),
                getattr(rec, "action", "?"),
                getattr(rec, "reason", ""),
            )
        return fresh

    def values(self, guard: Any) -> dict[str, float]:
        """Totals per action and the guard's lr scale, keyed ``stablestep/guard_*``."""
        counts = getattr(guard, "counts", {})
        out = {f"{LOG_PREFIX}guard_{a}": float(counts.get(a, 0)) for a in self.ACTIONS}
        out[f"{LOG_PREFIX}guard_lr_scale"] = float(getattr(guard, "lr_scale", 1.0))
        return out
