"""Terminal plumbing shared by ``stablestep`` and its sub-commands: the ``-v/-q`` options,
the ``stablestep`` logger's CLI handler, a width-aware rich console and progress bars.

A leaf module (no sub-command imports it back), so ``stablestep.cli`` and each
subpackage's ``cli`` share it without an import cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

DEBUG_ENV = "STABLESTEP_DEBUG"
LOGGER = "stablestep"


def _verbosity_parent() -> argparse.ArgumentParser:
    """``-v/--verbose`` and ``-q/--quiet``, accepted before or after the command."""
    p = argparse.ArgumentParser(add_help=False)  # parents are copied, their class is not
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more detail: full evidence, debug messages")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only warnings and errors on stderr")
    return p


VERBOSITY = _verbosity_parent()


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        from stablestep.text import printable

        msg = printable(record.getMessage(), newlines=False)
        if record.levelno >= logging.WARNING:
            return f"stablestep: {record.levelname.lower()}: {msg}"
        return f"stablestep: {msg}"


class _Deferred(logging.Handler):
    """Holds the formatted lines of a command until it ends: :meth:`write_out` writes them
    to stderr when it succeeded; when it failed they are dropped, so its one error line is
    all stderr gets (``-v`` streams everything instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def write_out(self) -> None:
        """Write the held lines to the current ``sys.stderr``."""
        for line in self.lines:
            print(line, file=sys.stderr)
        self.lines.clear()


def setup_logging(verbose: int = 0, quiet: bool = False, *,
                  defer: bool = False) -> logging.Handler:
    """Give the ``stablestep`` logger one handler writing ``stablestep: message`` lines to
    the current ``sys.stderr`` (INFO; DEBUG when ``verbose``; WARNING when ``quiet``);
    with ``defer`` the lines wait for :meth:`_Deferred.write_out`. Returns the handler; a
    second call replaces the first one's."""
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        if getattr(h, "_stablestep_cli", False):
            log.removeHandler(h)
    handler: logging.Handler = _Deferred() if defer else logging.StreamHandler(sys.stderr)
    handler._stablestep_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return handler


def console(*, stderr: bool = False):
    """A rich console for command output. On a terminal it takes the terminal's width;
    piped or redirected it takes ``COLUMNS`` when set, else 80 columns, and writes no
    colour codes."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, stderr=stderr)
    try:
        width = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        width = 80
    return Console(file=stream, width=max(20, width), color_system=None, soft_wrap=False,
                   highlight=False)


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr while the block runs; yields ``update(done, total)``,
    the callback that :func:`stablestep.lab.sweep.sweep`, the lab runner and long
    curvature work take as ``progress=``. Hidden with ``-q`` (and when stderr is not a
    terminal it draws nothing: logs and pipes get the final messages only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    quiet = logging.getLogger(LOGGER).getEffectiveLevel() > logging.INFO
    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console(stderr=True),
                   disable=quiet or not sys.stderr.isatty(), transient=False)
    with bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total_now: int | None = None) -> None:
            bar.update(task, completed=done, total=total_now or total)

        yield update


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, shown safely (``KeyError`` messages
    without their quotes)."""
    from stablestep.text import printable

    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return printable(first, limit=500)
