"""``diagnose(source)``: run the online detectors over a trace and explain each incident.

The same detectors the guard uses live are replayed record by record, so what the
diagnosis reports is what an online monitor would have seen at that step. Incidents
are then grouped: excursions that start before the previous one recovered form one
episode; an episode that never recovers is a *divergence* (one regime finding, however
many sub-peaks it has); ``min_spikes`` or more recovered spikes not explained by
outlier batches or overflows are one *periodic-spikes* finding with their period and
regularity.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stablestep.diagnosis import infer
from stablestep.diagnosis.detectors import Excursion, PeriodicConfig, SpikeConfig
from stablestep.diagnosis.explain import Incident, classify, remedies
from stablestep.diagnosis.findings import Finding, Remedy
from stablestep.diagnosis.sources import load
from stablestep.diagnosis.stack import StackConfig, StackIncident, replay
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names


@dataclass(frozen=True)
class DiagnoseConfig:
    """Settings of the offline diagnosis: ``stack`` is the detector stack's config (the
    guard's default is the same, so both see the same incidents); ``tail_factor``: an
    excursion still open when the log ends, at least this far above its baseline after 5
    records, is a divergence."""

    stack: StackConfig = field(default_factory=StackConfig)
    tail_factor: float = 4.0

    @property
    def spike(self) -> SpikeConfig:
        """The spike detector's config (``stack.spike``)."""
        return self.stack.spike

    @property
    def periodic(self) -> PeriodicConfig:
        """The periodic grouping's config (``stack.periodic``)."""
        return self.stack.periodic


def _replay(trace: Trace, cfg: DiagnoseConfig) -> tuple[list[Excursion], list[int],
                                                        list[StackIncident]]:
    """Feed the trace through the detector stack the guard runs live."""
    n = len(trace)
    stack_cfg = cfg.stack
    spike_cfg = stack_cfg.spike
    if n < 2 * spike_cfg.warmup:
        # A short excerpt cannot teach the noise: the first record is the baseline and
        # a rise of 2 * min_rise (confirmed, or a jump) is the only test.
        spike_cfg = SpikeConfig(**{**spike_cfg.__dict__, "warmup": 1, "z": 1e-9,
                                   "min_rise": max(spike_cfg.min_rise, 0.1), "window": 1000})
        stack_cfg = replace(stack_cfg, spike=spike_cfg)
    stack = replay(trace, config=stack_cfg)
    nf_steps = [i.step for i in stack.incidents if i.kind == "non-finite"]
    return stack.excursions, nf_steps, stack.incidents


def _episodes(excs: list[Excursion]) -> list[list[Excursion]]:
    """Chain excursions that begin inside the previous one or in its aftermath."""
    out: list[list[Excursion]] = []
    for e in excs:
        if out and e.follows:
            out[-1].append(e)
        else:
            out.append([e])
    return out


def _incident(chain: list[Excursion], kind: str, nonfinite_at: int | None = None) -> Incident:
    peak = max(chain, key=lambda e: e.peak)
    return Incident(onset=chain[0].onset, detected=chain[0].detected, kind=kind,
                    peak=peak.peak, peak_step=peak.peak_step, baseline=chain[0].baseline,
                    recovered=chain[-1].recovered, jump=chain[0].jump, nonfinite_at=nonfinite_at,
                    follow_on=tuple(e.detected for e in chain[1:]), end=chain[-1].end,
                    longest=None if any(e.end is None for e in chain)
                    else max(e.end - e.onset for e in chain))


