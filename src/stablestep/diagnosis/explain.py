r"""Name the mechanism of an incident from the numbers around its onset, and compute remedies.

Decision, in order (DESIGN.md's vocabulary):

1. ``non-finite``: a NaN/Inf appeared while the loss was not already blowing up
   (an overflow, not an optimizer instability; Adam is not blamed).
2. ``gradient-outlier``: at the onset the gradient norm is ``z >= 6`` robust standard
   deviations above its running statistics (median and MAD of :math:`\log\|g\|` over
   the previous ``window`` records), it was normal (``z < 3``) just before, and the
   measured curvature (when recorded) is under its bound.
3. ``lr-too-high``: :math:`\mathrm{lr}\,\lambda_{\max}(H)` above the GD bound
   (:func:`stablestep.formulas.sgd_threshold`: 2, :math:`(2+2\mu)/(1-d)` with heavy-ball
   momentum, :math:`(2+2\mu)/(1+(2-d)\mu)` with Nesterov) for a non-Adam optimizer; or, for
   Adam, :math:`\lambda_{\max}(P^{-1}H)` above :math:`(2+2\beta_1)/(1-\beta_1)`, the
   loss never recovers, and it happened before :math:`\hat v` could go stale
   (:math:`t < 1/(1-\beta_2)`): the preconditioner did not grow, the lr is too large.
4. ``adaptive-edge-of-stability``: Adam's preconditioned sharpness (largest over the
   50 steps before the onset) at/above 90% of :math:`(2+2\beta_1)/(1-\beta_1)`; or the
   effective step or :math:`g^2/\hat v` surging (3x its running median) just before the
   onset, with the preconditioned sharpness unknown or above 75% of the threshold.
5. Without HVP curvature (the default Monitor; :mod:`stablestep.diagnosis.infer`): an lr
   jump at or just before the onset (up to the alarm) is ``lr-too-high``, before anything
   else but the outlier test; a trusted secant curvature (``secant_curvature`` at half the
   bound or more and out of its healthy noise) is ``lr-too-high`` for SGD or within the
   first :math:`2/(1-\beta_1)` steps, else ``adaptive-edge-of-stability``; a blow-up from
   the first steps is ``lr-too-high``; an SGD divergence, or any SGD spike in full-batch
   training, is ``lr-too-high``; a self-recovering spike of full-batch Adam with no lr
   change is ``adaptive-edge-of-stability``. A NaN that ends a blow-up (loss x3 or gradient
   norm x10 just before, or an lr jump) in a run that is not fp16/bf16 is ``lr-too-high``.
6. ``unknown``: otherwise, naming the signals that were missing.

Remedies are kept only where they fit the run (:func:`fits`): nothing already set, nothing
Adam-only for SGD, no batch advice for full-batch training, precision advice only for
fp16/bf16 runs; each says its expected effect, and an lr bound from Adam's state says how
reliable it is that early.

Remedies (computed for this run):

- eps: the effective step is at most :math:`\alpha_t/\epsilon` per coordinate, so
  :math:`\lambda_{\max}(P^{-1}H) \le \alpha_t \lambda_{\max}(H)/\epsilon`; keeping it under
  :math:`(2+2\beta_1)/(1-\beta_1)` needs
  :math:`\epsilon \ge \alpha_t\,\lambda_{\max}(H)\,(1-\beta_1)/(2+2\beta_1)` with
  :math:`\alpha_t = \mathrm{lr}/(1-\beta_1^t)`; in the TF convention
  :math:`\hat\epsilon = \epsilon\sqrt{1-\beta_2^t}`.
- lr: the preconditioned sharpness scales with lr, so
  :math:`\mathrm{lr}' = 0.9\,\mathrm{lr}\cdot\text{threshold}/\lambda_{\max}(P^{-1}H)`;
  for GD :math:`\mathrm{lr}' = 0.9\,(2+2\mu)/\lambda_{\max}(H)`.
- decay: an exponential decay (Keras/TF semantics, :math:`\mathrm{lr}\,r^{t/T}`) with
  :math:`T` the onset step and :math:`r = \mathrm{lr}'/\mathrm{lr}`, so the lr is down to
  :math:`\mathrm{lr}'` where the instability began and keeps falling as :math:`\hat v` shrinks.
- clip: :math:`\exp(\mathrm{median} + 3\cdot 1.4826\,\mathrm{MAD})` of :math:`\log\|g\|`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stablestep import formulas as F
from stablestep.diagnosis import infer
from stablestep.diagnosis.findings import Remedy
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names

ADAM_SIGNALS = (names.EFF_STEP_MAX, names.G2V_RMS)
CURVATURE_SIGNALS = (names.SHARPNESS, names.PRECOND_SHARPNESS)


@dataclass(frozen=True)
class Incident:
    """An episode found by the detectors, before explanation."""

    onset: int
    detected: int
    kind: str  # spike | divergence | non-finite
    peak: float
    peak_step: int
    baseline: float
    recovered: bool
    jump: bool = False
    nonfinite_at: int | None = None
    follow_on: tuple[int, ...] = ()  # later alarms of the same episode
    end: int | None = None  # where the episode ended (None: open or not known)
    longest: int | None = None  # records of its longest excursion (None: not known)


def _sig(x: float, digits: int = 2) -> float:
    """Round up to ``digits`` significant digits (remedies err on the safe side for eps)."""
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - digits + 1
    return float(f"{math.ceil(x / 10**e - 1e-9) * 10**e:.{digits}g}")


def _sig_down(x: float, digits: int = 2) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - digits + 1
    return float(f"{math.floor(x / 10**e + 1e-9) * 10**e:.{digits}g}")


def _index(trace: Trace, step: int) -> int:
    return int(np.searchsorted(trace.steps, step, side="left"))


def grad_stats(trace: Trace, step: int, *, window: int = 50) -> dict[str, float] | None:
    """Robust running statistics of log grad norm over ``window`` records before ``step``
    and the z-scores at ``step`` and the max over the 3 records before it."""
    g = trace.metric(names.GRAD_NORM)
    if g is None:
        return None
    i = _index(trace, step)
    hist = g[max(0, i - window - 3): max(0, i - 3)]
    hist = np.log(hist[np.isfinite(hist) & (hist > 0)])
    if hist.size < 5 or i >= len(trace) or not (math.isfinite(g[i]) and g[i] > 0):
        return None
    med = float(np.median(hist))
    mad = float(np.median(np.abs(hist - med))) * 1.4826
    scale = max(mad, 0.05)  # a floor: +5% in log units counts as one sigma at least

    def z(v: float) -> float:
        """Robust z-score of a gradient norm against the running statistics."""
        return (math.log(v) - med) / scale if math.isfinite(v) and v > 0 else math.nan

    prev = [z(float(v)) for v in g[max(0, i - 3): i]]
    prev = [p for p in prev if math.isfinite(p)]
    return {"z": z(float(g[i])), "z_before": max(prev) if prev else 0.0, "value": float(g[i]),
            "median": math.exp(med), "clip": math.exp(med + 3 * scale)}


def _surge(trace: Trace, name: str, step: int, *, window: int = 50, lead: int = 5) -> float | None:
    """Max of ``name`` over the ``lead`` records up to ``step`` divided by its median
    over the ``window`` records before those."""
    arr = trace.metric(name)
    if arr is None:
        return None
    i = _index(trace, step)
    recent = arr[max(0, i - lead): i + 1]
    hist = arr[max(0, i - lead - window): max(0, i - lead)]
    recent, hist = recent[np.isfinite(recent)], hist[np.isfinite(hist) & (hist > 0)]
    if recent.size == 0 or hist.size < 3:
        return None
    return float(np.max(recent) / np.median(hist))


def early_warning(trace: Trace, onset: int, *, lead: int = 20, window: int = 50,
                  factor: float = 3.0) -> dict[str, Any] | None:
    """The first telemetry signal that warned before the loss began to rise, if any.

    Looks at the ``lead`` records up to the onset for: ``precond_sharpness`` at/above
    ``precond_threshold`` (the bound crossed), or ``g2v_rms`` / ``eff_step_max`` at
    ``factor`` times their median over the ``window`` records before that span.
    Returns ``{"signal", "step", "lead_steps"}`` for the earliest such record.
    """
    i = _index(trace, onset)
    lo = max(0, i - lead)
    best: tuple[int, str] | None = None
    ps, thr = trace.metric(names.PRECOND_SHARPNESS), trace.metric(names.PRECOND_THRESHOLD)
    if ps is not None and thr is not None:
        for k in range(lo, min(i + 1, len(trace))):
            if math.isfinite(ps[k]) and math.isfinite(thr[k]) and ps[k] >= thr[k]:
                best = (k, names.PRECOND_SHARPNESS)
                break
    for name in (names.G2V_RMS, names.EFF_STEP_MAX):
        arr = trace.metric(name)
        if arr is None:
            continue
        hist = arr[max(0, lo - window): lo]
        hist = hist[np.isfinite(hist) & (hist > 0)]
        if hist.size < 5:
            continue
        bar = factor * float(np.median(hist))
        for k in range(lo, min(i + 1, len(trace))):
            if math.isfinite(arr[k]) and arr[k] >= bar:
                if best is None or k < best[0]:
                    best = (k, name)
                break
    if best is None:
        return None
    step = int(trace.steps[best[0]])
    return {"signal": best[1], "step": step, "lead_steps": int(onset) - step}


def curvature(trace: Trace, inc: Incident, *, window: int = 50) -> dict[str, float]:
    """Curvature numbers at the incident: last values at or before detection (for the
    preconditioned sharpness, the largest over ``window`` steps before the onset)."""
    out: dict[str, float] = {}
    lookback = None
    for name in (names.SHARPNESS, names.PRECOND_SHARPNESS, names.PRECOND_THRESHOLD,
                 names.LR_SHARPNESS, names.GD_THRESHOLD):
        v = trace.value_at(name, inc.detected, lookback=lookback)
        if v is not None:
            out[name] = v
    # Curvature is sampled every few steps and drops right after a spike inflates v:
    # take the largest preconditioned sharpness of the ``window`` steps before detection.
    ps = trace.metric(names.PRECOND_SHARPNESS)
    if ps is not None:
        lo = int(np.searchsorted(trace.steps, inc.onset - window))
        hi = int(np.searchsorted(trace.steps, inc.detected, side="right"))
        seg = ps[lo:hi][np.isfinite(ps[lo:hi])]
        if seg.size:
            out[names.PRECOND_SHARPNESS] = float(seg.max())
    lr = lr_at(trace, inc.onset)
    if names.LR_SHARPNESS not in out and names.SHARPNESS in out and lr is not None:
        out[names.LR_SHARPNESS] = lr * out[names.SHARPNESS]
    if names.GD_THRESHOLD not in out and names.LR_SHARPNESS in out:
        h = trace.hyper
        out[names.GD_THRESHOLD] = F.sgd_threshold(float(h.get("momentum", 0.0) or 0.0),
                                                  float(h.get("dampening", 0.0) or 0.0),
                                                  bool(h.get("nesterov", False)))
    b1 = trace.hyper.get("beta1")
    if names.PRECOND_THRESHOLD not in out and names.PRECOND_SHARPNESS in out and b1 is not None:
        out[names.PRECOND_THRESHOLD] = F.adam_threshold(b1)
    return out


def stable_eps(lr: float, sharpness: float, *, beta1: float, beta2: float, step: int,
               eps_mode: str = "torch") -> float:
    r"""The smallest eps that keeps :math:`\lambda_{\max}(P^{-1}H)` under Adam's threshold:
    :func:`stablestep.formulas.min_stable_eps_t`,
    :math:`\epsilon_t \ge \alpha_t\,\lambda_{\max}(H)\,(1-\beta_1)/(2+2\beta_1)`,
    :math:`\alpha_t = \mathrm{lr}/(1-\beta_1^t)`, returned in the optimizer's own convention
    (:func:`stablestep.formulas.eps_in_mode`; ``"tf"``: :math:`\hat\epsilon =
    \epsilon_t\sqrt{1-\beta_2^t}`). Shared by the diagnosis' remedy and the guard."""
    t = max(1, int(step))
    eps = F.min_stable_eps_t(lr, beta1, t, sharpness)
    return F.eps_in_mode(eps, beta2, t, eps_mode if eps_mode in F.EPS_MODES else "torch")


