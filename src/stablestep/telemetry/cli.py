"""``stablestep export PATH [--run NAME] [-o FILE]``: a stored run as CSV (the default and
only format; ``--csv`` is accepted and changes nothing)."""

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
        description="Export the metrics of a run in a stablestep run store as CSV "
        "(one row per step, one column per metric).",
    )
    p.add_argument("path", help="run store (SQLite file written by stablestep.Monitor, or "
                   "a directory holding run.sqlite)")
    p.add_argument("--csv", action="store_true", help="write CSV (the default)")
    p.add_argument("--run", default=None, help="run name (default: the latest run)")
    p.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    p.add_argument("--list", action="store_true", help="list the runs in PATH instead")
    p.set_defaults(func=_export)


def _store(path: str) -> str:
    if os.path.isdir(path):
        inner = os.path.join(path, "run.sqlite")
        if os.path.isfile(inner):
            return inner
        raise UsageError(f"{path} is a directory without a run.sqlite, not a run store")
    if not os.path.exists(path):
        raise UsageError(f"no run store at {path} (no such file)")
    return path


def _export(args: argparse.Namespace) -> int:
    from stablestep.telemetry.sinks import export_csv
    from stablestep.telemetry.store import RunNotFoundError, StoreError, list_runs, open_run

    path = _store(args.path)
    try:
        if args.list:
            for name in list_runs(path):
                print(name)
            return 0
        run = open_run(path, args.run)
        if args.run is None and not getattr(args, "quiet", False):
            names = list_runs(path)
            if len(names) > 1:  # say which one: a second run of the same script is "-2"
                print(f"stablestep: exporting run {run.name!r}, the latest of {len(names)} "
                      "(--run NAME for another, --list to list them)", file=sys.stderr)
        if args.output is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "run.csv")
                export_csv(run, out)
                with open(out) as fh:
                    sys.stdout.write(fh.read())
            return 0
        if os.path.isdir(args.output):
            raise UsageError(f"cannot write {args.output}: it is a directory")
        n = export_csv(run, args.output)
    except FileNotFoundError as exc:
        raise UsageError(str(exc) if "run store" in str(exc) else
                         f"cannot write {args.output}: no such directory") from None
    except RunNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except (StoreError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {n} steps of run {run.name!r} to {args.output}", file=sys.stderr)
    return 0