def _unrecovered_kind(trace: Trace, chain: list[Excursion], nf_at: int | None,
                      div_at: int | None, cfg: DiagnoseConfig) -> str:
    """An excursion that did not recover is a divergence if the stack raised a divergence
    incident in it, it reached a non-finite value, outlasted ``patience`` records, or ended
    the log still ``tail_factor`` above its baseline after at least 5 records; otherwise
    the log simply ends during a spike."""
    if nf_at is not None or div_at is not None:
        return "divergence"
    i0 = int(np.searchsorted(trace.steps, chain[0].onset))
    end = chain[-1].end
    i1 = len(trace) if end is None else int(np.searchsorted(trace.steps, end))
    if end is not None and i1 - i0 >= cfg.spike.patience:
        return "divergence"
    tail = trace.loss[i0:i1]
    tail = tail[np.isfinite(tail)]
    if end is None and tail.size >= 5 and tail[-1] >= cfg.tail_factor * chain[0].baseline:
        return "divergence"
    return "spike"


def diagnose_trace(trace: Trace, *, config: DiagnoseConfig | None = None) -> list[Finding]:
    """Findings for one normalised trace, ordered by step."""
    cfg = config or DiagnoseConfig()
    excs, nf_steps, raised = _replay(trace, cfg)
    # a divergence raised while the user's schedule has the lr back up where the run
    # trained, that gave back under half the run's progress, is the schedule (a warm
    # restart): not an incident (the Guard holds on the same test, infer.held_by_schedule)
    raised = [i for i in raised if i.kind != "divergence"
              or infer.held_by_schedule(trace, i.step, i.baseline) is None]
    div_steps = [i.step for i in raised if i.kind == "divergence"]
    incidents: list[Incident] = []
    consumed_nf: set[int] = set()
    rolled_back = {int(e["step"]) for e in trace.events if e.get("kind") == "guard"
                   and (e.get("data") or {}).get("action") == "rollback"}
    for chain in _episodes(excs):
        last = chain[-1]

        def inside(s: int, chain: list[Excursion] = chain, last: Excursion = last) -> bool:
            return s >= chain[0].onset and (last.end is None or s <= last.end)

        nf_inside = [s for s in nf_steps if inside(s)]
        nf_at = nf_inside[0] if nf_inside else None
        div_at = next((s for s in div_steps if inside(s)), None)
        kind = "spike" if last.recovered else _unrecovered_kind(trace, chain, nf_at, div_at,
                                                                cfg)
        if kind == "spike" and div_at is not None and div_at in rolled_back:
            kind = "divergence"  # it came back because the guard rolled it back
        if kind == "divergence":  # one regime, however many sub-peaks
            consumed_nf.update(nf_inside)  # the blow-up reached NaN: part of the regime
            incidents.append(_incident(chain, kind, nf_at))
            continue
        # Rises while the loss rings after a spike belong to that spike (one incident,
        # their alarms in evidence["follow_on_alarms"]); an outlier batch arriving
        # meanwhile is an incident of its own, and the rises after it are its echo.
        groups: list[list[Excursion]] = []
        for e in chain:
            bad_batch = classify(trace, _incident([e], "spike"))[0] == "gradient-outlier"
            if groups and not bad_batch:
                groups[-1].append(e)
            else:
                groups.append([e])
        incidents.extend(_incident(g, "spike") for g in groups)
    spans = [(i.onset, None if i.kind in ("divergence", "non-finite") else i.peak_step + 20)
             for i in incidents]

    def framed(d: Any) -> bool:
        return any(a - 2 <= d.onset and (b is None or d.onset <= b + 2) for a, b in spans)

    alarm_steps = {e.detected for e in excs}
    # the jump rule's early alarm (a spike at the first step of a blow-up) and the
    # divergence it raises when the loss stays high are one incident, alarmed at the first
    jump_div = {d.onset: d for d in raised if d.kind == "divergence" and d.rule == "jump"}
    for d in raised:
        if d.kind == "spike" and d.rule == "jump" and d.onset in jump_div \
                and jump_div[d.onset].step > d.step and not framed(d):
            v = jump_div[d.onset]
            incidents.append(Incident(onset=d.onset, detected=d.step, kind="divergence",
                                      peak=max(v.value, d.value), peak_step=v.step,
                                      baseline=v.baseline, recovered=False, jump=True))
            spans.append((d.onset, None))
            continue  # the loss grew far / jumped and stayed, but no spike alarm framed it
        level_shift = d.kind == "divergence" and d.rule == "stays-high" and not any(
            e.rule in ("jump", "stays-high") and e.onset == d.onset and e.step < d.step
            for e in raised)  # the rule's own finding, not its watch after a jump
        if level_shift or (d.kind == "divergence" and d.rule and d.step in rolled_back):
            # a spike the spike detector saw recover (its peak far above where the loss
            # settled) whose loss stays high over its level before: not coming back
            k = next((n for n, inc in enumerate(incidents) if inc.kind == "spike"
                      and inc.onset - 2 <= d.onset <= inc.peak_step + 22), None)
            if k is not None:
                inc = incidents[k]
                incidents[k] = replace(inc, kind="divergence", recovered=False)
                spans[k] = (inc.onset, None)
                continue
        if d.kind == "divergence" and d.rule and any(
                r.kind == "gradient-outlier" and d.onset < r.step <= d.onset + 10
                and any(i.detected == r.step for i in incidents) for r in raised):
            # the level rules' onset walked back into the batch noise before an outlier
            # batch that jumped the loss (found at that batch): the batch's finding
            continue
        if d.kind == "divergence" and not any(
                e.onset <= d.step and (e.end is None or d.step <= e.end) for e in excs) \
                and not framed(d):
            incidents.append(Incident(onset=d.onset, detected=d.step, kind="divergence",
                                      peak=d.value, peak_step=d.step, baseline=d.baseline,
                                      recovered=False, jump=True))
            spans.append((d.onset, None))
        elif d.kind == "spike" and d.step not in alarm_steps and not framed(d):
            # the stack's jump rule: a blow-up in the first records, or an outlier batch
            # that jumped the loss (no spike-detector alarm frames it)
            incidents.append(Incident(onset=d.onset, detected=d.step, kind="spike",
                                      peak=d.value, peak_step=d.step, baseline=d.baseline,
                                      recovered=True, jump=True))
            spans.append((d.onset, d.step + 20))
    for s in nf_steps:
        if s not in consumed_nf:
            incidents.append(Incident(onset=s, detected=s, kind="non-finite", peak=math.nan,
                                      peak_step=s, baseline=math.nan, recovered=False))
    from stablestep.diagnosis.infer import fold  # an lr-too-high regime is one finding

    incidents.sort(key=lambda i: i.onset)
    explained = fold(trace, [(inc, *classify(trace, inc)) for inc in incidents])
    explained = [x for x in explained if not _one_bad_batch(trace, x[0], x[1])]
    findings: list[Finding] = []
    recurring = [x for x in explained if x[0].kind == "spike"
                 and x[1] not in ("gradient-outlier", "non-finite")]
    # recurring: min_spikes episodes at regular intervals, or ten spike alarms at all
    onsets = [x[0].onset for x in recurring]
    alarms = _alarm_steps([x[0] for x in recurring])
    grouped = (len(onsets) >= cfg.periodic.min_spikes
               and _cv(onsets) <= cfg.periodic.max_cv) or len(alarms) >= 10
    if grouped:
        findings.append(_periodic(trace, recurring))
    for inc, mech, conf, ev in explained:
        if grouped and any(inc is r[0] for r in recurring):
            continue
        if inc.nonfinite_at is not None:
            ev["non_finite_at"] = inc.nonfinite_at
        kind = inc.kind
        findings.append(Finding(step=inc.onset, kind=kind, mechanism=mech, confidence=conf,
                                evidence=ev, remedies=remedies(trace, mech, inc, ev)))
    from stablestep.diagnosis.transformer import warnings  # model probes, no loss incident

    findings.extend(warnings(trace, {f.mechanism for f in findings}))
    _attach_guard_actions(trace, findings)
    _attach_nan_origin(trace, findings)
    for f in findings:
        if trace.name:
            f.evidence["run"] = trace.name
        if len(trace) < 2 * cfg.spike.warmup:  # say how little there was to go on
            f.evidence["short_excerpt_records"] = len(trace)
    findings.sort(key=lambda f: f.step)
    return findings


