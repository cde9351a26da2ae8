"""``stablestep diagnose PATH [--run NAME] [--json] [-v]``: the findings for people or as JSON.

For people: one summary table (run, step, what happened, mechanism, confidence), then per
finding what to do (the computed remedies, each with its reason) and why (the mechanism in
one sentence with its deciding numbers). The full evidence is shown with ``--verbose`` and
is always in ``--json``. Which column or tag was read, and how many points, goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from typing import Any

log = logging.getLogger("stablestep.diagnosis.cli")


def add_parsers(subparsers: Any) -> None:
    """Register ``diagnose`` on the top-level ``stablestep`` parser."""
    p = subparsers.add_parser(
        "diagnose",
        help="find spikes, divergence and NaNs in a training log and explain them",
        description="Read a run store, CSV, TensorBoard dir, Keras history JSON, Hugging "
        "Face trainer_state.json, JSON of arrays or llm.c-style text log; for each incident "
        "say what to do (computed remedies) and why (the mechanism and its numbers). "
        "--verbose adds the full evidence; --json prints everything as one JSON object.",
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


def _line(console: Any, text: str, *, indent: int, style: str | None = None) -> None:
    """Print ``text`` (made printable) indented, wrapped at the console width with a
    hanging indent."""
    import textwrap

    from rich.markup import escape

    from stablestep.text import printable

    width = max(40, console.width)
    lines = textwrap.wrap(printable(text), width=width, initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + 4), break_on_hyphens=False) or [""]
    for ln in lines:
        console.print(escape(ln), style=style, highlight=False, soft_wrap=True)


def _run_of(d: dict) -> str:
    return str((d.get("evidence") or {}).get("run", ""))


def render(findings: list[Any], *, source: str, console: Any, verbose: bool = False) -> None:
    """Print ``findings`` for people: a summary table (run when the source has several,
    step, kind, mechanism, confidence), then per finding what to do (``action value --
    why`` lines) and why (one sentence with the deciding numbers); ``verbose`` adds the
    evidence as ``key: value`` lines. Everything is wrapped to the console width and every
    string from the log is shown through :func:`stablestep.text.printable`."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from stablestep.diagnosis.wording import headline, remedy_value
    from stablestep.text import printable

    shown_source = printable(source, limit=200)
    if not findings:
        console.print(f"{escape(shown_source)}: no spike, divergence or non-finite value "
                      "found", style="green", highlight=False)
        return
    _line(console, f"stablestep diagnose {shown_source}: {len(findings)} finding(s)",
          indent=0, style="bold")
    dicts = [f.to_dict() for f in findings]
    with_runs = any(_run_of(d) for d in dicts)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    if with_runs:
        table.add_column("run", overflow="ellipsis", max_width=24, no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("mechanism", overflow="fold")
    table.add_column("conf.", justify="right", no_wrap=True)
    for n, d in enumerate(dicts, 1):
        table.add_row(str(n), *([escape(printable(_run_of(d), limit=24))] if with_runs else []),
                      str(d["step"]), d["kind"], escape(printable(d["mechanism"])),
                      f"{d['confidence']:.2f}")
    console.print(table)
    said: dict[str, int] = {}  # remedies already printed -> the finding that had them
    for n, d in enumerate(dicts, 1):
        run = _run_of(d)
        where = f"run {printable(run, limit=40)}, " if run else ""
        _line(console, f"[{n}] {where}step {d['step']}: {d['kind']}, {d['mechanism']}",
              indent=0, style="bold")
        key = json.dumps(d["remedies"], sort_keys=True, default=str)
        if not d["remedies"]:
            _line(console, "what to do: nothing computed; see why", indent=2)
        elif key in said:
            _line(console, f"what to do: as for [{said[key]}]", indent=2)
        else:
            said[key] = n
            _line(console, "what to do:", indent=2)
            for r in d["remedies"]:
                value = remedy_value(str(r["action"]), r["value"])
                _line(console, f"{r['action']} = {value}"
                      + (f" -- {r['why']}" if r["why"] else ""), indent=4)
        why = headline(d).split(": ", 1)[-1]  # the step and run are on the line above
        _line(console, f"why: {why[:1].upper()}{why[1:]}", indent=2)
        ev = d["evidence"]
        if verbose:
            keys = [k for k in _SHOWN if k in ev] + [k for k in ev if k not in _SHOWN]
            _line(console, "evidence:", indent=2)
            for k in keys:
                _line(console, f"{k}: {_fmt(ev[k])}", indent=4)
    if not verbose:
        _line(console, "(full evidence: --verbose, or --json)", indent=0, style="dim")


def _describe(trace: Any) -> str:
    """"120 points (run a)": what was read, for the user to check (readers that report a
    :class:`ReadInfo` themselves say more: the column or tag, the step column)."""
    return f"{len(trace)} points" + (f" (run {trace.name})" if trace.name else "")


def run_diagnose(args: argparse.Namespace) -> int:
    """Read the source, diagnose each run and print the findings; unusable input raises
    ``UsageError`` (exit 2). Reader warnings (skipped rows, coarse resolution) and what
    was read go to the ``stablestep`` logger (stderr)."""
    import inspect

    from stablestep.console import console
    from stablestep.diagnosis.core import diagnose_trace
    from stablestep.diagnosis.sources import SourceError, SourceWarning, load
    from stablestep.errors import UsageError

    # readers that say what they read (ReadInfo, logged at INFO) need no line from here
    says_what_it_read = "infos" in inspect.signature(load).parameters
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SourceWarning)
            traces = (load(args.path, run=args.run, infos=[]) if says_what_it_read
                      else load(args.path, run=args.run))
        for w in caught:
            if issubclass(w.category, SourceWarning):
                log.warning("%s", w.message)
        findings = []
        for trace in traces:
            if not says_what_it_read:
                log.info("%s: read %s", args.path, _describe(trace))
            findings.extend(diagnose_trace(trace))
    except (SourceError, ValueError, OSError, KeyError) as exc:
        from stablestep.console import _one_line

        raise UsageError(_one_line(exc)) from None
    if args.json:
        print(json.dumps({"source": args.path, "findings": [f.to_dict() for f in findings]}))
        return 0
    render(findings, source=args.path, console=console(),
           verbose=bool(getattr(args, "verbose", 0)))
    return 0
