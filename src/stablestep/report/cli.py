"""``stablestep report PATH -o FILE.html``: one self-contained HTML report of any log."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

log = logging.getLogger("stablestep.report")


def add_parsers(subparsers: Any) -> None:
    """Register ``report``."""
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run store or any training log",
        description="Plot every run of a run store, CSV, TensorBoard dir, Keras history JSON "
        "or Hugging Face trainer_state.json on shared axes (loss with explained incidents; "
        "from a run store also the effective step, eps share, preconditioned sharpness, "
        "lr * lam_max, gradient norm, lr) into one HTML file with images inline.")
    p.add_argument("path", help="run store (.sqlite/.db, or a directory holding run.sqlite) "
                   "or any log that 'stablestep diagnose' reads")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--run", action="append", default=None,
                   help="only this run (repeatable; default all runs)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=cmd_report)


def check_output(path: str) -> None:
    """Raise ``UsageError`` unless ``path`` can be written as a file: not a directory,
    its folder existing (or creatable) and writable. Checked before any plotting."""
    from stablestep.errors import UsageError

    if os.path.isdir(path):
        raise UsageError(f"-o {path}: is a directory; give a file name such as "
                         f"{os.path.join(path, 'report.html')}")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"-o {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"-o {path}: permission denied")


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; unreadable input or an unwritable output is a one-line error."""
    import importlib.util

    from stablestep.errors import UsageError
    from stablestep.report import write_report

    missing = [m for m in ("matplotlib", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the report needs {' and '.join(missing)}: "
                         "pip install 'stablestep[plot]'")
    check_output(args.output)
    path = args.path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "run.sqlite")):
        path = os.path.join(path, "run.sqlite")
    from stablestep.diagnosis.sources import SourceError

    try:
        out = write_report(path, args.output, title=args.title, runs=args.run)
    except (SourceError, KeyError) as exc:
        from stablestep.console import _one_line

        raise UsageError(_one_line(exc)) from None
    from stablestep.text import printable

    print(f"report: {printable(out)}")
    return 0
