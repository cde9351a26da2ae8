"""Helpers shared by the framework callbacks: argument checks, run names, where the store
goes by default, the process's rank, the ``guard=`` option, and how the guard's actions are
reported to the framework's own logger."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from stablestep.telemetry._common import check_every, default_run_name, utc_now

__all__ = [
    "STORE_FILE",
    "check_every",
    "default_run_name",
    "guard_policy",
    "monitor_config",
    "open_writer",
    "rank_and_world",
    "resolve_store",
    "utc_now",
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
    framework's log directory). Nothing is created here (:func:`open_writer` creates the
    directory when the first record is written)."""
    if store is None:
        path = os.path.join(os.fspath(default_dir), STORE_FILE)
    else:
        path = os.fspath(store)
        if os.path.isdir(path):
            path = os.path.join(path, STORE_FILE)
    return path


def open_writer(
    path: str,
    run: str,
    *,
    config: dict,
    resume_from: int | None = None,
    overwrite: bool = False,
) -> Any:
    """A :class:`~stablestep.telemetry.store.RunWriter` on ``path`` (its directory created),
    through the Monitor's own opener: a run name already in the store gives a new run under a
    suffixed name (``writer.run``) unless ``overwrite``; ``resume_from`` reopens the run."""
    from stablestep.telemetry._common import open_writer as _open

    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return _open(path, run, config=config, resume_from=resume_from, overwrite=overwrite)


def make_parent(path: str) -> None:
    """Create the directory that will hold the store at ``path``."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process under ``torch.distributed``; ``(0, 1)`` without it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_name(name: str) -> str:
    """Rank 0's ``name`` on every rank (default run names are random per process); the name
    itself without ``torch.distributed``. A collective: call it on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return name
    box = [name]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def accepts(fn: Any, name: str) -> bool:
    """Whether the callable ``fn`` takes a keyword argument ``name`` (features other parts of
    stablestep add while the callbacks must keep working without them)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class GuardReport:
    """What the guard did since the last look, as a framework logger wants it.

    :meth:`new` returns the guard's records added since the previous call (each also goes to
    the ``stablestep.integrations`` logger at WARNING: one line with the step, the action and
    the reason); :meth:`values` the running totals under ``stablestep/guard_<action>`` plus
    ``stablestep/guard_lr_scale``, the numbers the callbacks hand to ``self.log``, ``logs``.
    """

    ACTIONS = ("skip", "clip", "rollback", "adapt")

    def __init__(self) -> None:
        self._seen = 0

    def new(self, guard: Any) -> list[Any]:
        """Records added since the last call (logged once each)."""
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

    def skip_seen(self, guard: Any) -> None:
        """Mark every existing record as seen (a guard restored from a checkpoint)."""
        self._seen = len(getattr(guard, "records", []))

    def values(self, guard: Any) -> dict[str, float]:
        """Totals per action and the guard's lr scale, keyed ``stablestep/guard_*``."""
        counts = getattr(guard, "counts", {})
        out = {f"{LOG_PREFIX}guard_{a}": float(counts.get(a, 0)) for a in self.ACTIONS}
        out[f"{LOG_PREFIX}guard_lr_scale"] = float(getattr(guard, "lr_scale", 1.0))
        return out