def lr_at(trace: Trace, step: int) -> float | None:
    """The learning rate at ``step`` (logged ``lr`` metric, else the configured lr)."""
    v = trace.value_at(names.LR, step)
    if v is None:
        v = trace.hyper.get("lr")
    return float(v) if v is not None else None


def _is_adam(trace: Trace) -> bool | None:
    kind = trace.hyper.get("kind")
    if kind is not None:
        return kind == "adam"
    if any(trace.has(n) for n in ADAM_SIGNALS + (names.PRECOND_SHARPNESS,)):
        return True
    return None


def classify(trace: Trace, inc: Incident) -> tuple[str, float, dict[str, Any]]:
    """Mechanism, confidence and evidence of one incident (rules in the module docstring)."""
    from stablestep.diagnosis import transformer  # model-probe signals, when recorded

    named = transformer.classify(trace, inc)
    if named is not None:
        return named
    ev: dict[str, Any] = {"detected_at": inc.detected, "baseline_loss": inc.baseline,
                          "peak_loss": inc.peak, "peak_step": inc.peak_step,
                          "recovered": inc.recovered}
    if inc.follow_on:
        ev["follow_on_alarms"] = list(inc.follow_on)
    if inc.baseline > 0 and math.isfinite(inc.peak):
        ev["peak_over_baseline"] = inc.peak / inc.baseline
    if inc.kind == "non-finite":
        i = _index(trace, inc.onset)
        before = trace.loss[max(0, i - 5): i]
        before = before[np.isfinite(before)]
        ev = {"first_non_finite_step": inc.onset,
              "last_finite_loss": float(before[-1]) if before.size else None}
        if before.size >= 2:
            ev["loss_change_before"] = float(before[-1] / before[0])
        g = trace.metric(names.GRAD_NONFINITE)
        if g is not None:
            ev["grad_nonfinite"] = float(np.nan_to_num(g[min(i, len(g) - 1)]))
        gn = trace.metric(names.GRAD_NORM)
        if gn is not None:
            seg = gn[max(0, i - 5): i]
            seg = seg[np.isfinite(seg) & (seg > 0)]
            if seg.size >= 2:
                ev["grad_norm_change_before"] = float(seg[-1] / seg[0])
        lrj = infer.lr_jump(trace, inc.onset, detected=inc.detected)
        if lrj is not None:
            ev["lr_jump"] = lrj
        half = infer.half_precision(trace)
        ev["half_precision"] = half
        # A NaN at the end of a blow-up (the loss or the gradient grew fast just before, or
        # the lr had just jumped) in a run that is not fp16/bf16 is the end of a divergence:
        # the lr, not the number format.
        blowing = (ev.get("loss_change_before", 1.0) >= 3.0
                   or ev.get("grad_norm_change_before", 1.0) >= 10.0 or lrj is not None
                   or (i <= 2 and before.size >= 1))
        if blowing and half is not True:
            ev["reason"] = ("the loss/gradient was blowing up before the first NaN"
                            + (" right after an lr jump" if lrj else ""))
            return "lr-too-high", 0.7, ev
        return "non-finite", 0.95, ev
    gs = grad_stats(trace, inc.onset)
    curv = curvature(trace, inc)
    ev.update({k: v for k, v in curv.items()})
    ps, pthr = curv.get(names.PRECOND_SHARPNESS), curv.get(names.PRECOND_THRESHOLD)
    lrs, gthr = curv.get(names.LR_SHARPNESS), curv.get(names.GD_THRESHOLD)
    adam = _is_adam(trace)
    if ps is not None and pthr:
        ev["precond_ratio"] = ps / pthr
    if lrs is not None and gthr:
        ev["lr_sharpness_ratio"] = lrs / gthr
    curv_high = None
    if ps is not None and pthr:
        curv_high = ps >= 0.9 * pthr
    if lrs is not None and gthr and adam is False:
        curv_high = bool(curv_high) or lrs > gthr
    if gs is not None:
        ev["grad_norm_z"] = gs["z"]
        ev["grad_norm_z_before"] = gs["z_before"]
        ev["grad_norm"] = gs["value"]
    else:  # too few records for statistics: say how the gradient norm moved
        g = trace.metric(names.GRAD_NORM)
        i = _index(trace, inc.detected)
        if g is not None and i < len(trace):
            before = g[:_index(trace, inc.onset)]
            before = before[np.isfinite(before) & (before > 0)]
            if before.size and math.isfinite(g[i]):
                ev["grad_norm"] = float(g[i])
                ev["grad_norm_over_median_before"] = float(g[i] / np.median(before))
    scale = trace.metric("loss_scale")
    if scale is not None:  # fp16 dynamic loss scaling halves on every overflow
        i0, i1 = _index(trace, inc.onset) - 1, _index(trace, inc.detected) + 3
        seg = scale[max(0, i0): i1]
        seg = seg[np.isfinite(seg)]
        if seg.size >= 2:
            ev["loss_scale_halvings"] = int(round(max(0.0, math.log2(seg[0] / seg.min()))))
    surges = {}
    for name in ADAM_SIGNALS:
        s = _surge(trace, name, inc.onset)
        if s is not None:
            surges[name] = s
            ev[f"{name}_surge"] = s
    warn = early_warning(trace, inc.onset)
    if warn is not None:
        ev["early_warning"] = warn
    share = trace.value_at(names.EPS_SHARE, inc.onset)
    if share is not None:
        ev[names.EPS_SHARE] = share
    # Inference from what the default Monitor records (diagnosis.infer): an lr jump, the
    # free secant curvature against the bound, the loss's growth rate.
    lrj = infer.lr_jump(trace, inc.onset, detected=inc.detected)
    if lrj is not None:
        ev["lr_jump"] = lrj
    sec = infer.secant(trace, inc.onset, inc.detected)
    if sec is not None:
        ev["secant"] = sec
    r = infer.growth(trace, inc.onset)
    if r is not None:
        ev["loss_growth_per_step"] = r
        if adam is False:
            ev["lr_sharpness_from_growth"] = infer.gd_curvature_from_growth(r)
    fb = infer.full_batch(trace)
    first = int(trace.steps[0]) if len(trace) else 0
    # only a log that starts at the start of training can show "the first steps": an
    # excerpt that begins at iteration 11446 of a 104B run says nothing about its state
    from_start = first <= 10
    early = from_start and inc.onset - first <= 2  # a blow-up from the first steps
    b1 = float(trace.hyper.get("beta1", 0.9) or 0.9)
    young = from_start and inc.onset - first < 2.0 / (1.0 - b1)  # m, v_hat: few gradients
    # how far the loss had fallen before the onset (a run that trained well for a while)
    i0 = _index(trace, inc.onset)
    before = trace.loss[:i0]
    before = before[np.isfinite(before)]
    fell = (float(before[0] / before.min()) if from_start and before.size >= 10
            and before.min() > 0 else 1.0)
    # the record before the batch may be a little noisy itself (heavy-ball SGD's gradient
    # norm swings): it must stay well under the outlier, not under a fixed 3
    # (a minibatch gradient 12 sigmas out is the batch, whatever the curvature probe
    # measured on its fixed batch: minibatch SGD sits above 2/lr for long stretches)
    if (gs is not None and gs["z"] >= 6 and gs["z_before"] < max(3.0, gs["z"] / 4)
            and (curv_high is not True or (fb is False and gs["z"] >= 12))
            and fb is not True and lrj is None and not early):
        return "gradient-outlier", 0.9 if curv_high is False else 0.75, ev
    if lrj is not None:
        ev["reason"] = f"the lr jumped {lrj['factor']:.3g}x at step {lrj['step']}"
        return "lr-too-high", 0.85, ev
    if adam is False and lrs is not None and gthr and lrs > gthr:
        return "lr-too-high", 0.9, ev
    if ps is not None and pthr and ps >= 0.9 * pthr:
        # A blow-up before v_hat could go stale (t < 1/(1-b2) steps): the preconditioner
        # did not grow, the lr itself is too large for the curvature (lr divergence). Later,
        # the same crossing is the adaptive edge of stability (late explosion, periodic spikes).
        fresh_v = inc.onset < 1.0 / (1.0 - float(trace.hyper.get("beta2", 0.999) or 0.999))
        if adam is False or (inc.kind == "divergence" and ps > pthr and fresh_v
                             and fell < 10):  # (not after training well: a late explosion)
            return "lr-too-high", 0.8, ev
        if early or young:  # crossed within the first steps: m, v_hat hold a few gradients,
            return "lr-too-high", 0.75, ev  # no edge to drift to (same rule as the secant)
        return "adaptive-edge-of-stability", 0.9 if ps >= pthr else 0.75, ev
    if ps is None and lrs is None:  # no HVP curvature: the free curvature and the loss
        if sec is not None and sec["trusted"]:
            if adam is False or early or young:
                return "lr-too-high", 0.75, ev
            return "adaptive-edge-of-stability", 0.75, ev
        if early:
            ev["reason"] = "the loss blew up from the first steps, before any state built up"
            return "lr-too-high", 0.65, ev
        if adam is False and (inc.kind == "divergence" or fb):
            # plain/momentum SGD has one instability besides bad batches (none in full batch)
            return "lr-too-high", 0.6, ev
        if (adam and fb and inc.kind == "divergence" and not young and lrj is None
                and fell >= 10):
            # full batch, constant lr, a loss that had trained well for many steps: the
            # late explosion of the README's first story (v decayed with the gradients)
            ev["reason"] = (f"full-batch Adam, no lr change, the loss had fallen {fell:.3g}x "
                            "before it blew up: the preconditioned curvature crossed the "
                            "bound as v decayed")
            return "adaptive-edge-of-stability", 0.5, ev
        if adam and fb and inc.recovered and not young:
            # full batch: no outlier batch; constant lr: a spike that recovers by itself
            ev["reason"] = ("full-batch Adam, no lr change, the spike recovered by itself: "
                            "the preconditioned curvature crossed the bound")
            return "adaptive-edge-of-stability", 0.55, ev
    if adam and any(v >= 3 for v in surges.values()) and (
            ps is None or (pthr and ps >= 0.75 * pthr)):
        return "adaptive-edge-of-stability", 0.6 if ps is None else 0.7, ev
    missing = [n for n in (names.GRAD_NORM,) + CURVATURE_SIGNALS + ADAM_SIGNALS
               if not trace.has(n)]
    ev["missing"] = missing
    if inc.kind == "divergence" and inc.baseline > 0 and inc.peak > inc.baseline:
        span = max(1, inc.peak_step - inc.onset)
        ev["growth_per_step"] = (inc.peak / inc.baseline) ** (1.0 / span)
    return "unknown", 0.3, ev