BATCH_SPIKE_RECORDS = 3
"""A minibatch loss spike over within this many records is one hard batch (see
:func:`_one_bad_batch`)."""
HARD_BATCH_MAX = 10.0
"""...unless it peaks this far above its baseline: a batch whose loss is 10x and more is a
corrupted batch, an incident (a Keras run records no gradient norm on most steps, so its
outlier batch has only its loss to show)."""


def _one_bad_batch(trace: Trace, inc: Incident, mechanism: str) -> bool:
    """Whether a spike is the loss of a hard batch, not an incident of the training: in a run
    whose config says it trained on minibatches, a spike that no mechanism explains (no
    gradient outlier, no lr change, no curvature), under ``HARD_BATCH_MAX`` x its baseline,
    each of whose excursions (the spike and the rises while the loss rang after it) was
    over within ``BATCH_SPIKE_RECORDS`` records of its onset. Minibatch losses near 0
    jump 2-5x from one batch to the next; the training did not move. Not dropped where
    the run's batching is unknown (a foreign log)."""
    from stablestep.diagnosis.infer import full_batch

    return (full_batch(trace) is False and inc.kind == "spike" and mechanism == "unknown"
            and inc.recovered and inc.longest is not None
            and inc.longest <= BATCH_SPIKE_RECORDS
            and 0 < inc.baseline and inc.peak < HARD_BATCH_MAX * inc.baseline)


