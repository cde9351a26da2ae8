"""``stablestep export PATH --csv``: a stored run as CSV."""

from __future__ import annotations

import argparse
import os
import sys

from stablestep.errors import UsageError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command."""
    p = subparsers.add_parser(
        "export",
        help="export a stored run (metrics per step) as CSV",
        description="Export the metrics of a run in a stablestep run store as CSV.",
    )
    p.add_argument("path", help="run store (SQLite file written by stablestep.Monitor)")
    p.add_argument("--csv", action="store_true", help="write CSV (the only format so far)")
    p.add_argument("--run", default=None, help="run name (default: the latest run)")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    p.add_argument("--list", action="store_true", help="list the runs in PATH instead")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from stablestep.telemetry.sinks import export_csv
    from stablestep.telemetry.store import list_runs, open_run

    if not (args.csv or args.list):
        raise UsageError("export needs a format: --csv (or --list to list the runs)")
    try:
        if args.list:
            for name in list_runs(args.path):
                print(name)
            return 0
        run = open_run(args.path, args.run)
    except FileNotFoundError:
        raise UsageError(f"no such file: {args.path}") from None
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.output is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.csv")
            export_csv(run, out)
            with open(out) as fh:
                sys.stdout.write(fh.read())
        return 0
    try:
        n = export_csv(run, args.output)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote {n} steps of run {run.name!r} to {args.output}", file=sys.stderr)
    return 0
