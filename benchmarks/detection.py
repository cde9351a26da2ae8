"""Detection benchmark: stablestep's diagnosis against three loss-spike rules in use.

Labelled runs are generated here (``benchmarks/labeled.py``: small models on CPU,
recorded by the real ``stablestep.Monitor`` into a run store and read back as ``diagnose``
reads a user's; two models x three seeds per cause): Adam's adaptive edge of stability,
lr above the GD bound, injected outlier batches, injected overflow, stable runs. The runs
come from one of two files with disjoint seeds, model sizes and data sizes:
``detection_heldout.py`` (default; nothing was tuned on it: these are the figures to
report) and ``detection_tuning.py`` (``--set tuning``: what the thresholds were tuned on).

Labels (the same for every detector; ``benchmarks/labeled.py``): adaptive
edge of stability and stable runs: every episode of ``label_spikes`` (a rise to 1.1x
the lowest loss of the 50 steps before; it lasts until the loss stays under 1.1x its
pre-spike level for 25 steps, or until a new climb of 8+ rising steps by 10%: ringing
rises last 1-4 steps, and without that split a run that rang between spikes had 20-200x
spikes merged into one episode) except those with onset before step 20 that stay
under 1.5x, the
early overshoot of Adam's (and heavy ball's) first steps (10-25% above the first
minimum; it used to be labelled in AEoS runs but not in lr-too-high runs, where heavy
ball's overshoot then counted as a false alarm); lr-too-high: the first rise after the
lr switch, then every later ``label_spikes`` episode (only the first rise used to count,
so a later 24x spike of a run that survived its first blow-up was scored a false alarm
for whoever found it); outlier batches and overflows: the injected steps.

Event-level scoring: a labelled incident is found if a detection falls in
``[onset - 2, onset + 20]`` (labels in time order, each taking the earliest unused
detection in its window: a maximum matching for equal-length windows); each detection
counts once; detections matching no
incident are false alarms. Delay = detection step - labelled onset (median over found
incidents). Mechanism accuracy (ours only: the baselines name no mechanism) = share of
found incidents whose finding names the labelled mechanism.

Baselines, re-implemented from their published rules (loss only):
- Lightning ``SpikeDetection(window=10, warmup=1, rtol=2.0, mode="min")``: after warmup,
  a non-finite loss, or a loss above the last accepted one that is off the running mean
  of the last 10 accepted losses by ``rtol`` times that mean; spikes stay out of the mean.
- OLMo-core ``SkipStepOptimizer``: skip if the loss or the gradient norm exceeds the
  mean of the last 128 by 6 standard deviations (once 64 are known), or is non-finite.
- Megatron's rerun state machine: NaN/Inf (``check_for_nan_in_loss``), or the loss at
  or above 10x the largest of its first 100 values (``is_unexpectedly_large``).

Run: ``.venv/bin/python benchmarks/detection.py`` (a few minutes on one CPU core);
``--set tuning`` for the tuning runs. The last line prints our F1 and the best baseline's.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.* importable

from benchmarks import detection_heldout, detection_tuning  # noqa: E402
from benchmarks.labeled import MECHANISM_RUNS, make_run  # noqa: E402

from stablestep.diagnosis import diagnose_trace  # noqa: E402
from stablestep.telemetry import names as names_  # noqa: E402

MATCH_BEFORE, MATCH_AFTER = 2, 20


def lightning(steps, losses, *, window=10, warmup=1, rtol=2.0):
    """Lightning's SpikeDetection, mode='min', atol=None, finite_only=True: after warmup a
    spike is a non-finite loss, or a loss above the last accepted one that differs from
    the running mean of the last 10 accepted losses by rtol times that mean. Lightning
    raises there; here the run goes on with the batch excluded from the statistics."""
    buf: deque[float] = deque(maxlen=window)
    out, last = [], None
    for i, (s, v) in enumerate(zip(steps, losses, strict=True)):
        spike = False
        if i >= warmup and buf:
            mean = sum(buf) / len(buf)
            if not math.isfinite(v):
                spike = True
            elif not (last is not None and v - last <= 0):
                spike = abs(v - mean) >= abs(rtol * mean)
        if spike:
            out.append(s)
        elif math.isfinite(v):
            buf.append(v)
            last = v
    return out


def olmo(steps, losses, grad_norms, *, interval=128, sigma=6.0):
    """OLMo-core SkipStepOptimizer.get_step_factor: once 64 values are known, skip when the
    loss or the gradient norm exceeds the mean of the previous 128 by 6 (unbiased) standard
    deviations; a NaN compares false, so it is skipped too. Non-finite values are kept out
    of the window here (in OLMo-core they would enter it and poison the statistics)."""
    lbuf: deque[float] = deque(maxlen=interval)
    gbuf: deque[float] = deque(maxlen=interval)
    out = []
    for s, v, g in zip(steps, losses, grad_norms, strict=True):
        if not (math.isfinite(v) and math.isfinite(g)):
            out.append(s)
            continue
        if len(lbuf) + 1 >= interval // 2:
            la, ga = np.asarray(lbuf), np.asarray(gbuf)
            if (v - la.mean() > sigma * la.std(ddof=1)
                    or g - ga.mean() > sigma * ga.std(ddof=1)):
                out.append(s)
        lbuf.append(v)
        gbuf.append(g)
    return out


def megatron(steps, losses, *, factor=10.0, num_samples=100):
    """Megatron's rerun state machine: ``check_for_nan_in_loss`` flags NaN/Inf;
    ``is_unexpectedly_large(threshold=10)`` takes the max |loss| of the first 100 values
    and then flags a loss >= 10x that max."""
    out, top, count = [], 0.0, 0
    for s, v in zip(steps, losses, strict=True):
        if not math.isfinite(v):
            out.append(s)
            continue
        if count < num_samples:
            count += 1
            top = max(top, abs(v))
        elif abs(v) >= factor * top:
            out.append(s)
    return out


def ours(trace):
    """Detections (step the detector fired, onset, mechanism) from the diagnosis."""
    out = []
    for f in diagnose_trace(trace):
        ev = f.evidence
        if f.kind == "periodic-spikes":
            for s in ev["detected_steps"]:
                out.append((s, f.mechanism))
        else:
            out.append((int(ev.get("detected_at", f.step)), f.mechanism))
    return sorted(out)


def score(events, detections):
    """Match detections to labelled events; returns (tp, fp, fn, delays, mech_ok)."""
    used, delays, mech_ok, tp = set(), [], 0, 0
    for onset, mech in events:
        best = next((j for j, (s, _m) in enumerate(detections)
                     if j not in used and onset - MATCH_BEFORE <= s <= onset + MATCH_AFTER), None)
        if best is not None:
            used.add(best)
            tp += 1
            delays.append(detections[best][0] - onset)
            mech_ok += detections[best][1] == mech
    fp = len(detections) - len(used)
    return tp, fp, len(events) - tp, delays, mech_ok


def main(argv: list[str] | None = None) -> int:
    """Generate the labelled runs, run every detector, print the scores (ratio line last)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("heldout", "tuning"), default="heldout",
                        help="which labelled runs (default: the held-out ones)")
    args = parser.parse_args(argv)
    runs = (detection_heldout if args.set == "heldout" else detection_tuning).RUNS
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    names = ("stablestep", "lightning", "olmo-core", "megatron")
    tot = {n: {"tp": 0, "fp": 0, "fn": 0, "delays": [], "mech": 0, "fa_stable": 0}
           for n in names}
    per_cause = {c: {"events": 0, "found": 0, "mech": 0} for c in MECHANISM_RUNS}
    for spec in runs:
        cause = spec["cause"]
        run = make_run(**spec)
        tr = run.trace
        steps, losses = tr.steps.tolist(), tr.loss.tolist()
        dets = {
            "stablestep": ours(tr),
            "lightning": [(s, None) for s in lightning(steps, losses)],
            "olmo-core": [(s, None) for s in olmo(
                steps, losses, tr.metric(names_.GRAD_NORM).tolist())],
            "megatron": [(s, None) for s in megatron(steps, losses)],
        }
        for n in names:
            tp, fp, fn, delays, mech = score(run.events, dets[n])
            t = tot[n]
            t["tp"] += tp
            t["fp"] += fp
            t["fn"] += fn
            t["delays"] += delays
            t["mech"] += mech
            if cause == "stable":
                t["fa_stable"] += len(dets[n])
            if n == "stablestep":
                pc = per_cause[cause]
                pc["events"] += len(run.events)
                pc["found"] += tp
                pc["mech"] += mech
        print(f"{run.name:40s} events={len(run.events):3d} "
              + " ".join(f"{n}={len(dets[n])}" for n in names), flush=True)
    print()
    print(f"{'detector':12s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'delay':>6s} "
          f"{'mech.acc':>8s} {'FA(stable)':>10s}")
    f1s = {}
    for n in names:
        t = tot[n]
        prec = t["tp"] / max(1, t["tp"] + t["fp"])
        rec = t["tp"] / max(1, t["tp"] + t["fn"])
        f1 = 2 * prec * rec / max(1e-12, prec + rec)
        f1s[n] = f1
        delay = statistics.median(t["delays"]) if t["delays"] else math.nan
        mech = f"{t['mech'] / max(1, t['tp']):.3f}" if n == "stablestep" else "-"
        print(f"{n:12s} {prec:6.3f} {rec:6.3f} {f1:6.3f} {delay:6.1f} {mech:>8s} "
              f"{t['fa_stable']:10d}")
    print()
    for c, pc in per_cause.items():
        if pc["events"]:
            print(f"  {c:28s} recall {pc['found'] / pc['events']:.3f}  mechanism "
                  f"{pc['mech'] / max(1, pc['found']):.3f}  ({pc['events']} events)")
    print(f"{len(runs)} {args.set} runs, elapsed {time.perf_counter() - t0:.0f}s")
    best = max((n for n in names if n != "stablestep"), key=lambda n: f1s[n])
    ratio = f1s["stablestep"] / max(f1s[best], 1e-12)
    print(f"stablestep F1 {f1s['stablestep']:.3f} | best baseline ({best}) F1 {f1s[best]:.3f}"
          f" | ratio {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