def _attach_guard_actions(trace: Trace, findings: list[Finding]) -> None:
    """Put the guard's actions (events of kind ``guard`` in the store) into the evidence of
    the finding they belong to (``evidence["guard_actions"]``): the last finding at or
    before the action's step, else the first one. A run with guard actions and no finding
    keeps them in :attr:`Trace.events` only."""
    for owner, data in _owned_events(trace, findings, "guard"):
        owner.evidence.setdefault("guard_actions", []).append(data)


def _owned_events(trace: Trace, findings: list[Finding],
                  kind: str) -> list[tuple[Finding, dict]]:
    """The events of ``kind`` with the finding each belongs to (the last finding at or
    before the event's step, else the first one) and its data (``step`` included)."""
    evs = [e for e in trace.events if e.get("kind") == kind]
    if not evs or not findings:
        return []
    order = sorted(findings, key=lambda f: f.step)
    out = []
    for e in evs:
        st = int(e["step"])
        owner = next((f for f in reversed(order) if f.step <= st), order[0])
        data = dict(e.get("data") or {})
        data.setdefault("step", st)
        out.append((owner, data))
    return out


def _attach_nan_origin(trace: Trace, findings: list[Finding]) -> None:
    """Put where a NaN was born (events of kind ``nan-origin``, recorded by the Monitor or
    the Guard: :mod:`stablestep.telemetry.nan_origin`) into the evidence of the finding it
    belongs to (``evidence["nan_origin"]``, the first such event per finding): the last
    finding at or before the event's step, else the first one."""
    for owner, data in _owned_events(trace, findings, names.EVENT_NAN_ORIGIN):
        if "nan_origin" in owner.evidence:
            continue
        owner.evidence["nan_origin"] = data
        where = data.get("forward_module")
        where = where if where is not None else data.get("backward_module")
        if data.get("origin") == "found" and where is not None:  # already found: no replay
            owner.remedies = [r for r in owner.remedies if r.action != "find-origin"] + [
                Remedy("inspect-module", where or "<model>",
                       f"the step was replayed with finiteness hooks: {data.get('text')}; "
                       "expected: bounding what that module computes (e.g. qk-layernorm or a "
                       "logit cap for attention, a clamp before a log or exp) removes the NaN")]


def _cv(steps: list[int]) -> float:
    gaps = np.diff(steps).astype(float)
    if gaps.size < 2 or gaps.mean() <= 0:
        return math.inf
    return float(np.std(gaps, ddof=1) / np.mean(gaps))