def _reliability(step: int, beta2: float) -> str:
    """How far to trust an lr bound computed from Adam's state ``step`` steps in."""
    t = max(1, int(step))
    if t < 10:
        return (f"unreliable this early: after {t} step(s) v_hat holds {t} squared "
                "gradient(s), not an average")
    if t < 1.0 / (1.0 - beta2):
        return f"rough: v_hat averages {t} of the ~{1.0 / (1.0 - beta2):.0f} steps it will"
    return "reliable at frozen optimizer state"


def fits(trace: Trace, r: Remedy) -> bool:
    """Whether remedy ``r`` fits this run: nothing already set (``amsgrad`` on an AMSGrad
    run), nothing Adam-only for another optimizer, nothing about batches for full-batch
    training, precision advice only for fp16/bf16 runs."""
    h = trace.hyper
    adam = _is_adam(trace)
    if r.action == "amsgrad" and (bool(h.get("amsgrad")) or adam is False):
        return False
    if r.action in ("set-eps",) and adam is False:
        return False
    if r.action in ("skip-batch", "clip-grad-norm", "batch-size") and infer.full_batch(trace):
        return False
    if r.action == "loss-scaling" and infer.half_precision(trace) is not True:
        return False
    if r.action == "set-lr" and isinstance(r.value, (int, float)):
        lr = h.get("lr")
        return lr is None or r.value < max(float(lr), float(h.get("_lr_now", lr)))
    return True


