"""The ``stablestep`` command line.

Each subpackage that has commands exposes a ``cli`` module with
``add_parsers(subparsers)``; every sub-parser sets ``func(args) -> int``.

No traceback reaches a CLI user. :func:`main` turns every error a user can cause (a bad
path, a malformed log, a file in the way: :class:`UsageError`, ``ValueError``,
``OSError``, ``KeyError``, ...) into one line on stderr with exit status 2, and any other
exception into one line naming it plus a hint to set ``STABLESTEP_DEBUG=1``, which shows
the traceback. Text that came from the user's files (run names, column names) is shown
through :func:`stablestep.text.printable`, so escape sequences do not reach the
terminal raw.

The library logs through ``logging.getLogger("stablestep")``; :func:`main` gives that
logger one stderr handler (``stablestep: message``) at INFO, DEBUG with ``-v``, WARNING
with ``-q``. Its lines are written when the command succeeds; a failing command prints
only its one error line (``-v`` streams every line as it comes).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from stablestep.console import (  # noqa: F401  (re-exported for the sub-commands' users)
    DEBUG_ENV,
    LOGGER,
    VERBOSITY,
    _Deferred,
    _one_line,
    console,
    progress,
    setup_logging,
)
from stablestep.errors import UsageError  # re-exported: stablestep.cli.UsageError

__all__ = ["UsageError", "build_parser", "main"]

# Subpackages contributing commands, in the order they appear in --help.
_COMMAND_MODULES = (
    "stablestep.lab.cli",
    "stablestep.diagnosis.cli",
    "stablestep.report.cli",
    "stablestep.telemetry.cli",
)
class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        from stablestep.text import printable

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
    # Run as ``python -m stablestep.cli``: the error classes main() catches come from
    # stablestep.errors and stablestep.console, shared with the sub-commands.
    sys.exit(main())
