"""The ``stablestep`` command line.

Each subpackage that has commands exposes a ``cli`` module with
``add_parsers(subparsers)``; every sub-parser sets ``func(args) -> int``.
Errors a user can cause (a bad path, a malformed log) are raised as
:class:`UsageError` and printed as one line on stderr with exit status 2;
no traceback reaches a CLI user.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stablestep.errors import UsageError  # re-exported: stablestep.cli.UsageError

__all__ = ["UsageError", "build_parser", "main"]

# Subpackages contributing commands, in the order they appear in --help.
_COMMAND_MODULES = (
    "stablestep.lab.cli",
    "stablestep.diagnosis.cli",
    "stablestep.report.cli",
    "stablestep.telemetry.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="stablestep",
        description="See why Adam spikes, explodes or turns into NaN, and keep the run alive.",
    )
    from stablestep import __version__

    parser.add_argument("--version", action="version", version=f"stablestep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subpackage without commands yet
            if exc.name == name:
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stablestep`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except UsageError as exc:
        print(f"stablestep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stablestep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
