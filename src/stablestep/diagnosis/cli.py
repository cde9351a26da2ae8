"""``stablestep diagnose PATH [--run NAME] [--json]``: the findings as a table or JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def add_parsers(subparsers: Any) -> None:
    """Register ``diagnose`` on the top-level ``stablestep`` parser."""
    p = subparsers.add_parser(
        "diagnose",
        help="find spikes, divergence and NaNs in a training log and explain them",
        description="Read a run store, CSV, TensorBoard dir, Keras history JSON, JSON of "
        "arrays or llm.c-style text log; report each incident with its mechanism, the "
        "numbers that show it and computed remedies.",
    )
    p.add_argument("path", help="training log or run store")
    p.add_argument("--run", default=None, help="run name inside a multi-run source")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=run_diagnose)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return str(v)


_SHOWN = ("run", "peak_over_baseline", "detected_at", "recovered", "n_spikes", "period",
          "interval_cv", "precond_sharpness", "precond_threshold", "lr_sharpness",
          "gd_threshold", "grad_norm_z", "eps_share", "g2v_rms_surge", "eff_step_max_surge",
          "early_warning", "first_non_finite_step", "last_finite_loss", "non_finite_at",
          "short_excerpt_records", "missing", "suspected")


def run_diagnose(args: argparse.Namespace) -> int:
    """Run the diagnosis and print it; unusable input raises ``UsageError`` (exit 2)."""
    from stablestep.cli import UsageError
    from stablestep.diagnosis.core import diagnose
    from stablestep.diagnosis.sources import SourceError

    try:
        findings = diagnose(args.path, run=args.run)
    except (SourceError, ValueError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if args.json:
        print(json.dumps({"source": args.path, "findings": [f.to_dict() for f in findings]}))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=sys.stdout)
    if not findings:
        console.print(f"[green]{args.path}: no spike, divergence or non-finite value found[/]")
        return 0
    table = Table(title=f"stablestep diagnose {args.path}", show_lines=True)
    for col in ("step", "kind", "mechanism", "conf.", "evidence", "remedies"):
        table.add_column(col, overflow="fold")
    for f in findings:
        d = f.to_dict()
        ev = "\n".join(escape(f"{k}: {_fmt(d['evidence'][k])}")
                       for k in _SHOWN if k in d["evidence"])
        rem = "\n".join(escape(f"{r['action']} = {_fmt(r['value'])}") for r in d["remedies"])
        table.add_row(str(d["step"]), d["kind"], d["mechanism"], f"{d['confidence']:.2f}", ev,
                      rem)
    console.print(table)
    for f in findings:
        for r in f.remedies:
            console.print(escape(f"step {f.step} {r.action}: {r.why}"), highlight=False)
    return 0