def _alarm_steps(incidents: list[Incident]) -> list[int]:
    """Every spike alarm of these incidents: first alarms and those while the loss rang."""
    return sorted({s for i in incidents for s in (i.detected, *i.follow_on)})


def _periodic(trace: Trace, spikes: list[tuple[Incident, str, float, dict[str, Any]]]) -> Finding:
    steps = _alarm_steps([inc for inc, *_ in spikes])
    onsets = [inc.onset for inc, *_ in spikes]
    gaps = np.diff(onsets if len(onsets) >= 2 else steps).astype(float)
    period = float(np.median(gaps)) if gaps.size else math.nan
    cv = _cv(onsets)
    mechs = [m for _, m, _, _ in spikes]
    named = [m for m in mechs if m != "unknown"]  # "unknown" is missing evidence, not a vote
    mech = statistics.mode(named or mechs)
    ev_counts = {m: mechs.count(m) for m in sorted(set(mechs))}
    share = mechs.count(mech) / len(mechs)
    first = next(x for x in spikes if x[1] == mech)
    inc, _, conf, ev = first
    ev = dict(ev)
    ev.update({"n_spikes": len(steps), "spike_steps": steps, "n_episodes": len(spikes),
               "episode_onsets": [i.onset for i, *_ in spikes],
               "detected_steps": [i.detected for i, *_ in spikes], "period": period,
               "interval_cv": cv, "mechanism_share": share, "mechanism_counts": ev_counts,
               "peak_over_baseline_median": float(np.median(
                   [i.peak / i.baseline for i, *_ in spikes if i.baseline > 0]))})
    rem = remedies(trace, mech, inc, ev)
    if mech == "unknown" and not trace.hyper.get("amsgrad") and trace.hyper.get("kind") != "sgd":
        ev["suspected"] = "adaptive-edge-of-stability"
        rem.append(Remedy(
            "amsgrad", True,
            "recurring spikes that recover by themselves are the signature of Adam's adaptive "
            "edge of stability (v decays as the loss flattens); amsgrad keeps v from "
            "decaying: if the spikes vanish with it, that was the mechanism"))
    return Finding(step=spikes[0][0].onset, kind="periodic-spikes", mechanism=mech,
                   confidence=min(conf, 0.3 + 0.7 * share) if mech != "unknown" else conf,
                   evidence=ev, remedies=rem)


def incidents(source: Any, *, run: str | None = None,
              config: DiagnoseConfig | None = None) -> list[StackIncident]:
    """The detector stack's incidents ``(step, kind, onset, ...)`` that :func:`diagnose`
    explains, replayed from ``source`` exactly as :func:`diagnose` replays it; for a run the
    Guard watched, the same incidents the Guard saw live (``guard.incidents``)."""
    cfg = config or DiagnoseConfig()
    out: list[StackIncident] = []
    for trace in load(source, run=run):
        out.extend(_replay(trace, cfg)[2])
    return out


def diagnose(source: Any, *, run: str | None = None,
             config: DiagnoseConfig | None = None) -> list[Finding]:
    """Find every spike, divergence, non-finite value and periodic spiking in ``source``
    and explain each with a mechanism, its evidence and computed remedies.

    ``source``: a path (run store, CSV, TensorBoard dir, Keras history JSON, JSON of
    arrays, llm.c-style text log), a ``Run`` from :func:`stablestep.open_run`, or a
    :class:`~stablestep.diagnosis.trace.Trace`. ``run`` picks one run of a multi-run
    source; otherwise every run is diagnosed and findings carry ``evidence["run"]``.

    Example::

        for f in stablestep.diagnose("runs/demo.db"):
            print(f.step, f.kind, f.mechanism, [r.to_dict() for r in f.remedies])
    """
    findings: list[Finding] = []
    for trace in load(source, run=run):
        findings.extend(diagnose_trace(trace, config=config))
    return findings
