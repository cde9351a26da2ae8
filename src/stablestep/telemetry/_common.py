"""Small helpers shared by the Monitor and the framework callbacks (argument checks, run
names, timestamps), so every entry point validates and names runs the same way."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timezone

log = logging.getLogger("stablestep.telemetry")


def check_every(name: str, value: int | None, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or ``None`` when optional)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (a positive int)")


def default_run_name() -> str:
    """``run-<UTC time>-<random>``, the default name of a run in the store."""
    return f"run-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def utc_now() -> str:
    """The current UTC time in ISO format (seconds), as ``Run.config["started_at"]``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_writer(
    path: str,
    run: str,
    *,
    config: dict,
    resume_from: int | None = None,
    overwrite: bool = False,
):
    """A :class:`~stablestep.telemetry.store.RunWriter` for ``run``, logging its final name.

    The store decides the name: an existing ``run`` (not resumed, not overwritten) is
    recorded under a new name with a visible suffix, available as ``writer.run``.
    """
    from stablestep.telemetry.store import RunWriter

    try:
        writer = RunWriter(  # resuming continues the run: never overwrite it
            path, run, config=config, resume_from=resume_from,
            overwrite=overwrite and resume_from is None,
        )
    except TypeError as exc:  # a store without the overwrite/suffix contract (older)
        if "overwrite" not in str(exc):
            raise
        writer = RunWriter(path, run, config=config, resume_from=resume_from)
    final = getattr(writer, "run", run)
    if final != run:
        log.info("run %r already exists in %s; recording as %r", run, path, final)
    else:
        log.debug("recording run %r in %s", final, path)
    return writer