def remedies(trace: Trace, mechanism: str, inc: Incident, ev: dict[str, Any]) -> list[Remedy]:
    """Computed remedies for ``mechanism`` (formulas in the module docstring), each with its
    expected effect, keeping only those that fit the run (:func:`fits`)."""
    lr = lr_at(trace, inc.onset)
    h = dict(trace.hyper)
    if lr is not None:
        h["_lr_now"] = lr
    view = Trace(trace.steps, trace.loss, trace.metrics, h, trace.nonfinite_steps)
    return [r for r in _remedies(trace, mechanism, inc, ev) if fits(view, r)]


def _remedies(trace: Trace, mechanism: str, inc: Incident, ev: dict[str, Any]) -> list[Remedy]:
    h = trace.hyper
    lr = lr_at(trace, inc.onset)
    out: list[Remedy] = []
    if mechanism in ("attention-logit-growth", "output-logit-divergence", "epsilon-scale",
                     "loss-scale-collapse"):
        from stablestep.diagnosis import transformer

        return transformer.remedies(trace, mechanism, ev)
    if mechanism == "non-finite":
        i = _index(trace, inc.onset)
        good = trace.steps[:i][np.isfinite(trace.loss[:i])]
        if good.size:
            out.append(Remedy("restore", int(good[-1]),
                              f"last step with a finite loss before step {inc.onset}; expected: "
                              "training resumes from finite weights"))
        half = infer.half_precision(trace)
        if half or trace.has("loss_scale"):
            out.append(Remedy("loss-scaling", "dynamic",
                              "an overflow is a numeric-range problem: dynamic loss scaling "
                              "(torch.amp.GradScaler) or bf16 instead of fp16; expected: "
                              "overflowing steps are skipped instead of poisoning the weights"))
        else:
            out.append(Remedy("find-origin", "MonitorConfig(keep_batch=True)",
                              "the run is not fp16/bf16 (or its dtypes were not recorded): "
                              "run again with keep_batch=True and observe(loss, batch=...); "
                              "the Monitor replays the first non-finite step once with "
                              "finiteness hooks (forward and backward, no always-on cost, "
                              "unlike anomaly mode); expected: the module that made the "
                              "first NaN, named in the next diagnosis"))
        eps = h.get("eps")
        if half and eps is not None and eps < 1e-7:
            out.append(Remedy("set-eps", 1e-7,
                              f"eps {eps:g} is below fp16's smallest subnormal 6e-8 and "
                              "rounds to 0 if the optimizer state is kept in fp16"))
        return out
    if mechanism == "gradient-outlier":
        out.append(Remedy("skip-batch", int(inc.onset),
                          f"gradient norm {ev.get('grad_norm', math.nan):.3g} is "
                          f"{ev.get('grad_norm_z', math.nan):.1f} robust sigmas above its "
                          "running statistics while the curvature is normal; expected: the "
                          "spike does not happen, the rest of the run is unchanged"))
        gs = grad_stats(trace, inc.onset)
        if gs is not None:
            out.append(Remedy("clip-grad-norm", _sig(gs["clip"]),
                              f"exp(median + 3 sigma) of the running log gradient norm "
                              f"(median {gs['median']:.3g}); expected: such a batch moves the "
                              "weights no more than a typical one"))
        return out
    ps, pthr = ev.get(names.PRECOND_SHARPNESS), ev.get(names.PRECOND_THRESHOLD)
    sharp = ev.get(names.SHARPNESS)
    if mechanism == "adaptive-edge-of-stability":
        b1 = h.get("beta1", 0.9)
        if sharp is not None and lr is not None:
            t = max(1, int(inc.onset))
            lr_t = F.step_size(lr, b1, t)
            eps_min = stable_eps(lr, sharp, beta1=b1, beta2=h.get("beta2", 0.999), step=t,
                                 eps_mode=h.get("eps_mode", "torch"))
            out.append(Remedy(
                "set-eps", _sig(eps_min),
                f"caps the effective step at lr_t/eps so lam_max(P^-1 H) <= lr_t*lam_max(H)/eps"
                f" stays under {F.adam_threshold(b1):.0f}: lr_t={lr_t:.3g}, "
                f"lam_max(H)={sharp:.4g}" + (f", current eps {h['eps']:g}" if "eps" in h else "")
                + "; expected: no spike from this mechanism, slower progress along flat "
                "directions"))
        sec = ev.get("secant")
        if ps is None and sec is not None and sec.get("trusted") and lr is not None:
            new_lr = _sig_down(min(0.5 * lr * sec["bound"] / sec["q"], 0.5 * lr))
            out.append(Remedy("set-lr", new_lr,
                              f"the secant curvature along the update reached q={sec['q']:.3g} "
                              f"against the bound {sec['bound']:.3g}; q scales with lr, so "
                              f"{new_lr:.3g} halves it or more; expected: spikes rarer, they "
                              "return only if v_hat keeps shrinking"))
        if not h.get("amsgrad", False):
            out.append(Remedy("amsgrad", True,
                              "v never decreases, so P^-1 cannot grow when the loss flattens; "
                              "expected: the recurring spikes stop"))
        if ps is not None and pthr and lr is not None:
            new_lr = _sig_down(0.9 * lr * pthr / ps)
            out.append(Remedy("set-lr", new_lr,
                              f"lam_max(P^-1 H)={ps:.3g} scales with lr; 0.9*lr*{pthr:.0f}/"
                              f"{ps:.3g} puts it under the threshold; expected: no spike while "
                              "v_hat stays at its current level"))
            # Keras/TF semantics, lr * rate**(t / decay_steps): reach the stable lr by the
            # step where the first incident began, and keep decaying as v keeps shrinking.
            steps = max(1, int(inc.onset))
            out.append(Remedy("exponential-decay",
                              {"decay_rate": _sig_down(new_lr / lr), "decay_steps": steps},
                              f"stablestep.schedules.exponential_decay({steps}, "
                              f"{_sig_down(new_lr / lr)}) brings lr to {new_lr:.3g} by step "
                              f"{steps}, where the instability began, and lower after it; "
                              "expected: the step keeps shrinking as v_hat does"))
        return out
    if mechanism == "lr-too-high":
        gthr = ev.get(names.GD_THRESHOLD)
        lrj = ev.get("lr_jump")
        if lrj is not None and ps is None and sharp is None:  # measured curvature wins
            out.append(Remedy("set-lr", _sig_down(lrj["from"]),
                              f"the lr jumped {lrj['factor']:.3g}x (from {lrj['from']:.3g} to "
                              f"{lrj['to']:.3g}) at step {lrj['step']}, where the incident began;"
                              f" expected: the run stays as stable as it was before the jump"))
            out.append(Remedy("warmup", max(10, int(inc.onset) // 2),
                              "if the higher lr is wanted, reach it by a linear ramp rather than "
                              "a jump, so the preconditioner/curvature can adapt; expected: "
                              "no blow-up at the switch, a new one only if the lr is above the "
                              "stable bound"))
            return out
        sec = ev.get("secant")
        if ps is None and sharp is None and lr is not None:
            b2 = float(h.get("beta2", 0.999) or 0.999)
            est, how = None, None
            if sec is not None and sec.get("trusted") and sec["q"] > 0:
                est = F.max_stable_lr(lr, sec["q"], sec["bound"])
                how = f"lr*{sec['bound']:.3g}/q with the secant curvature q={sec['q']:.3g}"
            elif _is_adam(trace) is False and ev.get("lr_sharpness_from_growth"):
                a = ev["lr_sharpness_from_growth"]
                est = F.max_stable_lr(lr, a, gthr or infer.bound(trace) or 2.0)
                how = (f"the loss grew {ev['loss_growth_per_step']:.3g}x per step, so "
                       f"lr*lam_max ~ 1+sqrt(r) = {a:.3g}")
            rel = (_reliability(inc.onset, b2) if _is_adam(trace)
                   else "the growth-rate estimate holds on the top eigendirection")
            value = lr / 10 if est is None else min(0.9 * est, lr / 3)
            out.append(Remedy("set-lr", _sig_down(value),
                              (f"largest stable lr ~ {est:.3g} from {how} ({rel}); "
                               if est is not None else
                               "the loss blew up with no curvature recorded: lr/10 is the "
                               "first test; ") + "expected: the loss no longer grows step "
                              "after step"))
            out.append(Remedy("warmup", max(100, 2 * int(inc.onset)) if inc.onset < 1000 else 1000,
                              "a linear warmup lets curvature and v_hat settle before the full "
                              "lr; expected: no blow-up in the first steps"))
            return out
        if _is_adam(trace) and ps is not None and pthr and lr is not None:
            b2 = float(h.get("beta2", 0.999) or 0.999)
            out.append(Remedy("set-lr", _sig_down(min(0.9 * lr * pthr / ps, 0.9 * lr)),
                              f"largest stable lr is lr*{pthr:.0f}/lam_max(P^-1 H) = "
                              f"{F.max_stable_lr(lr, ps, pthr):.3g} "
                              f"({_reliability(inc.onset, b2)}); 10% margin; expected: "
                              "lam_max(P^-1 H) under the bound"))
        elif sharp is not None and gthr:
            out.append(Remedy("set-lr", _sig_down(0.9 * gthr / sharp),
                              f"GD is stable iff lr*lam_max(H) < {gthr:g}; lam_max(H)="
                              f"{sharp:.4g} gives lr < {gthr / sharp:.3g}; 10% margin; expected: "
                              "the top direction contracts instead of growing"))
        out.append(Remedy("warmup", max(100, 2 * int(inc.onset)) if inc.onset < 1000 else 1000,
                          "a linear warmup lets curvature settle before the full lr; "
                          "expected: no blow-up in the first steps"))
        return out
    missing = ev.get("missing", [])
    if missing:
        out.append(Remedy("record", missing,
                          "the mechanism cannot be told from the loss alone: record these "
                          "(stablestep.Monitor with curvature_loss=...) and diagnose again; "
                          "expected: a named mechanism"))
    if lr is not None:
        out.append(Remedy("test-lr", _sig_down(lr / 3),
                          "if the incident disappears at lr/3 it is a stability problem "
                          "(lr-too-high or Adam's edge of stability), not the data; expected: "
                          "the answer to which it is"))
    return out
