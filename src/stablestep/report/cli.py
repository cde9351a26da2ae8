"""``stablestep report PATH -o FILE.html``: one self-contained HTML report of a run store."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parsers(subparsers: Any) -> None:
    """Register ``report``."""
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run store",
        description="Plot every run of a stablestep run store on shared axes (loss with "
        "explained incidents, effective step, eps share, preconditioned sharpness, "
        "lr * lam_max, gradient norm, lr) into one HTML file with images inline.")
    p.add_argument("path", help="run store (.sqlite/.db) or a directory holding run.sqlite")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--run", action="append", default=None,
                   help="only this run (repeatable; default all runs)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; a missing or unreadable store is a one-line usage error."""
    import importlib.util

    from stablestep.errors import UsageError
    from stablestep.report import write_report
    from stablestep.telemetry import list_runs

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the report needs matplotlib: pip install 'stablestep[plot]'")
    path = args.path
    if os.path.isdir(path):
        path = os.path.join(path, "run.sqlite")
    if not os.path.exists(path):
        raise UsageError(f"no run store at {args.path}")
    try:
        names = list_runs(path)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    if not names:
        raise UsageError(f"run store {path} holds no runs")
    chosen = args.run or names
    unknown = [r for r in chosen if r not in names]
    if unknown:
        raise UsageError(f"no run {unknown[0]!r} in {path}; runs: {', '.join(names)}")
    out = write_report(path, args.output, title=args.title, runs=chosen)
    print(f"report: {out}")
    return 0
