"""The ``stablestep`` command line.

Each subpackage that has commands exposes a ``cli`` module with
``add_parsers(subparsers)``; every sub-parser sets ``func(args) -> int``.

No traceback reaches a CLI user. :func:`main` turns every error a user can cause (a bad
path, a malformed log, a file in the way: :class:`UsageError`, ``ValueError``,
``OSError``, ``KeyError``, ...) into one line on stderr with exit status 2, and any other
exception into one line naming it plus a hint to set ``STABLESTEP_DEBUG=1``, which shows
the traceback. Text that came from the user's files (run names, column names) is shown
through :func:`stablestep.report.text.printable`, so escape sequences do not reach the
terminal raw.

The library logs through ``logging.getLogger("stablestep")``; :func:`main` gives that
logger one stderr handler (``stablestep: message``) at INFO, DEBUG with ``-v``, WARNING
with ``-q``. Its lines are written when the command succeeds; a failing command prints
only its one error line (``-v`` streams every line as it comes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

from stablestep.errors import UsageError  # re-exported: stablestep.cli.UsageError

__all__ = ["UsageError", "build_parser", "main"]

# Subpackages contributing commands, in the order they appear in --help.
_COMMAND_MODULES = (
    "stablestep.lab.cli",
    "stablestep.diagnosis.cli",
    "stablestep.report.cli",
    "stablestep.telemetry.cli",
)
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        from stablestep.report.text import printable

        self.exit(2, f"{self.prog}: error: {printable(message, limit=500)} "
                     f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = Parser(
        prog="stablestep", parents=[VERBOSITY],
        description="See why Adam spikes, explodes or turns into NaN, and keep the run alive.",
        epilog=f"Set {DEBUG_ENV}=1 to see the traceback of an unexpected error.",
    )
    from stablestep import __version__

    parser.add_argument("--version", action="version", version=f"stablestep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    real_add = sub.add_parser

    def add_parser(*args, **kwargs):  # every command takes -v/-q after its name too
        kwargs["parents"] = [*kwargs.get("parents", ()), VERBOSITY]
        return real_add(*args, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subpackage without commands yet
            if exc.name == name:
                continue
            raise
        module.add_parsers(sub)
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        from stablestep.report.text import printable

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
    from stablestep.report.text import printable

    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return printable(first, limit=500)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while a command runs: the message as one log line
    (``stablestep: warning: ...``), without the file and source line Python adds."""
    logging.getLogger(LOGGER).warning("%s", message)


# What a user can cause: bad paths, unreadable or malformed files, bad values.
EXPECTED = (UsageError, ValueError, OSError, KeyError, UnicodeError, OverflowError,
            RecursionError, ImportError, EOFError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stablestep`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0) or 0
    handler = setup_logging(verbose, getattr(args, "quiet", False), defer=not verbose)
    try:
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 2
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line  # one "stablestep: warning:" line each
            rc = int(func(args) or 0)
        if isinstance(handler, _Deferred):  # what was read, warnings: after success only
            handler.write_out()
        return rc
    except EXPECTED as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"stablestep: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stablestep: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"stablestep: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 2
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    from stablestep.cli import main as _main  # the module's own classes, not __main__'s

    sys.exit(_main())
