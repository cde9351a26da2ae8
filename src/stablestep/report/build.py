"""Assemble reports: a store's runs (:func:`write_report`), a lab scenario with its story
and scores (:func:`write_scenario_report`), and an index of scenarios (:func:`write_index`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stablestep.report import plots
from stablestep.report.html import (
    esc,
    figure,
    fmt,
    incident_list,
    incidents_for,
    page,
    panels,
    table,
)
from stablestep.report.incidents import remedy_value


def _findings(store: str, run: str) -> list[dict] | None:
    try:
        from stablestep.diagnosis import diagnose
    except ImportError:
        return None
    return [f.to_dict() for f in diagnose(store, run=run)]


def _spike_findings(spikes: Sequence[int], diverged_at: int | None) -> list[dict]:
    """Stand-in findings from the lab's own scoring when no diagnosis is available."""
    out = [{"step": int(s), "kind": "spike", "mechanism": "not diagnosed"} for s in spikes]
    if diverged_at is not None:
        out.append({"step": int(diverged_at), "kind": "non-finite", "mechanism": "not diagnosed"})
    return out


def fmt_spikes(spikes: Sequence[int] | None) -> str:
    """A spike count for tables: ``-`` when spikes are not counted."""
    return "-" if spikes is None else str(len(spikes))


def _write(text: str, out: str | os.PathLike) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _hyper_cell(config: dict) -> str:
    h = config.get("hyper") or {}
    keys = (("kind", "lr", "momentum", "nesterov") if h.get("kind") == "sgd"
            else ("kind", "lr", "eps", "eps_mode", "amsgrad", "beta1", "beta2"))
    return ", ".join(f"{k}={fmt(h[k])}" for k in keys if k in h)


def write_report(store: str | os.PathLike, out: str | os.PathLike, *,
                 title: str | None = None, runs: Sequence[str] | None = None) -> Path:
    """Write the HTML report of the runs in ``store`` (default all, on shared axes) to
    ``out``; the diagnosis (when available) numbers and explains the incidents."""
    from stablestep.telemetry import list_runs, open_run

    store = os.fspath(store)
    names = list(runs) if runs is not None else list_runs(store)
    series, rows, number = [], [], 1
    for name in names:
        run = open_run(store, run=name)
        found = _findings(store, name)
        incs = incidents_for(found or [], number)
        number += len(incs)
        s = plots.from_run(run, label=str(run.config.get("label") or name), incidents=incs)
        series.append(s)
        steps, loss = s.get("loss")
        rows.append([name, _hyper_cell(run.config), int(steps[-1]) + 1 if len(steps) else 0,
                     float(loss[-1]) if len(loss) else float("nan"),
                     "not available" if found is None else
                     (", ".join(sorted({f["mechanism"] for f in found})) or "none")])
    title = title or f"stablestep report: {Path(store).name}"
    body = [f"<h1>{esc(title)}</h1>", f"<p>Run store <code>{esc(store)}</code>, "
            f"{len(names)} run(s) on shared axes.</p>",
            table(["run", "optimizer", "steps", "last loss", "diagnosis"], rows),
            "<h2>Panels</h2>", '<div class="grid">', *panels(series), "</div>",
            "<h2>Incidents</h2>", incident_list(series)]
    return _write(page(title, "".join(body)), out)


def _role(role: str) -> str:
    return f'<span class="{esc(role)}">{esc(role)}</span>'


