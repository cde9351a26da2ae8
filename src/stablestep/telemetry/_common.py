"""Small helpers shared by the Monitor and the framework callbacks (argument checks, run
names, timestamps), so every entry point validates and names runs the same way."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone


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
