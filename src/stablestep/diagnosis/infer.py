r"""Loss-, lr- and secant-aware inference from what the default Monitor records.

No Hessian-vector product is needed for any of these; each reads the trace around an onset.

- :func:`lr_jump`: the lr (``lr`` metric) rose by ``min_factor`` or more within ``lead``
  records before the onset, against its median over the records before that: the jump is
  named as the cause.
- :func:`growth`: the per-step loss ratio :math:`r` of the rise after the onset. On a
  quadratic, gradient descent multiplies the error along the top eigenvector by
  :math:`|1 - \mathrm{lr}\,\lambda|` per step, so the loss by :math:`r = (1-\mathrm{lr}\lambda)^2`
  and :math:`\mathrm{lr}\,\lambda \approx 1 + \sqrt r`: the growth gives the curvature.
- :func:`secant`: the free curvature :math:`q_t` (``secant_curvature``,
  :mod:`stablestep.telemetry.secant`) near the onset against the optimizer's bound
  (:func:`stablestep.formulas.threshold`), *trusted* only where it stands out of the spread
  it had on the healthy records before (minibatch gradient noise enters
  :math:`g_{t+1} - g_t`): the largest :math:`q` over ``[onset - lead, detected + 2]`` must
  exceed ``median + noise_k`` robust sigmas of the 50 records before, and a pair whose
  gradient norm jumps 6 robust sigmas from normal in one step (an outlier batch: its
  :math:`\Delta g` is the batch difference, not :math:`Hu`) is left out.
- :func:`lr_restart` and :func:`progress_lost`: a divergence raised while the user's
  schedule has brought the lr back up to where the run trained (a warm restart, a cyclic
  lr) that has given back under :data:`RESTART_TOLERANCE` of the run's progress is the
  schedule, not an incident (:func:`held_by_schedule`); the Guard holds on the same test.
- What the stack's warm-up once hid (a blow-up from step 0-1, a jump that then *stays*
  high against the best loss so far, an outlier batch that jumped the loss) is now the
  detector stack's jump rule (:class:`stablestep.diagnosis.stack.JumpConfig`), so the Guard
  acts on it live; this module only explains it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stablestep import formulas as F
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names

SECANT_TRUST = 0.5  # q above half the bound, out of the noise (tuning runs: 0.75 missed a 28/38)
NOISE_K = 8.0  # robust sigmas of q on healthy records (benchmarks/secant.py measures them)


RESTART_WINDOW = 256  # records back in which the lr's low before a restart is looked for
RESTART_TOLERANCE = 0.5  # share of the run's progress a rise after a restart may give back


def lr_restart(steps: Sequence[int], lrs: Sequence[float],
               highest_before: Callable[[int], float | None]) -> dict[str, Any] | None:
    """``{"step", "from", "to", "factor"}`` when the lr now (``lrs[-1]``; ``steps``/``lrs``:
    the last :data:`RESTART_WINDOW` records up to now, oldest first) is at least 2x its
    lowest in that window and at most 1.05x ``highest_before(step of that low)`` (the
    highest lr of the records before it, ``None`` if none): the schedule brought the lr
    back up to where the run trained already (a warm restart, a cyclic lr; not a new,
    higher lr). ``step`` is the first record at 2x the low. Else None."""
    if len(lrs) < 2 or not (math.isfinite(lrs[-1]) and lrs[-1] > 0):
        return None
    now = float(lrs[-1])
    ok = [k for k, v in enumerate(lrs) if math.isfinite(v) and v > 0]
    k = min(ok, key=lambda i: lrs[i])
    low = float(lrs[k])
    if now < 2.0 * low:
        return None
    top = highest_before(int(steps[k]))
    if top is None or not math.isfinite(top) or now > 1.05 * top:
        return None
    up = next(int(steps[i]) for i in ok if i >= k and lrs[i] >= 2.0 * low)
    return {"step": up, "from": low, "to": now, "factor": now / low}


def progress_lost(first: Sequence[float], recent: Sequence[float], level: float) -> float:
    r"""The share of the run's progress a rise has given back,
    :math:`(\tilde L_{now} - L_{level}) / (\tilde L_{start} - L_{level})`, with
    :math:`\tilde L_{start}` the median of ``first`` (the run's first 5 finite losses) and
    :math:`\tilde L_{now}` that of ``recent`` (its last 10); ``inf`` when the run made no
    progress or a value is missing."""
    if not (first and recent and math.isfinite(level)):
        return math.inf
    start, now = statistics.median(first), statistics.median(recent)
    return (now - level) / (start - level) if start > level else math.inf


def held_by_schedule(trace: Trace, step: int, level: float,
                     tolerance: float = RESTART_TOLERANCE) -> dict[str, Any] | None:
    """For a divergence the stack raised at ``step`` over ``level``: the lr restart and the
    progress lost (``{"lr_jump", "progress_lost"}``) when :func:`lr_restart` holds there
    and the rise gave back under ``tolerance`` of the progress (the Guard's ``hold`` on
    the same numbers), else None."""
    lr = trace.metric(names.LR)
    if lr is None:
        return None
    j = _index(trace, step)
    if j >= len(trace):
        return None
    lo = max(0, j - RESTART_WINDOW + 1)
    steps = trace.steps

    def highest_before(st: int) -> float | None:
        prev = lr[: _index(trace, st)]
        prev = prev[np.isfinite(prev)]
        return float(prev.max()) if prev.size else None

    lrj = lr_restart(steps[lo: j + 1].tolist(), lr[lo: j + 1].tolist(), highest_before)
    if lrj is None:
        return None
    loss = trace.loss
    fin = np.flatnonzero(np.isfinite(loss[: j + 1]))
    lost = progress_lost(loss[fin[:5]].tolist(), loss[fin[-10:]].tolist(), level)
    return {"lr_jump": lrj, "progress_lost": lost} if lost < tolerance else None


def _index(trace: Trace, step: int) -> int:
    return int(np.searchsorted(trace.steps, step, side="left"))


def bound(trace: Trace) -> float | None:
    """The optimizer's stability bound from ``trace.hyper`` (``formulas.threshold``)."""
    h = trace.hyper
    kind = h.get("kind")
    if kind == "adam":
        return F.adam_threshold(float(h.get("beta1", 0.9) or 0.9))
    if kind == "sgd":
        return F.sgd_threshold(float(h.get("momentum", 0.0) or 0.0),
                               float(h.get("dampening", 0.0) or 0.0), bool(h.get("nesterov")))
    return None


def lr_jump(trace: Trace, onset: int, *, lead: int = 5, min_factor: float = 2.0,
            detected: int | None = None) -> dict[str, Any] | None:
    """``{"step", "from", "to", "factor"}`` when the lr rose ``min_factor`` x or more within
    ``lead`` records before ``onset`` and up to ``detected`` (the alarm; default the onset),
    against the median of the 20 records before, else None."""
    lr = trace.metric(names.LR)
    if lr is None:
        return None
    i = _index(trace, onset)
    j = _index(trace, max(onset, detected if detected is not None else onset))
    for k in range(max(1, i - lead), min(j + 1, len(trace))):
        prev = lr[max(0, k - 20): k]
        prev = prev[np.isfinite(prev) & (prev > 0)]
        if prev.size and math.isfinite(lr[k]) and lr[k] >= min_factor * float(np.median(prev)):
            return {"step": int(trace.steps[k]), "from": float(np.median(prev)),
                    "to": float(lr[k]), "factor": float(lr[k] / np.median(prev))}
    return None


def growth(trace: Trace, onset: int, *, span: int = 5) -> float | None:
    """Geometric-mean per-step loss ratio over the rising records from the record before
    ``onset`` (at most ``span`` steps; stops at the first fall or non-finite loss)."""
    i = _index(trace, onset)
    lo = max(0, i - 1)
    seq = trace.loss[lo: lo + span + 1]
    k = 0
    while k + 1 < seq.size and math.isfinite(seq[k + 1]) and seq[k] > 0 and seq[k + 1] > seq[k]:
        k += 1
    if k == 0:
        return None
    return float((seq[k] / seq[0]) ** (1.0 / k))


def gd_curvature_from_growth(r: float) -> float:
    r""":math:`\mathrm{lr}\,\lambda \approx 1 + \sqrt r` for a per-step loss ratio ``r > 1``
    (module docstring): the top direction grows by :math:`|1 - \mathrm{lr}\lambda| = \sqrt r`."""
    return 1.0 + math.sqrt(r)


def secant(trace: Trace, onset: int, detected: int, *, lead: int = 5,
           window: int = 50) -> dict[str, Any] | None:
    """The free curvature near the onset and whether it can be trusted (module docstring):
    ``{"q", "step", "bound", "ratio", "noise", "trusted"}``; None when not recorded."""
    q = trace.metric(names.SECANT)
    thr = bound(trace)
    if q is None or thr is None:
        return None
    i0, i1 = _index(trace, onset - lead), _index(trace, detected + 2) + 1
    seg = q[i0:i1].copy()
    gn = trace.metric(names.GRAD_NORM)
    if gn is not None:  # an outlier batch in the pair (g_t, g_{t+1}) is not curvature
        lg = np.log(np.where(np.isfinite(gn) & (gn > 0), gn, np.nan))
        ref = lg[max(0, i0 - window): i0]
        ref = ref[np.isfinite(ref)]
        if ref.size >= 5:
            m = float(np.median(ref))
            sd = max(float(np.median(np.abs(ref - m))) * 1.4826, 0.05)
            z = (lg - m) / sd
            for j in range(seg.size):
                k = i0 + j
                for a in (k - 1, k):  # the two gradients of the secant recorded at k
                    if a >= 1 and z[a] >= 6 and not (z[a - 1] >= 3):
                        seg[j] = np.nan
    ok = np.isfinite(seg)
    if not ok.any():
        return None
    j = int(np.nanargmax(np.where(ok, seg, -np.inf)))
    qmax = float(seg[j])
    hist = q[max(0, i0 - window): i0]
    hist = hist[np.isfinite(hist)]
    if hist.size >= 5:
        med = float(np.median(hist))
        noise = float(np.median(np.abs(hist - med))) * 1.4826
        level = med + NOISE_K * noise
    else:  # nothing healthy to compare with (blow-up at step 0): the bound alone
        med, noise, level = 0.0, math.nan, 0.0
    trusted = qmax >= SECANT_TRUST * thr and qmax >= level
    return {"q": qmax, "step": int(trace.steps[i0 + j]), "bound": thr, "ratio": qmax / thr,
            "noise": noise, "trusted": bool(trusted)}


def full_batch(trace: Trace) -> bool | None:
    """Whether the run trained on the full batch, when the run's config says so."""
    fb = trace.hyper.get("full_batch")
    return None if fb is None else bool(fb)


def half_precision(trace: Trace) -> bool | None:
    """Whether the run computes in fp16/bf16: a GradScaler's ``loss_scale`` was recorded (AMP
    keeps fp32 parameters), or a parameter dtype is fp16/bf16 (None: nothing recorded)."""
    if trace.has(names.LOSS_SCALE) or trace.has(names.SKIPPED_STEPS):
        return True
    if trace.hyper.get("precision") in ("fp16", "bf16", "16-mixed", "bf16-mixed"):
        return True
    dts = trace.hyper.get("dtypes")
    if not dts:
        return None
    return any(str(d) in ("float16", "bfloat16", "half") for d in dts)


def _state_only(trace: Trace, step: int, acted: set[int]) -> bool:
    """Whether the non-finite mark at ``step`` is in the parameters or optimizer state
    only (the Monitor's norms, recorded every ``state_every`` steps) with a finite loss and
    no guard action there: what a blow-up leaves behind, recorded again at each detailed
    step, not an event of its own."""
    i = _index(trace, step)
    return (step not in acted and 0 <= i < len(trace) and trace.steps[i] == step
            and bool(np.isfinite(trace.loss[i])))


def fold(trace: Trace, explained: list[tuple]) -> list[tuple]:
    """Fold incidents that continue an lr-too-high regime into it: a later incident while
    the lr has not come down (>= 0.9 x the lr at the first onset) and the loss stayed
    (median) at 1.2 x the first incident's baseline or more. A non-finite incident folds
    only where the loss stayed finite and the guard did not act (non-finite parameters or
    state after the blow-up); a NaN/Inf loss is always its own finding. ``explained``:
    sorted ``(incident, mechanism, confidence, evidence)``; the folded ones' steps go to
    the first's ``evidence["follow_on_alarms"]``. In full-batch training a later spike also
    named lr-too-high folds even where the loss came back between (gradient descent above
    its stable lr catapults again at the same lr: no new cause). An incident with an lr jump
    at its onset (``evidence["lr_jump"]``) where the first had none is a new regime with its
    own cause, not folded."""
    from dataclasses import replace

    lr = trace.metric(names.LR)
    acted = {int(e["step"]) for e in trace.events if e.get("kind") == "guard"}
    out: list[tuple] = []
    for item in explained:
        inc = item[0]
        state_only = inc.kind == "non-finite" and _state_only(trace, inc.onset, acted)
        if inc.kind == "non-finite" and not state_only:
            out.append(item)  # a NaN/Inf loss or one the guard acted on is its own event
            continue
        # the regime this continues: the last finding, or for non-finite state the last
        # lr-too-high one (a NaN-loss finding between does not end the blow-up)
        j = len(out) - 1
        while state_only and j >= 0 and out[j][0].kind == "non-finite":
            j -= 1
        # an lr jump at this incident's onset is a cause of its own: a new regime
        new_cause = len(item) > 3 and isinstance(item[3], dict) and "lr_jump" in item[3] \
            and "lr_jump" not in out[j][3] if j >= 0 else False
        if j >= 0 and out[j][1] == "lr-too-high" and (state_only or j == len(out) - 1) \
                and not new_cause:
            head = out[j][0]
            i0, i1 = _index(trace, head.onset), _index(trace, inc.onset)
            lr_ok = lr is None or not (np.nanmin(lr[i0:i1 + 1]) < 0.9 * lr[i0])
            seg = trace.loss[i0 + 1:i1]
            base = head.baseline if head.baseline > 0 else math.inf
            seg = seg[np.isfinite(seg)]
            stayed = seg.size == 0 or float(np.median(seg)) >= 1.2 * base
            # full-batch training at an unchanged lr above its stable one: the loss may come
            # back between blow-ups, the cause (and the finding) is the same
            again = (full_batch(trace) is True and item[1] == "lr-too-high"
                     and inc.kind == "spike")
            if lr_ok and (stayed or again):
                ev = out[j][3]
                ev.setdefault("follow_on_alarms", []).append(int(inc.detected))
                if inc.kind == "non-finite":  # state only (see above): the loss is finite
                    ev.setdefault("non_finite_at", int(inc.onset))
                    continue
                if not math.isfinite(inc.peak) or inc.peak > head.peak:
                    head = replace(head, peak=inc.peak, peak_step=inc.peak_step,
                                   recovered=False, kind="divergence")
                    ev["peak_loss"], ev["peak_step"] = inc.peak, inc.peak_step
                    ev["recovered"] = False
                    if inc.kind == "non-finite" or inc.nonfinite_at is not None:
                        ev["non_finite_at"] = inc.nonfinite_at or inc.onset
                out[j] = (head, *out[j][1:])
                continue
        out.append(item)
    return out