def write_scenario_report(scenario: Any, outcome: Any, out: str | os.PathLike) -> Path:
    """Write the report of a lab scenario run (a :class:`stablestep.lab.Scenario` and the
    :class:`stablestep.lab.runner.ScenarioOutcome` of running it)."""
    from stablestep.telemetry import open_run

    series, rows, number = [], [], 1
    for v in outcome.variants:
        run = open_run(outcome.store, run=v.name)
        found = (v.findings if v.findings is not None
                 else _spike_findings(v.spikes or [], v.diverged_at))
        incs = incidents_for(found, number)
        number += len(incs)
        series.append(plots.from_run(run, label=v.label, incidents=incs))
        mech = ("not available" if v.findings is None
                else ", ".join(v.mechanisms) or "no finding")
        remedy = ""
        for f in v.findings or []:
            for r in f.get("remedies") or []:
                remedy = f"{r.get('action')} = {remedy_value(str(r.get('action')), r.get('value'))}"
                break
            if remedy:
                break
        diverged = "-" if v.diverged_at is None else f"NaN at step {v.diverged_at}"
        rows.append([esc(v.label), _role(v.role), esc(fmt(v.final_loss)), esc(fmt_spikes(v.spikes)),
                     esc(diverged), esc(mech), esc(remedy)])
    extra = []
    if "bias-correction" in scenario.panels:
        from stablestep.lab.train import lr_factor

        steps = scenario.base().steps
        decays = {v.label: np.array([lr_factor(v.config)(t) for t in range(steps)])
                  for v in scenario.variants if v.config.schedule != "constant"}
        b1, b2 = scenario.base().betas
        colors = {v.label: plots.TAB10[i % 10] for i, v in enumerate(outcome.variants)}
        extra.append(figure(plots.bias_correction_panel(steps, decays, b1=b1, b2=b2,
                                                        colors=colors),
                            "Adam's bias-correction factor next to the lr decays compared "
                            "here: it rises to 1 within a few thousand steps."))
    if "period" in scenario.panels:
        spikes = {v.label: v.spikes or [] for v in outcome.variants}
        extra.append(figure(plots.interval_panel(spikes),
                            "Spikes per run and the median number of steps between them: "
                            "the spike alarms of the detector stack the diagnosis and the "
                            "guard use, counting those that peak at least the story's "
                            "factor above their baseline."))
    adam = {v.name: str(v.config.optimizer).lower().startswith("adam")
            for v in scenario.variants}  # eps and amsgrad mean nothing to SGD
    cfg_rows = [[v.label, v.config.optimizer, v.config.lr,
                 v.config.eps if adam[v.name] else "-",
                 v.config.amsgrad if adam[v.name] else "-",
                 v.config.schedule, v.config.n, v.config.steps] for v in scenario.variants
                if v.name in {o.name for o in outcome.variants}]
    title = f"seed {scenario.seed} · {scenario.name}: {scenario.title}"
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="story">{esc(scenario.story)}</p>',
        f"<p>{esc(scenario.explanation)}</p>",
        "<h2>Outcome</h2>",
        table(["variant", "role", "final loss", "spikes", "diverged", "diagnosis",
               "computed remedy"], rows, raw=True),
        "<h2>Panels (all variants on shared axes)</h2>",
        '<div class="grid">',
        *panels(series, smooth=50 if scenario.base().batch is not None else 0), *extra,
        "</div>",
        "<h2>Incidents</h2>", incident_list(series),
        "<h2>Settings</h2>",
        table(["variant", "optimizer", "lr", "eps", "amsgrad", "schedule", "data points",
               "steps"], cfg_rows),
        f"<p>Reproduce: <code>stablestep lab run {esc(scenario.name)} --out DIR</code>; "
        f"runs are stored in <code>{esc(outcome.store)}</code>.</p>",
    ]
    return _write(page(title, "".join(body)), out)


def write_index(outcomes: Sequence[Any], out: str | os.PathLike) -> Path:
    """Write an index page linking each scenario's report with its outcome table."""
    from stablestep.lab import scenarios

    base = Path(out).parent
    parts = ["<h1>stablestep lab: the four seed stories</h1>"]
    for o in outcomes:
        sc = scenarios.get(o.name)
        link = os.path.relpath(o.report, base) if o.report else None
        head = esc(f"seed {sc.seed} · {sc.name}: {sc.title}")
        parts.append(f'<h2><a href="{esc(link)}">{head}</a></h2>' if link else f"<h2>{head}</h2>")
        parts.append(f"<p>{esc(sc.explanation)}</p>")
        parts.append(table(
            ["variant", "role", "final loss", "spikes", "diverged at", "diagnosis"],
            [[v.label, v.role, v.final_loss, fmt_spikes(v.spikes),
              "-" if v.diverged_at is None else v.diverged_at,
              "not available" if v.findings is None else ", ".join(v.mechanisms) or "none"]
             for v in o.variants]))
    return _write(page("stablestep lab", "".join(parts)), out)
