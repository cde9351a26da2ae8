"""``stablestep lab list``, ``stablestep lab run NAME|all [--out DIR]`` and
``stablestep sweep NAME --lr ... --eps ... --amsgrad ...``."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def add_parsers(subparsers: Any) -> None:
    """Register ``lab`` (with ``list`` and ``run``) and ``sweep``."""
    lab = subparsers.add_parser(
        "lab", help="the classic Adam failures (late explosion, periodic spikes, Adam with "
        "lr decay, lr too high -> NaN) reproduced, explained and fixed",
        description="Reproduce a classic Adam failure on the CPU in seconds, compare the "
        "fixes side by side, diagnose each run and write an HTML report.")
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    from stablestep.console import VERBOSITY

    p = sub.add_parser("list", help="list the scenarios", parents=[VERBOSITY])
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("run", help="run a scenario (or all) and write its report",
                       parents=[VERBOSITY])
    p.add_argument("name", help="scenario name, or 'all'")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/NAME; for 'all' runs/lab)")
    p.add_argument("--quick", action="store_true",
                   help="probe curvature 4x less often (faster, same training)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for 'all' (default: CPU count, at most 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DIR/run.sqlite that other runs wrote (one this "
                   "scenario wrote is always replaced)")
    p.set_defaults(func=cmd_run)
    lab.set_defaults(func=lambda args: (lab.print_help(), 2)[1])

    sw = subparsers.add_parser(
        "sweep", help="stability map of a scenario over lr x eps x amsgrad",
        description="Train a scenario's failing setting at every grid point (in parallel "
        "processes) and draw final loss and spike count per cell.")
    sw.add_argument("name", help="scenario name (see 'stablestep lab list')")
    sw.add_argument("--lr", nargs="+", required=True,
                    help="learning rates (space or comma separated)")
    sw.add_argument("--eps", nargs="+", default=None, help="epsilons (default: the scenario's)")
    sw.add_argument("--amsgrad", nargs="+", default=["false"], help="true/false values")
    sw.add_argument("--steps", type=int, default=None,
                    help="steps per cell (default: the scenario's)")
    sw.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    sw.add_argument("--out", default=None,
                    help="output directory (default runs/sweep-NAME); sweep.json and "
                    "sweep.html in it are replaced")
    sw.set_defaults(func=cmd_sweep)


def printable(text) -> str:
    """Paths and names from the user, shown with escapes for control characters."""
    from stablestep.text import printable as _printable

    return _printable(text)


def _console():
    """The CLI's console (terminal width, or ``COLUMNS``/80 when piped)."""
    from stablestep.console import console

    return console()


def _usage(msg: str) -> Exception:
    from stablestep.errors import UsageError

    return UsageError(msg)


