"""``stablestep diagnose PATH [--run NAME] [--json]``: the findings as a table or JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
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
          "interval_cv", "precond_sharpness", "precond_threshold", "precond_ratio",
          "lr_sharpness", "gd_threshold", "lr_sharpness_ratio", "grad_norm_z", "eps_share",
          "g2v_rms_surge", "eff_step_max_surge", "early_warning", "first_non_finite_step",
          "last_finite_loss", "non_finite_at", "short_excerpt_records", "missing", "suspected")
# the table's one-line summary: the first three of these a finding has, with short labels
_HEADLINE = {"peak_over_baseline": "peak/base", "n_spikes": "spikes", "period": "period",
             "precond_ratio": "P^-1H/bound", "lr_sharpness_ratio": "lr*lam/bound",
             "grad_norm_z": "grad z", "first_non_finite_step": "first non-finite",
             "last_finite_loss": "last finite loss", "recovered": "recovered"}


def _console() -> Any:
    """A console 120 columns wide when stdout is not a terminal (pipes, files, CI logs)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(file=sys.stdout, width=120)


def _line(console: Any, text: str, *, indent: int, style: str | None = None) -> None:
    """Print ``text`` indented, wrapped at the console width with a hanging indent."""
    import textwrap

    from rich.markup import escape

    width = max(40, console.width)
    lines = textwrap.wrap(text, width=width, initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + 4), break_on_hyphens=False) or [""]
    for ln in lines:
        console.print(escape(ln), style=style, highlight=False, soft_wrap=True)


def render(findings: list[Any], *, source: str, console: Any) -> None:
    """Print ``findings`` for people: a compact table (one line per finding: step, kind,
    mechanism, confidence, and from 100 columns the headline numbers), then per finding
    its headline, its evidence as ``key: value`` lines and its remedies as
    ``action value -- why`` lines, wrapped to the console width."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if not findings:
        console.print(f"[green]{escape(source)}: no spike, divergence or non-finite value "
                      "found[/]")
        return
    _line(console, f"stablestep diagnose {source}", indent=0, style="bold")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("mechanism", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True)
    wide = console.width >= 100  # at 80 columns the headline goes under each finding
    if wide:
        table.add_column("headline", overflow="fold")
    dicts = [f.to_dict() for f in findings]
    heads = [", ".join([f"{lab} {_fmt(d['evidence'][k])}" for k, lab in _HEADLINE.items()
                        if k in d["evidence"]][:3]) for d in dicts]
    for d, head in zip(dicts, heads, strict=True):
        table.add_row(str(d["step"]), d["kind"], d["mechanism"], f"{d['confidence']:.2f}",
                      *([escape(head)] if wide else []))
    console.print(table)
    for n, d in enumerate(dicts, 1):
        console.print()
        _line(console, f"[{n}] step {d['step']} {d['kind']}: {d['mechanism']} "
                             f"(confidence {d['confidence']:.2f})", indent=0, style="bold")
        if heads[n - 1]:
            _line(console, heads[n - 1], indent=2)
        ev = d["evidence"]
        keys = [k for k in _SHOWN if k in ev] + [k for k in ev if k not in _SHOWN]
        if keys:
            _line(console, "evidence", indent=2)
        for k in keys:
            _line(console, f"{k}: {_fmt(ev[k])}", indent=4)
        if d["remedies"]:
            _line(console, "remedies", indent=2)
        for r in d["remedies"]:
            _line(console, f"{r['action']} {_fmt(r['value'])} -- {r['why']}", indent=4)


def run_diagnose(args: argparse.Namespace) -> int:
    """Run the diagnosis and print it; unusable input raises ``UsageError`` (exit 2)."""
    from stablestep.diagnosis.core import diagnose
    from stablestep.diagnosis.sources import SourceError, SourceWarning
    from stablestep.errors import UsageError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SourceWarning)
            findings = diagnose(args.path, run=args.run)
        for w in caught:
            if issubclass(w.category, SourceWarning):
                print(f"stablestep: warning: {w.message}", file=sys.stderr)
    except (SourceError, ValueError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if args.json:
        print(json.dumps({"source": args.path, "findings": [f.to_dict() for f in findings]}))
        return 0
    render(findings, source=args.path, console=_console())
    return 0
