"""Run a scenario: every variant trained under a :class:`stablestep.Monitor` into one
run store, scored (final loss, spikes, divergence), diagnosed, and reported.

Layout on disk for ``run_scenario(name, out=DIR)``::

    DIR/run.sqlite    one run per variant (run name = variant name)
    DIR/report.html   the self-contained report (stablestep.report)

``run_all(out=DIR)`` puts each scenario in ``DIR/<name>/`` and writes ``DIR/index.html``;
scenarios run in parallel processes, one store each, so no two processes write one file.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stablestep.lab import scenarios
from stablestep.lab.config import Variant
from stablestep.lab.scenarios import Scenario
from stablestep.lab.spikes import spike_steps
from stablestep.lab.train import train

STORE_NAME = "run.sqlite"
REPORT_NAME = "report.html"
log = logging.getLogger("stablestep.lab")

# The stories in the words users have for them (the README's and the reports' titles).
STORY_WORDS = {
    "late-explosion": "late explosion",
    "periodic-spikes": "periodic spikes",
    "adam-decay": "Adam with lr decay",
    "lr-divergence": "lr too high -> NaN",
}


def story_words(scenario: str | Scenario) -> str:
    """A scenario's story in a few words ("late explosion", "periodic spikes", ...);
    scenarios without an entry read as their name with spaces."""
    name = scenario if isinstance(scenario, str) else scenario.name
    return STORY_WORDS.get(name, name.replace("-", " "))


def _lab_store_of(store: Path, scenario: str) -> bool:
    """Whether ``store`` holds only runs the lab wrote for ``scenario`` (so replacing it
    loses nothing that ``lab run`` cannot write again)."""
    try:
        from stablestep.telemetry import list_runs, open_run

        names = list_runs(store)
        return bool(names) and all(
            (open_run(store, n).config or {}).get("scenario") == scenario for n in names)
    except Exception:  # unreadable, foreign, locked: not ours to delete
        return False


def check_out(out: str | os.PathLike, scenario: str, *, overwrite: bool = False) -> Path:
    """Raise, changing nothing, unless ``out`` can take ``out/run.sqlite`` for
    ``scenario``: ``NotADirectoryError`` when ``out`` is a file, ``FileExistsError`` when
    ``out/run.sqlite`` holds runs other than this scenario's and not ``overwrite``.
    Returns the store path."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    store = out_dir / STORE_NAME
    if store.is_dir():
        raise IsADirectoryError(f"{store} is a directory")
    if (store.exists() or Path(f"{store}-wal").exists()) and not (
            overwrite or _lab_store_of(store, scenario)):
        raise FileExistsError(f"{store} exists and holds runs that are not from "
                              f"'lab run {scenario}'; pass --overwrite to replace it, "
                              "or choose another --out")
    return store


def prepare_out(out: str | os.PathLike, scenario: str, *, overwrite: bool = False) -> Path:
    """:func:`check_out`, then create ``out`` and remove the old ``out/run.sqlite`` (a
    store the lab wrote for the same scenario, or any with ``overwrite``). Returns the
    store path."""
    store = check_out(out, scenario, overwrite=overwrite)
    store.parent.mkdir(parents=True, exist_ok=True)
    if store.exists():
        log.info("replacing %s", store)
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(store) + suffix)
        if p.exists():
            p.unlink()
    return store


@dataclass
class VariantOutcome:
    """Scores of one variant: ``final_loss`` (whole data, NaN if diverged), ``spikes``
    (start steps, :func:`stablestep.lab.spikes.spike_steps` with the scenario's factor;
    ``None`` where the scenario does not count spikes, e.g. noisy minibatch losses),
    ``diverged_at``, ``findings`` (``Finding.to_dict()`` of the diagnosis; ``None`` when
    the diagnosis is unavailable), wall ``seconds``."""

    name: str
    label: str
    role: str
    final_loss: float
    spikes: list[int] | None
    diverged_at: int | None
    findings: list[dict] | None
    seconds: float

    @property
    def mechanisms(self) -> list[str]:
        """Mechanisms named by the findings (in order, without repeats)."""
        out: list[str] = []
        for f in self.findings or []:
            if f.get("mechanism") not in out:
                out.append(f.get("mechanism"))
        return out


