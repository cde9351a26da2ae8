"""The lab's HTML pages: one report per scenario (its story, the variants' outcome, the
diagnosis and the panels) and an index linking them.

Built from :mod:`stablestep.report`'s parts; the lab depends on the report, never the
other way round.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stablestep.report import plots
from stablestep.report.build import _spike_findings, _write, fmt_spikes
from stablestep.report.html import (
    esc,
    figure,
    fmt,
    incident_list,
    incidents_for,
    page,
    panels,
    render,
    table,
)
from stablestep.report.incidents import remedy_value


def _role(role: str) -> str:
    return f'<span class="{esc(role)}">{esc(role)}</span>'


def verified_note(finding: dict) -> str:
    """What the replay showed for a finding's remedies (``finding["verified"]``, written by
    :func:`stablestep.lab.runner.verify_findings`), as one parenthesis: the remedies that
    removed the incident, and the ones that did not; empty when nothing was replayed."""
    vs = finding.get("verified") or []
    control = next((v for v in vs if v["action"] == "control"), None)
    if control is None:
        return ""
    if control["removed"]:
        return " (replay: the incident did not recur unchanged; nothing to verify)"
    ok = [v["summary"] for v in vs if v["action"] != "control" and v["removed"]]
    bad = [v["summary"] for v in vs if v["action"] != "control" and not v["removed"]
           and not v["summary"].startswith("not replayable")]
    return " (" + "; ".join(ok + bad) + ")" if ok or bad else ""


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
                remedy += verified_note(f)
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
    from stablestep.lab.runner import story_words

    title = f"{story_words(scenario)} ({scenario.name}): {scenario.title}"
    body = render(
        "scenario_report", title=title, story=scenario.story,
        explanation=scenario.explanation,
        outcome=table(["variant", "role", "final loss", "spikes", "diverged", "diagnosis",
                       "computed remedy"], rows, raw=True),
        figures=[*panels(series, smooth=50 if scenario.base().batch is not None else 0),
                 *extra],
        incidents=incident_list(series),
        settings=table(["variant", "optimizer", "lr", "eps", "amsgrad", "schedule",
                        "data points", "steps"], cfg_rows),
        name=scenario.name, store=outcome.store)
    return _write(page(title, body), out)


def write_index(outcomes: Sequence[Any], out: str | os.PathLike) -> Path:
    """Write an index page linking each scenario's report with its outcome table."""
    from stablestep.lab import scenarios
    from stablestep.lab.runner import story_words

    base = Path(out).parent
    items = []
    for o in outcomes:
        sc = scenarios.get(o.name)
        items.append({
            "link": os.path.relpath(o.report, base) if o.report else None,
            "head": f"{story_words(sc)} ({sc.name}): {sc.title}",
            "explanation": sc.explanation,
            "table": table(
                ["variant", "role", "final loss", "spikes", "diverged at", "diagnosis"],
                [[v.label, v.role, v.final_loss, fmt_spikes(v.spikes),
                  "-" if v.diverged_at is None else v.diverged_at,
                  "not available" if v.findings is None else ", ".join(v.mechanisms) or "none"]
                 for v in o.variants])})
    stories = ", ".join(story_words(o.name) for o in outcomes) or "no stories"
    return _write(page("stablestep lab", render("index", stories=stories, scenarios=items)),
                  out)