def _need_matplotlib() -> None:
    import importlib.util

    missing = [m for m in ("matplotlib", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise _usage(f"the report needs {' and '.join(missing)}: pip install 'stablestep[plot]'")


def _scenario(name: str):
    from stablestep.lab import scenarios

    try:
        return scenarios.get(name)
    except KeyError as exc:
        raise _usage(exc.args[0]) from None


def cmd_list(args: argparse.Namespace) -> int:
    """Print the scenarios with their story, question and variants."""
    from rich.table import Table

    from stablestep.lab import scenarios
    from stablestep.lab.runner import story_words

    t = Table(title="stablestep lab scenarios")
    every = [*scenarios.names(), *scenarios.TEXT]
    t.add_column("name", min_width=max(map(len, every)), no_wrap=True)  # what users type
    for col in ("story", "question", "variants"):
        t.add_column(col)
    for n in every:
        sc = scenarios.get(n)
        t.add_row(sc.name, story_words(sc), sc.title, ", ".join(v.name for v in sc.variants))
    _console().print(t)
    print("run one:  stablestep lab run NAME --out DIR   ('all': the first four stories; the "
          "transformer stories take 30-60 s each)")
    return 0


def _print_outcome(console, outcome) -> None:
    from rich.markup import escape
    from rich.table import Table

    from stablestep.lab import scenarios
    from stablestep.lab.runner import fmt_loss, story_words
    from stablestep.report.build import fmt_spikes

    sc = scenarios.get(outcome.name)
    t = Table(title=f"{escape(story_words(sc))} ({sc.name}): {escape(sc.title)} "
              f"({outcome.seconds:.0f} s)")
    for col in ("variant", "role", "final loss", "spikes", "diverged", "diagnosis", "remedy"):
        t.add_column(col, overflow="fold")
    for v in outcome.variants:
        remedy = next((f"{r.get('action')} {r.get('value')}" for f in v.findings or []
                       for r in f.get("remedies") or []), "")
        mech = "n/a" if v.findings is None else (", ".join(v.mechanisms) or "-")
        t.add_row(escape(v.label), v.role, fmt_loss(v.final_loss), fmt_spikes(v.spikes),
                  "-" if v.diverged_at is None else f"NaN at {v.diverged_at}",
                  escape(mech), escape(str(remedy)))
    console.print(t)
    if outcome.report:
        console.print(f"report: {escape(printable(outcome.report))}", highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one scenario or all (output directories checked before anything trains), with
    a progress bar; print the outcome tables and where the reports are."""
    from stablestep.console import progress
    from stablestep.lab import runner, scenarios

    console = _console()
    if args.workers is not None and args.workers < 1:
        raise _usage(f"--workers must be >= 1; got {args.workers}")
    _need_matplotlib()
    if args.name == "all":
        out = Path(args.out or os.path.join("runs", "lab"))
        names = scenarios.names()
        done = []

        with progress(f"{len(names)} stories", len(names)) as update:
            def finished(outcome):
                done.append(outcome)
                update(len(done), len(names))
                _print_outcome(console, outcome)

            outcomes = runner.run_all(out=out, quick=args.quick, workers=args.workers,
                                      overwrite=args.overwrite, progress=finished)
        from rich.markup import escape

        console.print(f"index of all reports: {escape(printable(out / 'index.html'))}",
                      highlight=False)
        return 0 if outcomes else 1
    sc = _scenario(args.name)
    out = Path(args.out or os.path.join("runs", sc.name))
    runner.check_out(out, sc.name, overwrite=args.overwrite)  # before the bar appears
    with progress(f"{runner.story_words(sc)}: variants", len(sc.variants)) as update:
        outcome = runner.run_scenario(sc, out=out, quick=args.quick,
                                      overwrite=args.overwrite, progress=update)
    _print_outcome(console, outcome)
    return 0


def _floats(values: list[str] | None, flag: str) -> list[float]:
    out = []
    for chunk in values or []:
        for item in chunk.split(","):
            if not item.strip():
                continue
            try:
                x = float(item)
            except ValueError:
                raise _usage(f"{flag}: not a number: {item!r}") from None
            if not math.isfinite(x) or x < 0:
                raise _usage(f"{flag}: values must be finite and >= 0; got {item.strip()}")
            out.append(x)
    return out


def _bools(values: list[str]) -> list[bool]:
    out = []
    for chunk in values:
        for item in chunk.split(","):
            if item.strip().lower() not in _BOOLS:
                raise _usage(f"--amsgrad: expected true or false; got {item!r}")
            out.append(_BOOLS[item.strip().lower()])
    return out


def _sweep_out(out: Path) -> None:
    """Make ``out`` ready for sweep.json and sweep.html before any cell trains."""
    if out.exists() and not out.is_dir():
        raise _usage(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("sweep.json", "sweep.html"):
        p = out / name
        if p.is_dir():
            raise _usage(f"--out: {p} is a directory")
        if not os.access(out, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise _usage(f"--out: cannot write {p}")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Check every argument and the output directory, run the sweep with a progress bar,
    write sweep.json (standard JSON: no NaN/Infinity) and sweep.html, print the map."""
    from stablestep.console import progress
    from stablestep.lab.runner import fmt_loss
    from stablestep.lab.sweep import sweep

    sc = _scenario(args.name)
    _need_matplotlib()
    lrs = _floats(args.lr, "--lr")
    epss = _floats(args.eps, "--eps") if args.eps else [sc.base().eps]
    amsgrads = _bools(args.amsgrad)
    if not lrs:
        raise _usage("--lr: give at least one learning rate")
    if any(x == 0 for x in lrs):
        raise _usage("--lr: learning rates must be > 0")
    if not epss:
        raise _usage("--eps: give at least one epsilon")
    if args.steps is not None and args.steps < 1:
        raise _usage(f"--steps must be >= 1; got {args.steps}")
    if args.workers is not None and args.workers < 1:
        raise _usage(f"--workers must be >= 1; got {args.workers}")
    out = Path(args.out or os.path.join("runs", f"sweep-{sc.name}"))
    _sweep_out(out)
    console = _console()
    with progress(f"sweep {sc.name}", len(lrs) * len(epss) * len(amsgrads)) as update:
        result = sweep(sc.name, lrs=lrs, epss=epss, amsgrads=amsgrads, steps=args.steps,
                       workers=args.workers, progress=update)
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False),
                                    encoding="utf-8")
    from stablestep.report.sweepmap import write_sweep_report

    html = write_sweep_report(result, out / "sweep.html")
    from rich.table import Table

    for a in result.amsgrads:
        t = Table(title=f"{sc.name}: final loss / spikes (amsgrad={a})")
        t.add_column("eps \\ lr")
        for lr in result.lrs:
            t.add_column(f"{lr:g}")
        for eps in result.epss:
            cells = [result.cell(lr, eps, a) for lr in result.lrs]
            t.add_row(f"{eps:g}", *[f"{fmt_loss(c.final_loss)} / "
                                    f"{'-' if c.spikes is None else c.spikes}" for c in cells])
        console.print(t)
    from rich.markup import escape

    console.print(f"stability map: {escape(printable(html))}", highlight=False)
    return 0
