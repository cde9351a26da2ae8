"""Findings in words: the headline sentence, the deciding evidence rows and remedy values.

Shared by ``stablestep diagnose`` (terminal) and the HTML report (:mod:`stablestep.report.
incidents` renders these into blocks). Each finding (``Finding.to_dict()``) becomes

- a headline sentence (:func:`headline`): run, step, what happened and the mechanism in
  words with its deciding numbers, e.g. "Adam's preconditioned sharpness
  lam_max(P^-1 H) reached 37.7, at its bound 38, while the loss rose 1.1x";
- a compact evidence table (:func:`evidence_rows`): the few numbers that decide that
  mechanism, measured next to their threshold, with their meaning; lists (spike steps,
  follow-on alarms) are summarised as a count and a range (:func:`summarise`);
- the remedies as "action = value -- why" (:func:`remedy_value` formats the value: a
  decay dict reads "decay_rate 0.9 every 16 steps").
"""

from __future__ import annotations

import math
from typing import Any

from stablestep.text import fmt

MECHANISM_WORDS = {
    "adaptive-edge-of-stability": "Adam's adaptive edge of stability",
    "lr-too-high": "a learning rate too high for the curvature",
    "gradient-outlier": "an outlier gradient (one bad batch)",
    "non-finite": "a non-finite value (NaN/Inf)",
    "unknown": "an undetermined mechanism",
    "not diagnosed": "not diagnosed (the lab's own spike count; no diagnosis available)",
}