@dataclass
class ScenarioOutcome:
    """What :func:`run_scenario` produced: paths and one :class:`VariantOutcome` per variant."""

    name: str
    store: str
    report: str | None
    variants: list[VariantOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def variant(self, name: str) -> VariantOutcome:
        """The outcome of variant ``name``."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r} in {self.name!r}")


def _diagnose(store: str, run: str) -> list[dict] | None:
    try:
        from stablestep.diagnosis import diagnose
    except ImportError:
        return None
    return [f.to_dict() for f in diagnose(store, run=run)]


VERIFY_HORIZON = 300
"""Steps each remedy is replayed for (:func:`stablestep.lab.verify.verify_lab`)."""


def verify_findings(config: Any, findings: list[dict] | None, *,
                    horizon: int = VERIFY_HORIZON) -> None:
    """Verify by replay the remedies of the first finding that has replayable ones (a lab
    run is deterministic, so it can be replayed from before the onset with each remedy:
    :func:`stablestep.lab.verify.verify_lab`), and write the outcome into that finding:
    ``finding["verified"]`` is a list of ``{"action", "value", "removed", "incident_at",
    "summary"}``, the unchanged control first (it must show the incident again for the
    check to mean anything), e.g. ``"verified: set-eps 0.0015, no incident in the next
    300 steps"``. Findings without replayable remedies are left as they are."""
    from stablestep.lab.config import TrainConfig
    from stablestep.lab.verify import REPLAYABLE, verify_lab

    if not isinstance(config, TrainConfig):  # text stories: no replay (yet)
        return
    for f in findings or []:
        rems = [r for r in f.get("remedies") or [] if r.get("action") in REPLAYABLE]
        if not rems or f.get("mechanism") in ("gradient-outlier", "unknown"):
            continue
        vs = verify_lab(config, int(f["step"]), rems, horizon=horizon)
        f["verified"] = [{"action": v.action, "value": v.value, "removed": v.removed,
                          "incident_at": v.incident_at, "summary": v.summary} for v in vs]
        return


def run_variant(
    scenario: Scenario, variant: Variant, *, store: str, quick: bool = False,
    verify: bool = True,
) -> VariantOutcome:
    """Train ``variant`` under a Monitor writing run ``variant.name`` into ``store``.

    ``quick`` probes curvature four times less often (tests); the training itself is
    unchanged, so the phenomenon is the same. ``verify``: for the failing variant,
    replay from before the first finding's onset with each of its remedies and say in the
    finding which ones remove the incident (:func:`verify_findings`).
    """
    from stablestep.telemetry import Monitor

    cfg = variant.config
    if quick and cfg.curvature_every:
        cfg = replace(cfg, curvature_every=cfg.curvature_every * 4)
    extras = {"scenario": scenario.name, "seed": scenario.seed, "variant": variant.name,
              "label": variant.label, "role": variant.role, "train": cfg.to_dict()}

    def factory(model, opt, probe_loss):
        """A Monitor on this run, probing curvature on the whole data."""
        return Monitor(model, opt, store=store, run=variant.name, config=extras,
                       curvature_every=cfg.curvature_every or None,
                       curvature_loss=probe_loss if cfg.curvature_every else None)

    t0 = time.perf_counter()
    result = train(cfg, monitor=factory)
    seconds = time.perf_counter() - t0
    findings = _diagnose(store, variant.name)
    if verify and variant.role == "failing":
        verify_findings(cfg, findings)
    return VariantOutcome(
        name=variant.name,
        label=variant.label,
        role=variant.role,
        final_loss=result.final_loss,
        spikes=(None if scenario.spike_factor is None
                else spike_steps(result.losses, factor=scenario.spike_factor)),
        diverged_at=result.diverged_at,
        findings=findings,
        seconds=seconds,
    )


def run_scenario(
    scenario: str | Scenario,
    *,
    out: str | os.PathLike,
    quick: bool = False,
    variants: Sequence[str] | None = None,
    report: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    verify: bool = True,
) -> ScenarioOutcome:
    """Run ``scenario`` (a name or a :class:`Scenario`) into ``out/run.sqlite``.

    ``variants``: names to run (default all). An existing ``out/run.sqlite`` that this
    scenario wrote is replaced; any other only with ``overwrite`` (else
    ``FileExistsError``, before any training: :func:`prepare_out`). ``report``: also
    write ``out/report.html``. ``progress(done, total)`` is called after each variant.
    ``verify``: verify the failing variant's remedies by replay (:func:`verify_findings`).
    """
    sc = scenarios.get(scenario) if isinstance(scenario, str) else scenario
    chosen = sc.variants if variants is None else tuple(sc.variant(v) for v in variants)
    out_dir = Path(out)
    store = prepare_out(out_dir, sc.name, overwrite=overwrite)
    t0 = time.perf_counter()
    outcome = ScenarioOutcome(name=sc.name, store=str(store), report=None)
    for i, v in enumerate(chosen, 1):
        outcome.variants.append(run_variant(sc, v, store=str(store), quick=quick,
                                            verify=verify))
        log.debug("%s: %s trained in %.1f s", sc.name, v.name, outcome.variants[-1].seconds)
        if progress is not None:
            progress(i, len(chosen))
    if report:
        from stablestep.lab.pages import write_scenario_report

        outcome.report = str(write_scenario_report(sc, outcome, out_dir / REPORT_NAME))
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_one(name: str, out: str, quick: bool, overwrite: bool = False) -> ScenarioOutcome:
    import torch

    torch.set_num_threads(1)
    return run_scenario(name, out=os.path.join(out, name), quick=quick, overwrite=overwrite)


def run_all(
    *,
    out: str | os.PathLike,
    names: Sequence[str] | None = None,
    quick: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[ScenarioOutcome], None] | None = None,
) -> list[ScenarioOutcome]:
    """Run several scenarios (default all) in ``workers`` processes (default: CPU count,
    at most 4), each into ``out/<name>/``; write ``out/index.html``. Returns outcomes in
    the lab's order; ``progress(outcome)`` is called as each scenario finishes. Every
    output directory is checked (:func:`prepare_out`) before anything trains."""
    names = list(names or scenarios.names())
    for n in names:
        scenarios.get(n)  # validate before starting processes
        check_out(Path(out) / n, n, overwrite=overwrite)
    Path(out).mkdir(parents=True, exist_ok=True)
    workers = min(workers or min(4, os.cpu_count() or 1), len(names))
    results: dict[str, ScenarioOutcome] = {}
    if workers <= 1:
        for n in names:
            results[n] = _run_one(n, os.fspath(out), quick, overwrite)
            if progress is not None:
                progress(results[n])
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_run_one, n, os.fspath(out), quick, overwrite): n
                       for n in names}
            from concurrent.futures import as_completed

            for fut in as_completed(futures):
                res = fut.result()
                results[res.name] = res
                if progress is not None:
                    progress(res)
    ordered = [results[n] for n in names]
    from stablestep.lab.pages import write_index

    write_index(ordered, Path(out) / "index.html")
    return ordered


def fmt_loss(x: float) -> str:
    """A loss for tables: ``NaN`` when diverged, else 3 significant digits."""
    return "NaN" if not math.isfinite(x) else f"{x:.3g}"
