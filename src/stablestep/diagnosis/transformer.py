r"""Transformer mechanisms: attention-logit growth, output-logit divergence, epsilon scale,
loss-scale collapse (signals from :mod:`stablestep.telemetry.model_probes`).

Each check reads the probe series of a :class:`~stablestep.diagnosis.trace.Trace` up to a
step and returns its evidence when the mechanism holds, else ``None``:

* ``attention-logit-growth``: the largest attention logit ``attn_logit_max`` reached
  ``ATTN_BAR`` = 100 and grew ``ATTN_GROWTH`` = 10x above its early value (the smallest of
  the first 10% of its records, at least 2). At a logit gap of 100 the softmax weight of the
  runner-up is :math:`e^{-100} \approx 4\cdot10^{-44}`: attention is one-hot, its entropy
  collapses and its gradient vanishes (Dehghani et al. 2023; Wortsman et al. 2023).
* ``output-logit-divergence``: the LM head's mean :math:`\log Z` (``lm_logz``, median of
  3 consecutive records) moved ``LOGZ_DRIFT`` = 10 nats further from 0 than its first
  record, :math:`|\log Z| - |\log Z_0| \ge 10` (Z changed by :math:`e^{10}\approx
  2\cdot10^4`; a move towards 0 is what a z-loss does, never a divergence).
  Softmax cross-entropy is blind to a shift of all logits, so nothing but a z-loss holds
  :math:`\log Z` (Adam's per-coordinate steps do not preserve the zero-sum of the
  gradient over the vocabulary, so :math:`\log Z` walks).
* ``epsilon-scale``: ``eps_grad_ratio`` (:math:`\epsilon_t` over the median tensor's
  gradient RMS) at or above 1 on at least half of the records after the first 10%: for a
  typical coordinate :math:`\sqrt{\hat v} \lesssim \epsilon`, so Adam is SGD with step
  :math:`\mathrm{lr}/\epsilon` and the updates collapse (Everett et al. 2024).
* ``loss-scale-collapse``: the GradScaler halved its scale at least ``SCALE_HALVINGS`` = 10
  times from its peak (or it is below 1) and skipped at least half of the steps since its
  last record at the peak.

An incident (spike, divergence, non-finite) whose window shows one of these is named by
:func:`classify` (called from :func:`stablestep.diagnosis.explain.classify`); a mechanism
that holds with no loss incident yet is reported by :func:`warnings` as a finding of kind
``"warning"`` (the loss has not yet paid for it).

Remedies (:func:`remedies`), computed:

* attention: qk-layernorm; for the layers over the bar, lr
  :math:`\mathrm{lr}' = \mathrm{lr}\sqrt{50/\ell_{\max}}` (a logit is bilinear in the q and k
  weights, whose growth scales with lr, so :math:`\ell` scales as :math:`\mathrm{lr}^2`;
  50 is half the bar); a soft cap :math:`50\tanh(\ell/50)` (Gemma 2's attention cap);
* output logits: z-loss :math:`c\,(\log Z)^2` with :math:`c = 1/(4|\log Z|)` at the
  measured :math:`\log Z` (rounded down, at least PaLM's :math:`10^{-4}`). Why: on a
  logit :math:`z_v` the z-loss adds :math:`2c\log Z\,p_v` to cross-entropy's
  :math:`p_v - y_v`; Adam normalises each coordinate, so the pull on the shift of all
  logits (which cross-entropy cannot see) counts only against cross-entropy's own gradient:
  :math:`2c|\log Z| = 1/2` makes it half of it for a non-target token. PaLM's
  :math:`10^{-4}` is a long-run setting (at :math:`\log Z = 25` its pull is 0.5% of that:
  it needs tens of thousands of steps); the lab story shows it does not hold :math:`\log Z`
  in 60 steps while the computed coefficient does; and when the drift began within
  :math:`2/(1-b_2)` steps of the start at the full lr, a linear warmup over
  :math:`2/(1-b_2)` steps (Ma & Yarats 2021): before Adam's second moment has a scale,
  every LM-head coordinate moves by about lr at once;
* eps: :math:`\epsilon' = 0.1\cdot\min_t \mathrm{RMS}_{\mathrm{median}}(g_t)` (rounded down),
  so :math:`\sqrt{\hat v}` dominates for the typical tensor again;
* loss scale: bf16 (8 exponent bits, range :math:`3\cdot10^{38}`: no loss scaling); when
  the activations themselves overflow fp16 (``act_rms_max`` above 65504/16) no scaler
  setting helps, which the remedy says (also when the attention logits pass 65504);
  otherwise ``GradScaler(init_scale=..., growth_interval=...)`` from the scale that worked.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stablestep.diagnosis.findings import Finding, Remedy
from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names as N

MECHANISMS = ("attention-logit-growth", "output-logit-divergence", "epsilon-scale",
              "loss-scale-collapse")
ATTN_BAR = 100.0
ATTN_GROWTH = 10.0
ATTN_TARGET = 50.0
LOGZ_DRIFT = 10.0
Z_LOSS = 1e-4  # PaLM's coefficient, the floor of the computed one
Z_LOSS_PULL = 0.5  # 2 c |log Z|: the z-loss gradient over cross-entropy's, non-target token
SCALE_HALVINGS = 10
FP16_MAX = 65504.0
LOOKAHEAD = 100  # steps after a non-finite incident in which a scale collapse is its story


def _series(trace: Trace, name: str, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    arr = trace.metric(name)
    if arr is None:
        return np.empty(0, dtype=np.int64), np.empty(0)
    ok = np.isfinite(arr)
    if upto is not None:
        ok &= trace.steps <= upto
    return trace.steps[ok], arr[ok]


def _early(v: np.ndarray) -> float:
    """The smallest of the first 10% of the records (at least 2)."""
    return float(np.min(v[: max(2, len(v) // 10)]))


def _trailing_median(v: np.ndarray, n: int = 3) -> np.ndarray:
    """Median of each record and the ``n - 1`` before it (one transient record is ignored)."""
    return np.array([np.median(v[max(0, i - n + 1): i + 1]) for i in range(len(v))])


def attention_growth(trace: Trace, upto: int | None = None) -> dict[str, Any] | None:
    """Evidence of attention-logit growth in the records up to ``upto`` (module docstring)."""
    s, v = _series(trace, N.ATTN_LOGIT_MAX, upto)
    if v.size < 3:
        return None
    early = max(_early(v), 1e-6)
    bar = max(ATTN_BAR, ATTN_GROWTH * early)
    over = np.flatnonzero(v >= bar)
    if not over.size:
        return None
    peak = int(np.argmax(v))
    ev: dict[str, Any] = {"signal": N.ATTN_LOGIT_MAX, "onset": int(s[over[0]]),
                          "attn_logit_max": float(v[peak]), "attn_logit_max_step": int(s[peak]),
                          "attn_logit_early": early, "growth": float(v[peak] / early)}
    layers = {}
    for name in trace.metrics:
        if name.startswith(N.ATTN_LOGIT_MAX + "/"):
            _, lv = _series(trace, name, upto)
            if lv.size and float(lv.max()) >= ATTN_BAR:
                layers[name.split("/", 1)[1]] = float(lv.max())
    if layers:
        ev["layers"] = layers
    _, ent = _series(trace, N.ATTN_ENTROPY_MIN, upto)
    if ent.size:
        ev["attn_entropy_min"] = float(ent.min())
        ev["attn_entropy_early"] = _early(ent)
    return ev


def logz_drift(trace: Trace, upto: int | None = None) -> dict[str, Any] | None:
    """Evidence of output-logit divergence up to ``upto`` (module docstring)."""
    s, v = _series(trace, N.LM_LOGZ, upto)
    if v.size < 3:
        return None
    early = float(v[0])
    v = _trailing_median(v)
    drift = np.abs(v) - abs(early)  # away from 0 (a z-loss pulls it towards 0)
    over = np.flatnonzero(drift >= LOGZ_DRIFT)
    if not over.size:
        return None
    k = int(np.argmax(drift))
    ev = {"signal": N.LM_LOGZ, "onset": int(s[over[0]]), "lm_logz_early": early,
          "lm_logz": float(v[k]), "lm_logz_step": int(s[k]), "lm_logz_drift": float(drift[k])}
    _, amax = _series(trace, N.LM_LOGZ_ABSMAX, upto)
    if amax.size:
        ev[N.LM_LOGZ_ABSMAX] = float(amax.max())
    return ev


def eps_regime(trace: Trace, upto: int | None = None) -> dict[str, Any] | None:
    """Evidence that eps governs the typical coordinate (module docstring)."""
    s, v = _series(trace, N.EPS_GRAD_RATIO, upto)
    if v.size < 3:
        return None
    skip = len(v) // 10
    s, v = s[skip:], v[skip:]
    share = float(np.mean(v >= 1.0))
    if share < 0.5:
        return None
    eps = trace.hyper.get("eps")
    ev: dict[str, Any] = {"signal": N.EPS_GRAD_RATIO, "onset": int(s[np.argmax(v >= 1.0)]),
                          "eps_grad_ratio_median": float(np.median(v)),
                          "share_of_records_eps_governs": share}
    if eps:
        ev["eps"] = float(eps)
        ev["median_tensor_grad_rms_min"] = float(eps / np.max(v))
    share_c = trace.value_at(N.EPS_SHARE, int(s[-1]))
    if share_c is not None:
        ev[N.EPS_SHARE] = share_c
    return ev


def scale_collapse(trace: Trace, upto: int | None = None) -> dict[str, Any] | None:
    """Evidence of a GradScaler whose scale collapsed while it skipped most steps."""
    s, v = _series(trace, N.LOSS_SCALE, upto)
    if v.size < 2 or not np.any(v > 0):
        return None
    top = float(np.max(v))
    low = float(np.min(v))
    halvings = int(round(math.log2(top / low))) if low > 0 else 1075
    if halvings < SCALE_HALVINGS and low >= 1.0:
        return None
    i_top = int(np.argmax(v))
    down = np.flatnonzero(v[i_top:] < top)
    if down.size:  # the last record at the peak scale, and the first below it
        i_top, onset = i_top + int(down[0]) - 1, int(s[i_top + down[0]])
    else:
        onset = int(s[i_top])
    ev: dict[str, Any] = {"signal": N.LOSS_SCALE, "loss_scale_peak": top,
                          "loss_scale_min": low, "halvings": halvings, "onset": onset}
    ks, kv = _series(trace, N.SKIPPED_STEPS, upto)
    if kv.size >= 2:
        after = ks >= s[i_top]
        if np.count_nonzero(after) >= 2:
            span = float(ks[after][-1] - ks[after][0]) or 1.0
            frac = float(kv[after][-1] - kv[after][0]) / span
            ev["skipped_steps"] = int(kv[-1])
            ev["skipped_share_since_peak"] = frac
            if frac < 0.5:
                return None
    _, act = _series(trace, N.ACT_RMS_MAX, upto)
    if act.size:
        ev[N.ACT_RMS_MAX] = float(act.max())
    _, att = _series(trace, N.ATTN_LOGIT_MAX, upto)
    if att.size:
        ev[N.ATTN_LOGIT_MAX] = float(att.max())
    return ev


CHECKS = (("loss-scale-collapse", scale_collapse), ("attention-logit-growth", attention_growth),
          ("output-logit-divergence", logz_drift), ("epsilon-scale", eps_regime))


def classify(trace: Trace, inc: Any) -> tuple[str, float, dict[str, Any]] | None:
    """Name ``inc`` (an :class:`~stablestep.diagnosis.explain.Incident`) with a transformer
    mechanism when its window (records up to the detection step) shows one; else ``None``.
    Loss-scale collapse comes first (it turns every step non-finite), then attention
    logits, output logits, eps."""
    upto = int(inc.detected) + 1
    for mech, check in CHECKS:
        if mech == "epsilon-scale":
            continue  # eps too large slows training; it does not make incidents
        if mech == "loss-scale-collapse" and inc.kind != "non-finite":
            continue
        # the scale is recorded on the detail cadence: its collapse shows in the records
        # after the first non-finite step
        ev = check(trace, upto + LOOKAHEAD if mech == "loss-scale-collapse" else upto)
        if ev is not None and (mech == "loss-scale-collapse" or ev["onset"] <= upto):
            base = {"detected_at": inc.detected, "baseline_loss": inc.baseline,
                    "peak_loss": inc.peak, "recovered": inc.recovered}
            base.update(ev)
            return mech, 0.8, base
    return None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _sig_down(x: float) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - 1
    return float(f"{math.floor(x / 10**e + 1e-9) * 10**e:.2g}")


def warmup_steps(trace: Trace, onset: int) -> int | None:
    r"""``2/(1-b2)`` steps of linear lr warmup (Ma & Yarats 2021's untuned warmup) when the
    mechanism began within that many steps of the start at the full lr (the first recorded
    lr at least half the lr at ``onset``: no warmup), else ``None``."""
    b2 = trace.hyper.get("beta2")
    b2 = float(b2) if isinstance(b2, (int, float)) and 0 < b2 < 1 else 0.999
    n = int(math.ceil(2.0 / (1.0 - b2) - 1e-9))
    s, lr = _series(trace, N.LR)
    at = trace.value_at(N.LR, onset)
    if not lr.size or at is None or not at > 0 or onset - int(s[0]) > n:
        return None
    return n if lr[0] >= 0.5 * at else None


def z_loss_coefficient(logz: float) -> float:
    r"""The z-loss coefficient for a measured :math:`\log Z`:
    :math:`c = 0.5 / (2|\log Z|)`, rounded down to 2 significant digits, at least
    ``Z_LOSS`` (module docstring)."""
    if not math.isfinite(logz) or logz == 0:
        return Z_LOSS
    return max(Z_LOSS, _sig_down(Z_LOSS_PULL / (2.0 * abs(logz))))


def remedies(trace: Trace, mechanism: str, ev: dict[str, Any]) -> list[Remedy]:
    """Computed remedies for a transformer ``mechanism`` (module docstring)."""
    lr = trace.value_at(N.LR, int(ev.get("onset", 0))) or trace.hyper.get("lr")
    out: list[Remedy] = []
    if mechanism == "attention-logit-growth":
        peak = float(ev["attn_logit_max"])
        out.append(Remedy("qk-layernorm", True,
                          f"a LayerNorm on q and k bounds |q.k|/sqrt(d) by the norms' gains; "
                          f"the largest attention logit reached {_fmt(peak)} "
                          f"({_fmt(ev['growth'])}x its early value)"))
        if lr:
            new = _sig_down(lr * math.sqrt(ATTN_TARGET / peak))
            layers = sorted(ev.get("layers", {})) or ["all attention layers"]
            out.append(Remedy("set-lr-layers", {"layers": layers, "lr": new},
                              f"a logit is bilinear in the q and k weights, so it scales as "
                              f"lr^2: lr*sqrt({ATTN_TARGET:g}/{_fmt(peak)}) for the q/k "
                              f"projections of these layers"))
        out.append(Remedy("attention-logit-cap", ATTN_TARGET,
                          f"soft cap {ATTN_TARGET:g}*tanh(logit/{ATTN_TARGET:g}) (Gemma 2's "
                          "attention cap) keeps the softmax from saturating"))
    elif mechanism == "output-logit-divergence":
        lz = float(ev["lm_logz"])
        c = z_loss_coefficient(lz)
        out.append(Remedy("z-loss", c,
                          f"add {c:g}*logsumexp(logits)^2 to the loss (z-loss: PaLM, Wortsman et "
                          f"al. 2023): at the measured log Z {_fmt(lz)} its gradient on the "
                          f"shift of all logits, which cross-entropy cannot see, is "
                          f"2c|log Z| = {_fmt(2 * c * abs(lz))} of cross-entropy's on a "
                          f"non-target token (PaLM's {Z_LOSS:g} would give "
                          f"{_fmt(2 * Z_LOSS * abs(lz))}: a fix over tens of thousands of "
                          f"steps); it adds {_fmt(c * lz * lz)} to the loss and pulls log Z "
                          "back towards 0"))
        warm = warmup_steps(trace, int(ev.get("onset", 0)))
        if warm is not None:
            out.append(Remedy("lr-warmup", warm,
                              f"log Z left its start by step {int(ev.get('onset', 0))}, within "
                              f"Adam's second-moment horizon, at the full lr: before v has a "
                              f"scale every LM-head coordinate moves by about lr at once. A linear"
                              f" warmup over 2/(1-b2) = {warm} steps (Ma & Yarats 2021)"))
    elif mechanism == "epsilon-scale":
        rms = ev.get("median_tensor_grad_rms_min")
        if rms:
            out.append(Remedy("set-eps", _sig_down(0.1 * rms),
                              f"eps {ev.get('eps', math.nan):g} is "
                              f"{_fmt(ev['eps_grad_ratio_median'])}x the typical tensor's "
                              f"gradient RMS (as low as {_fmt(rms)}): "
                              "0.1x that RMS lets sqrt(v_hat), not eps, set the step again"))
    elif mechanism == "loss-scale-collapse":
        act, att = ev.get(N.ACT_RMS_MAX), ev.get(N.ATTN_LOGIT_MAX)
        why = ""
        if att is not None and att >= FP16_MAX:
            why = (f"; the attention logits reach {_fmt(att)}, beyond fp16's {FP16_MAX:g}: "
                   "the forward pass overflows whatever the loss scale")
        elif act is not None and act >= FP16_MAX / 16:
            why = (f"; the activations' RMS reaches {_fmt(act)}, near fp16's {FP16_MAX:g}: "
                   "the forward pass overflows whatever the loss scale")
        forward = bool(why)
        out.append(Remedy("bf16", True, "bf16 has fp32's 8 exponent bits (range 3e38) and "
                          "needs no loss scaling" + why))
        if att is not None and att >= FP16_MAX:
            out.append(Remedy("qk-layernorm", True, "bounds the attention logits, so they fit "
                              "fp16 again"))
        if not forward:
            init = 2.0 ** max(0, round(math.log2(max(ev["loss_scale_min"], 1.0))) + 4)
            out.append(Remedy("grad-scaler", {"init_scale": init, "growth_interval": 2000},
                              f"the scale fell {ev['halvings']} halvings from "
                              f"{_fmt(ev['loss_scale_peak'])}; restart it near the scale that "
                              "worked and let it grow slowly"))
    return out


def warnings(trace: Trace, named: set[str] | None = None) -> list[Finding]:
    """Findings of kind ``"warning"`` for the mechanisms that hold over the run without a
    loss incident having been named after them (``named``: mechanisms already reported)."""
    out = []
    for mech, check in CHECKS:
        if named and mech in named:
            continue
        ev = check(trace)
        if ev is None:
            continue
        ev = dict(ev)
        if trace.name:
            ev["run"] = trace.name
        out.append(Finding(step=int(ev["onset"]), kind="warning", mechanism=mech,
                           confidence=0.7, evidence=ev, remedies=remedies(trace, mech, ev)))
    return out