_LABELS = {
    "precond_sharpness": "lam_max(P^-1 H)", "precond_threshold": "its bound",
    "lr_sharpness": "lr * lam_max(H)", "sharpness": "lam_max(H)",
    "eff_step_max_surge": "max effective step surge", "g2v_rms_surge": "RMS g^2/v_hat surge",
}


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def summarise(v: Any) -> str:
    """An evidence value in a few words: a list of steps as its count and range
    ("77 steps, 3058-9870"), other lists joined, a dict as "key value" pairs, a bool as
    yes/no, a number with 3 significant digits."""
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        nums = [x for x in v if _num(x) is not None]
        if len(nums) == len(v) and len(v) > 3:
            lo, hi = min(nums), max(nums)
            return f"{len(v)} values, {fmt(lo)}-{fmt(hi)}"
        return ", ".join(summarise(x) for x in v)
    if isinstance(v, dict):
        if {"signal", "step", "lead_steps"} <= set(v):
            lead = abs(_num(v["lead_steps"]) or 0)
            return (f"{v['signal']} at step {fmt(v['step'])}, "
                    f"{lead:g} step{'' if lead == 1 else 's'} ahead")
        return ", ".join(f"{k} {summarise(x)}" for k, x in v.items())
    if isinstance(v, bool):
        return "yes" if v else "no"
    text = fmt(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _steps(v: Any) -> str:
    """A list of steps: "77 alarms, steps 3058-9870" (or the steps when few)."""
    if not isinstance(v, (list, tuple)) or not v:
        return "none"
    if len(v) <= 3:
        return "step" + ("s " if len(v) > 1 else " ") + ", ".join(fmt(x) for x in v)
    return f"{len(v)}, steps {fmt(min(v))}-{fmt(max(v))}"


def remedy_value(action: str, value: Any) -> str:
    """A remedy's value in words: ``{'decay_rate': 0.9, 'decay_steps': 16}`` reads
    "decay_rate 0.9 every 16 steps", booleans "on"/"off", steps "step N"."""
    if isinstance(value, dict):
        if {"decay_rate", "decay_steps"} <= set(value):
            rest = {k: x for k, x in value.items() if k not in ("decay_rate", "decay_steps")}
            text = f"decay_rate {fmt(value['decay_rate'])} every {fmt(value['decay_steps'])} steps"
            return text + "".join(f", {k} {summarise(x)}" for k, x in rest.items())
        return ", ".join(f"{k} {summarise(x)}" for k, x in value.items())
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(summarise(x) for x in value) or "none"
    if action in ("restore", "skip-batch") and _num(value) is not None:
        return f"step {fmt(value)}"
    if action == "warmup" and _num(value) is not None:
        return f"{fmt(value)} steps"
    return fmt(value)


def _vs(x: float, bound: float) -> str:
    r = x / bound if bound else math.inf
    if r >= 1.05:
        return f"above its bound {bound:.3g}"
    if r >= 0.95:
        return f"at its bound {bound:.3g}"
    return f"at {100 * r:.0f}% of its bound {bound:.3g}"


def _what(f: dict) -> str:
    ev = f.get("evidence") or {}
    kind = f.get("kind")
    if kind == "periodic-spikes":
        n = ev.get("n_episodes", ev.get("n_spikes"))
        period = _num(ev.get("period"))
        text = f"{fmt(n)} recurring loss spikes" if n is not None else "recurring loss spikes"
        if period is not None and math.isfinite(period):
            text += f", about every {period:.0f} steps"
        return text
    if kind == "divergence":
        return "the loss diverged"
    if kind == "non-finite":
        return "the loss became non-finite (NaN/Inf)"
    if kind == "warning":
        return "a warning before any loss incident"
    return "a loss spike" + (" that recovered" if ev.get("recovered") else "")


def _why(f: dict) -> str:
    """The mechanism's deciding numbers in words ("" when there are none)."""
    ev = f.get("evidence") or {}
    mech = f.get("mechanism")
    rise = _num(ev.get("peak_over_baseline_median")) if f.get("kind") == "periodic-spikes" \
        else None
    rise = rise if rise is not None else _num(ev.get("peak_over_baseline"))
    median = " (median over the spikes)" if f.get("kind") == "periodic-spikes" else ""
    rise_t = f", while the loss rose {rise:.3g}x{median}" if rise is not None else ""
    ps, pthr = _num(ev.get("precond_sharpness")), _num(ev.get("precond_threshold"))
    lrs, gthr = _num(ev.get("lr_sharpness")), _num(ev.get("gd_threshold"))
    if mech == "adaptive-edge-of-stability" and ps is not None and pthr:
        return (f"Adam's preconditioned sharpness lam_max(P^-1 H) reached {ps:.3g}, "
                f"{_vs(ps, pthr)}{rise_t}")
    if mech == "adaptive-edge-of-stability":
        surge = max((_num(ev.get(k)) or 0.0) for k in ("eff_step_max_surge", "g2v_rms_surge"))
        if surge:
            return f"Adam's effective step surged {surge:.3g}x{rise_t}"
    adaptive = ps is not None and bool(pthr) and (gthr is None or abs(pthr - gthr) > 1e-6)
    if mech == "lr-too-high":
        if adaptive:
            return (f"lam_max(P^-1 H) reached {ps:.3g}, {_vs(ps, pthr)}, before Adam's "
                    f"second moment could adapt{rise_t}")
        if lrs is not None and gthr:
            return f"lr * lam_max(H) reached {lrs:.3g}, {_vs(lrs, gthr)}{rise_t}"
    if mech == "gradient-outlier" and _num(ev.get("grad_norm_z")) is not None:
        return (f"the gradient norm jumped {ev['grad_norm_z']:.1f} robust sigmas above its "
                f"running statistics while the curvature stayed normal{rise_t}")
    if mech == "attention-logit-growth" and _num(ev.get("attn_logit_max")) is not None:
        return (f"the largest attention logit reached {ev['attn_logit_max']:.3g}"
                + (f", {ev['growth']:.3g}x its early value" if _num(ev.get("growth")) else ""))
    if mech == "output-logit-divergence" and _num(ev.get("lm_logz")) is not None:
        return (f"log Z of the output logits moved from {fmt(ev.get('lm_logz_early'))} to "
                f"{ev['lm_logz']:.3g}")
    if mech == "epsilon-scale" and _num(ev.get("eps_grad_ratio_median")) is not None:
        return (f"eps is {ev['eps_grad_ratio_median']:.3g}x the typical tensor's gradient RMS: "
                "Adam steps like SGD with step lr/eps")
    if mech == "loss-scale-collapse" and _num(ev.get("halvings")) is not None:
        return f"the GradScaler's scale fell {fmt(ev['halvings'])} halvings from its peak"
    if mech == "non-finite":
        last = ev.get("last_finite_loss")
        return f"the last finite loss was {fmt(last)}" if last is not None else ""
    if mech == "unknown" and ev.get("missing"):
        return (f"the loss alone cannot tell; not recorded: {summarise(ev['missing'])}"
                + rise_t)
    return rise_t.lstrip(", ")


def headline(f: dict, label: str | None = None) -> str:
    """One sentence: run, step, what happened, the mechanism and its deciding numbers."""
    who = f"{label}, step {fmt(f.get('step', 0))}: " if label else f"Step {fmt(f.get('step', 0))}: "
    mech = f.get("mechanism")
    text = f"{who}{_what(f)}, from {MECHANISM_WORDS.get(mech, str(mech))}"
    why = _why(f)
    if why:
        text += f": {why}"
    conf = _num(f.get("confidence"))
    if conf is not None:
        text += f" (confidence {conf:.2f})"
    born = origin_note(f.get("evidence") or {})
    acted = guard_note(f.get("evidence") or {})
    return text + "." + (f" {born}." if born else "") + (f" {acted}." if acted else "")


def origin_note(ev: dict) -> str:
    """Where the NaN was born (``evidence["nan_origin"]``, replayed by the Monitor or the
    Guard): "Where it was born: the first non-finite value came out of `blocks.1.attn` in
    the forward pass"; "" when nothing was recorded."""
    o = ev.get("nan_origin")
    text = o.get("text") if isinstance(o, dict) else None
    return f"Where it was born: {text}" if isinstance(text, str) and text else ""


def guard_note(ev: dict) -> str:
    """What the Guard already did about this incident (``evidence["guard_actions"]``), in
    words: "The guard acted: skip at step 100 (non-finite)"; several actions are counted,
    "The guard acted 12 times, steps 40..61: 10 skip (gradient-outlier), 2 rollback
    (divergence)". "" when the guard did nothing (or was not attached)."""
    acts = [a for a in (ev.get("guard_actions") or []) if isinstance(a, dict)]
    if not acts:
        return ""
    if len(acts) == 1:
        a = acts[0]
        return (f"The guard acted: {a.get('action', '?')} at step {fmt(a.get('step', '?'))}"
                f" ({a.get('reason', '?')})")
    counts: dict[str, int] = {}
    for a in acts:
        key = f"{a.get('action', '?')} ({a.get('reason', '?')})"
        counts[key] = counts.get(key, 0) + 1
    steps = [s for s in (a.get("step") for a in acts) if isinstance(s, int)]
    span = f", steps {min(steps)}..{max(steps)}" if steps else ""
    return (f"The guard acted {len(acts)} times{span}: "
            + ", ".join(f"{n} {k}" for k, n in counts.items()))


def _row(ev: dict, key: str) -> list[str] | None:
    """``[quantity, measured, reference, meaning]`` for evidence ``key`` (``None`` when
    the finding lacks it)."""
    v = ev.get(key)
    if v is None:
        return None
    x = _num(v)
    pthr, gthr = _num(ev.get("precond_threshold")), _num(ev.get("gd_threshold"))
    if key == "peak_over_baseline":
        return ["loss rise", f"{fmt(v)}x", "",
                f"peak {fmt(ev.get('peak_loss'))} at step {fmt(ev.get('peak_step'))} over the "
                f"baseline {fmt(ev.get('baseline_loss'))}"]
    if key == "peak_over_baseline_median":
        return ["loss rise (median)", f"{fmt(v)}x", "", "peak over pre-spike loss, median "
                "over the episodes"]
    if key == "precond_sharpness":
        if pthr and gthr and abs(pthr - gthr) < 1e-6 and _num(ev.get("lr_sharpness")) is not None:
            return None  # no preconditioner: the same number as lr * lam_max(H)
        ref = f"bound {fmt(pthr)}" if pthr else ""
        return ["lam_max(P^-1 H)", fmt(v), ref, "Adam's preconditioned sharpness; Adam is "
                "stable below (2+2 beta1)/(1-beta1)"]
    if key == "lr_sharpness":
        return ["lr * lam_max(H)", fmt(v), f"bound {fmt(gthr)}" if gthr else "",
                "gradient descent is stable below the bound"]
    if key == "sharpness":
        return ["lam_max(H)", fmt(v), "", "largest Hessian eigenvalue"]
    if key == "grad_norm_z":
        before = _num(ev.get("grad_norm_z_before"))
        return ["gradient-norm jump", f"{fmt(v)} sigma", "outlier at 6 sigma",
                "robust z-score vs running statistics"
                + (f" ({fmt(before)} sigma just before)" if before is not None else "")]
    if key == "grad_norm":
        return ["gradient norm", fmt(v), "", "global L2 norm at the incident"]
    if key == "grad_norm_over_median_before":
        return ["gradient norm / median before", f"{fmt(v)}x", "", "few records: no z-score"]
    if key in ("eff_step_max_surge", "g2v_rms_surge"):
        return [_LABELS[key], f"{fmt(v)}x", "surge at 3x", "max over the last 5 records / "
                "median of the 50 before"]
    if key == "eps_share":
        return ["share governed by eps", f"{100 * x:.0f}%" if x is not None else fmt(v), "",
                "coordinates with sqrt(v_hat) < eps"]
    if key == "early_warning":
        return ["early warning", summarise(v), "", "first signal to move before the onset"]
    if key == "follow_on_alarms":
        return ["further alarms", _steps(v), "", "alarms while the loss rang after the spike"]
    if key == "spike_steps":
        return ["spike alarms", _steps(v), "", "every alarm of the recurring spikes"]
    if key == "period":
        return ["period", f"{fmt(v)} steps", "", "median gap between episode onsets"]
    if key == "interval_cv":
        return ["irregularity of gaps", fmt(v), "", "std/mean of the gaps (0 = clockwork)"]
    if key == "mechanism_counts":
        return ["episodes by mechanism", summarise(v), "", "mechanism of each episode"]
    if key == "detected_at":
        return ["detected at", f"step {fmt(v)}", "", "where the online detector fired"]
    if key == "first_non_finite_step":
        return ["first NaN/Inf loss", f"step {fmt(v)}", "", ""]
    if key == "last_finite_loss":
        return ["last finite loss", fmt(v), "", ""]
    if key == "loss_change_before":
        return ["loss change before", f"{fmt(v)}x", "", "over the last finite records"]
    if key == "grad_nonfinite":
        return ["NaN/Inf gradient entries", fmt(v), "", ""]
    if key == "loss_scale_halvings":
        return ["loss-scale halvings", fmt(v), "", "fp16 overflows around the incident"]
    if key == "missing":
        return ["not recorded", summarise(v), "", "signals that would name the mechanism"]
    if key == "growth_per_step":
        return ["loss growth per step", f"{fmt(v)}x", "", "geometric growth onset to peak"]
    return None


_MAIN = {
    "adaptive-edge-of-stability": ("precond_sharpness", "eff_step_max_surge", "g2v_rms_surge",
                                   "eps_share", "early_warning"),
    "lr-too-high": ("precond_sharpness", "lr_sharpness", "sharpness", "early_warning"),
    "gradient-outlier": ("grad_norm_z", "grad_norm", "grad_norm_over_median_before",
                         "precond_sharpness", "lr_sharpness"),
    "non-finite": ("first_non_finite_step", "last_finite_loss", "loss_change_before",
                   "grad_nonfinite", "loss_scale_halvings"),
    "unknown": ("missing", "growth_per_step", "grad_norm_z", "early_warning"),
}
_LOSS = ("peak_over_baseline", "detected_at", "follow_on_alarms", "loss_scale_halvings")
_PERIODIC = ("period", "spike_steps", "interval_cv", "mechanism_counts",
             "peak_over_baseline_median")


def evidence_rows(f: dict) -> list[list[str]]:
    """The compact evidence table of a finding: the numbers that decide its mechanism
    (measured, reference, meaning), then the loss numbers of its kind."""
    ev = f.get("evidence") or {}
    keys = list(_MAIN.get(f.get("mechanism"), ()))
    keys += _PERIODIC if f.get("kind") == "periodic-spikes" else _LOSS
    rows, seen = [], set()
    for k in keys:
        if k in seen:
            continue
        seen.add(k)
        r = _row(ev, k)
        if r is not None:
            rows.append(r)
    return rows


