r"""The one detector stack: what the Guard runs live and ``diagnose`` replays on a stored trace.

A :class:`DetectorStack` is fed one record per training step,
``update(step, loss, grad_norm=None, nonfinite=False, metrics=None)``, and returns the
incidents that record raised, as plain :class:`StackIncident` records ``(step, kind, onset,
value, baseline, score)``. The same stream gives the same incidents, whoever feeds it:
:class:`stablestep.guard.Guard` feeds the loss and gradient norm of every ``check`` (the
same numbers the :class:`~stablestep.Monitor` stores), and
:func:`stablestep.diagnosis.replay` feeds a stored trace's ``loss``, ``grad_norm`` and
non-finite marks. Nothing here acts, logs or raises on an incident: the guard decides what
to do with them, the diagnosis explains them.

Kinds, each measured against this run's own statistics:

- ``non-finite``: the first record of a run of records whose loss, gradients (or, when
  the caller says so, parameters or optimizer state) hold a NaN/Inf
  (:class:`~stablestep.diagnosis.detectors.NonFiniteDetector`).
- ``gradient-outlier``: :math:`z_t = (\log\|g_t\| - \mu_{t-1})/\max(\sigma_{t-1},
  \sigma_{\min}) \ge z` while the previous record was normal (:math:`z_{t-1} < z/2`);
  :math:`\mu, \sigma^2` are exponential moving mean and variance (span ``window``) of
  :math:`\log\|g\|` over the records that were not outliers: the batch-to-batch spread of
  this run, not a fixed ratio (:class:`OutlierConfig`).
- ``spike``: an alarm of :class:`~stablestep.diagnosis.spike.SpikeDetector` (a rise of the
  log loss by ``z`` times this run's one-step noise, confirmed).
- ``divergence``: the loss is not coming back: a spike excursion still unrecovered
  ``spike.patience`` records after its alarm, or the running median of the last
  ``divergence.smooth`` losses risen ``divergence.factor`` above its running minimum over
  ``min_steps`` rising records (:class:`~stablestep.diagnosis.detectors.DivergenceDetector`;
  the median keeps one noisy minibatch from counting as growth).
- ``divergence`` / ``spike`` by the **jump** rule (:class:`JumpConfig`), measured from
  record 0 against the *best* loss so far, where the spike detector is still warming up or
  its baseline has followed the loss up: let :math:`m_t` be the median of the last
  ``smooth`` losses and :math:`b_t = \min_{s<t} m_s` (the best level so far). Record
  :math:`t` is *high* when :math:`L_t \ge` ``factor`` :math:`b_t` and :math:`L_t \ge`
  ``factor`` :math:`\min_{t-smooth \le s < t} m_s` (a jump, not the slow return of an
  earlier incident). ``hold`` records later (at :math:`t + hold - 1`, the step raised),
  the finite :math:`L_t \dots L_{t+hold-1}` (more than half of them finite; NaN/Inf are the
  ``non-finite`` detector's) all but a fifth still at ``factor`` :math:`r_t` raise
  ``divergence`` (the loss jumped and stays high), with :math:`r_t = \max(b_t,` the median
  of the 50 losses before the onset) (the minimum of noisy minibatch medians alone is
  too low a floor); otherwise a jump inside the first ``warmup`` records (a blow-up from
  step 0-1 that came back, ``factor`` above the highest loss before it) raises ``spike``.
  The onset is where the loss first left ``1.2`` :math:`b_t`. After an incident the rule
  waits until a loss is back under ``rearm`` :math:`b` (a rollback, an lr cut), then
  watches again. A jump inside the first ``warmup`` records that already clears every
  loss before it by ``factor`` (or climbs three records in a row to ``factor`` over every
  loss before the rise) is raised at once as ``spike`` (its first step), and the
  ``divergence`` follows ``hold`` records later if it stays (same onset: one incident for
  the diagnosis, alarmed at the first step). Its incidents carry ``rule="jump"``. The
  level ``r_t`` is also at least the median of the 20 records before the onset when there
  are 10 (a loss that has been rising slowly: the run's level now): a window that is this
  run's own minibatch noise is no jump. One first loss is no level: with under 3 records
  before the rise, the alarm at once needs ``factor``:math:`^2` over them (or a climb that
  grows ``factor`` x over its own first record), and a rise that came back is a spike only
  if it stands ``factor`` x and ``level_z`` window spreads out of the median of the
  ``hold`` records that followed (a lucky low first minibatch rises 3x at step 1 and the
  next batches swing as far).
- ``spike`` by the **early rise** rule (``rule="jump"``), once, at record ``hold`` when no
  rule has raised yet: the median :math:`m` of records :math:`1..hold` is at least
  ``rearm`` x the first loss :math:`L_0` and :math:`\log(m/L_0) \ge` ``early_z``
  :math:`\sigma_w` (:math:`\sigma_w` the spread of that window): a blow-up in the first
  steps that stays under ``factor`` x; the rule then watches, as after a jump.
- ``divergence`` by the **stays-high** rule (``rule="stays-high"``, settings in
  :class:`JumpConfig`), where the loss rose too little for the jump rule but does not come
  back (Adam whose lr was raised x100 mid-run: the loss goes from 1.3 to chance level,
  2.3, and stays): a record :math:`L_t \ge` ``rearm`` :math:`b_t` and ``rearm`` x the lowest
  of the last ``smooth`` running medians opens a candidate with level :math:`\ell =
  \max(b_t,` the median of the ``level`` records before the onset) (the level just before:
  a loss still falling fast is far under the median of the 50 before) and bar
  :math:`\ell \max(\text{rearm}, e^{z\sigma})`, :math:`\sigma` this run's batch-to-batch
  spread of the log loss over the 50 records before (robust, from first differences;
  ``z`` = ``level_z``: minibatch losses near 0 that swing 10x are no level shift), when the
  record is over the bar and at least 6 records precede the rise (a spread to measure); ``stay``
  records later, the finite losses of the window all but a fifth still over the bar raise
  ``divergence`` (value: the highest loss of the window). After any jump-rule incident and after
  a stays-high one, the rule *watches*: the next ``hold`` finite losses must be back (all but a
  fifth) under ``rearm`` x the incident's baseline, else a ``stays-high`` divergence with the
  same onset (value: the fifth-lowest loss of the window) is raised and the watch starts again.
  This is what tells the Guard that its rollback and lr cut did not bring the loss back; in an
  unguarded run it repeats every ``hold`` records while the loss stays high (``diagnose`` folds
  them into the one divergence they share an onset with).
- ``spike`` at a gradient-outlier record whose loss left the median of the 20 records
  before by ``outlier_loss`` x or more (the jump rule's ``outlier_loss``).
- ``periodic-spikes``: ``periodic.min_spikes`` spike alarms at intervals whose coefficient
  of variation is at most ``periodic.max_cv``
  (:class:`~stablestep.diagnosis.detectors.PeriodicDetector`, once per run).
- ``precursor``: the RMS of :math:`g^2/\hat v` (``metrics["g2v_rms"]``, when recorded)
  jumping far above its running level
  (:class:`~stablestep.diagnosis.detectors.PrecursorDetector`): the stale second moment's
  early warning; it needs optimizer-state metrics, which the guard does not compute per step.

``state_dict()`` / ``load_state_dict()`` round-trip everything, so a resumed run continues
identically.
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stablestep.diagnosis.detectors import (
    DivergenceConfig,
    DivergenceDetector,
    NonFiniteDetector,
    PeriodicConfig,
    PeriodicDetector,
    PrecursorDetector,
)
from stablestep.diagnosis.spike import Excursion, SpikeConfig, SpikeDetector, median

KINDS = ("non-finite", "gradient-outlier", "spike", "divergence", "periodic-spikes",
         "precursor")
G2V_RMS = "g2v_rms"  # stablestep.telemetry.names.G2V_RMS (kept literal: no torch import)


@dataclass(frozen=True)
class OutlierConfig:
    """Settings of the gradient-outlier test (log gradient-norm units).

    ``window``: span of the moving mean and variance (records); ``warmup``: records before
    any alarm; ``z``: threshold in this run's standard deviations; ``sigma_min``: floor of
    the standard deviation (0.1: z = 8 needs at least :math:`e^{0.8} = 2.2\\times` the mean).
    """

    window: int = 100
    warmup: int = 20
    z: float = 8.0
    sigma_min: float = 0.1

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"Invalid window: {self.window} (need >= 2)")
        if self.warmup < 0:
            raise ValueError(f"Invalid warmup: {self.warmup} (need >= 0)")
        for name in ("z", "sigma_min"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"Invalid {name}: {v} (need > 0)")


@dataclass(frozen=True)
class JumpConfig:
    """Settings of the jump rule (see the module docstring): ``factor`` over the best
    running median (of ``smooth`` records), confirmed over ``hold`` records; a jump inside
    the first ``warmup`` records counts even if the loss comes back; ``rearm``: a loss
    must be back under ``rearm`` x the best before the rule watches again; ``outlier_loss``:
    the loss jump that makes a gradient-outlier record a spike; ``stay`` and ``level``: the
    **stays-high** rule, a loss that rose ``rearm`` x over its level (the median of the
    ``level`` records before the rise, at least the best), and ``level_z`` times this run's
    batch-to-batch spread of the log loss, and stays there ``stay`` records (module
    docstring); ``early_z``: the **early rise** rule, the median of records ``1..hold`` at
    least ``rearm`` x the first loss and ``early_z`` of that window's batch spreads over
    it in log units (a blow-up in the first steps that the ``factor`` rules miss: one
    first loss is no level); ``enabled``: False turns the rules off."""

    factor: float = 3.0
    hold: int = 10
    warmup: int = 10
    smooth: int = 5
    rearm: float = 1.5
    outlier_loss: float = 3.0
    stay: int = 20
    level: int = 10
    level_z: float = 2.0
    early_z: float = 4.0
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("level_z", "early_z"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"Invalid {name}: {v} (need >= 0)")
        for name in ("factor", "rearm", "outlier_loss"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 1):
                raise ValueError(f"Invalid {name}: {v} (need > 1)")
        for name in ("hold", "smooth", "stay", "level"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (need >= 1)")
        if self.warmup < 0:
            raise ValueError(f"Invalid warmup: {self.warmup} (need >= 0)")


def _spread(losses: list[float]) -> float:
    r"""This run's batch-to-batch spread of the log loss over ``losses`` (in order): the
    robust standard deviation of one record, :math:`1.4826\,\mathrm{MAD}(\Delta y)/\sqrt 2`
    over the first differences of :math:`y = \log L` (a trend cancels out); 0 with fewer
    than 5 differences."""
    ys = [math.log(v) for v in losses if math.isfinite(v) and v > 0]
    d = [b - a for a, b in zip(ys[:-1], ys[1:], strict=False)]
    if len(d) < 5:
        return 0.0
    m = median(d)
    return 1.4826 * median([abs(x - m) for x in d]) / math.sqrt(2.0)


class JumpDetector:
    """The jump and stays-high rules of :class:`DetectorStack` (module docstring), one
    record at a time.

    ``update(step, loss)`` returns ``(kind, onset, value, baseline, rule)`` or None."""

    def __init__(self, config: JumpConfig) -> None:
        self.config = config
        self._s: dict[str, Any] = {"n": 0, "hist": [], "meds": [], "best": math.inf,
                                   "pending": [], "armed": True, "ref": math.inf,
                                   "lpend": [], "watch": None, "early_done": False}

    def disarm(self, baseline: float) -> None:
        """Another rule raised a divergence: one regime, one incident."""
        s = self._s
        s["armed"], s["pending"], s["lpend"] = False, [], []
        s["ref"] = min(s["best"], baseline) if math.isfinite(baseline) else s["best"]
        s["early_done"] = True  # the early-rise rule judges a start with no incident yet

    def _watch(self, onset: int, ref: float) -> None:
        """Watch the next ``hold`` finite losses: back under ``rearm`` x ``ref``, or a
        stays-high divergence (and watch again)."""
        self._s["watch"] = {"onset": int(onset), "ref": float(ref), "vals": []}

    def update(self, step: int, loss: float) -> tuple[str, int, float, float, str] | None:
        """Feed one record (``loss`` may be non-finite)."""
        out = self._update(step, loss)
        if out is not None:
            self._s["early_done"] = True
        return out

    def _update(self, step: int, loss: float) -> tuple[str, int, float, float, str] | None:
        c, s = self.config, self._s
        k = s["n"]
        s["n"] += 1
        keep = max(c.hold, c.smooth, 50) + 1
        if s["meds"]:
            prev = s["meds"][-1]
            if math.isfinite(prev):
                s["best"] = min(s["best"], prev)
        s["hist"].append((step, loss))
        del s["hist"][:-keep]
        fin = [v for _, v in s["hist"][-c.smooth:] if math.isfinite(v)]
        med = median(fin) if fin else math.nan
        recent = [m for m in s["meds"][-c.smooth:] if math.isfinite(m)]
        s["meds"].append(med)
        del s["meds"][:-keep]
        best = s["best"]
        out = None
        w = s.get("watch")
        if w is not None and math.isfinite(loss):
            # after a jump (or a stays-high incident): back near the level within `hold`
            # finite records (all but a fifth under rearm x), else the loss stays high
            w["vals"].append(loss)
            if len(w["vals"]) >= c.hold:
                q = sorted(w["vals"])[len(w["vals"]) // 5]
                s["watch"] = None
                if q >= c.rearm * w["ref"]:
                    out = ("divergence", w["onset"], q, w["ref"], "stays-high")
                    self._watch(w["onset"], w["ref"])
        if not s["armed"]:
            if math.isfinite(loss) and loss < c.rearm * s["ref"]:
                s["armed"] = True
            return out
        if (k == c.hold and out is None and not s["lpend"] and not s["early_done"]
                and all(q.get("few") and not q.get("alarmed") for q in s["pending"])):
            out = self._early_rise()  # (a rise over under 3 records, not yet judged)
            if out is not None:
                return out
        if k >= 1 and best > 0 and math.isfinite(best):
            low = min(recent) if recent else best
            h = s["hist"]
            high = (math.isfinite(loss) and loss >= c.factor * best
                    and loss >= c.factor * low)
            raised = (math.isfinite(loss) and loss >= c.rearm * best
                      and loss >= c.rearm * low)
            i = len(h) - 1
            if raised:
                while i > 1 and math.isfinite(h[i - 1][1]) and h[i - 1][1] > 1.2 * best:
                    i -= 1
            if high:
                # the level before: the median of up to 50 records before the onset (a
                # minibatch loss near 0 swings 10x: the walk back stops at a lucky batch,
                # and the median of the few records before it is no level), and of the 20
                # before it when there are 10 (a loss that has been rising slowly: the
                # run's level now, not its best)
                pre = [v for _, v in h[max(0, i - 50):i] if math.isfinite(v)]
                ref = max(best, median(pre)) if pre else best
                if len(pre[-20:]) >= 10:
                    ref = max(ref, median(pre[-20:]))
                # an early jump that comes back must clear every loss before it, the rise
                # included: minibatch losses of the first steps swing 2.5 -> 3.6 -> 8.8
                before = [v for _, v in h[max(0, i - c.hold):-1] if math.isfinite(v)]
                top = max(before) if before else best
                # the first high record of a blow-up in the first records that already
                # clears every loss before it is raised at once (a spike, upgraded to a
                # divergence if it stays): the alarm at the first step it can be seen
                # (or a steady climb: three rising records in a row, ``factor`` over every
                # loss before the rise began: a noisy first minibatch rises once or twice)
                pre = [v for _, v in h[max(0, i - c.hold):i] if math.isfinite(v)]  # the rise's
                last = [v for _, v in h[-4:]]
                climb = (len(last) == 4 and all(math.isfinite(v) for v in last)
                         and all(b > a for a, b in zip(last[:-1], last[1:], strict=False))
                         and bool(pre) and loss >= c.factor * max(pre))
                # with under 3 records before the rise there is no level yet (one lucky
                # first minibatch is no baseline): the alarm at once needs factor^2 over it
                # (a blow-up from step 0 is 9x at its first step, or climbs)
                few = i < 3
                clear = loss >= (c.factor * c.factor if few else c.factor) * top
                if few:  # and a climb must go on growing: factor over the rise's first record
                    climb = climb and loss >= c.factor * h[i][1]
                now = (k < c.warmup and not any(q.get("alarmed") for q in s["pending"])
                       and (clear or climb))
                s["pending"].append({"k": k, "onset": int(h[i][0]), "best": ref,
                                     "top": top, "vals": [], "alarmed": now, "few": few,
                                     "peak0": loss})
                if now:
                    out = ("spike", int(h[i][0]), loss, ref, "jump")
                    self._watch(int(h[i][0]), ref)
            if raised and not any(p["onset"] == int(h[i][0]) for p in s["lpend"]):
                # stays-high: risen rearm x over the level just before (the median of the
                # `level` records before the rise: a loss still falling fast has a level
                # well under the median of the 50 before)
                pre = [v for _, v in h[max(0, i - c.level):i] if math.isfinite(v)]
                ref = max(best, median(pre)) if pre else best
                spread = _spread([v for _, v in h[max(0, i - 50):i]])
                bar = ref * max(c.rearm, math.exp(c.level_z * spread))
                # a level needs records: under 6 before the rise (one lucky first
                # minibatch; no spread yet) is none; the jump rule watches blow-ups from
                # the start
                if i >= 6 and loss >= bar:
                    s["lpend"].append({"onset": int(h[i][0]), "best": ref, "bar": bar,
                                       "vals": []})
        for p in s["pending"]:
            p["vals"].append(loss)
        for p in s["lpend"]:
            p["vals"].append(loss)
        while s["pending"] and len(s["pending"][0]["vals"]) >= c.hold:
            p = s["pending"].pop(0)
            vals = p["vals"]
            fv = [v for v in vals if math.isfinite(v)]
            # most of the window high, not its median: a minibatch loss near 0 has a
            # relative noise of x10 and its median wanders x3 (tests/guard/test_no_harm.py)
            stays = (len(fv) * 2 > len(vals)
                     and sorted(fv)[len(fv) // 5] >= c.factor * p["best"])
            early = (p["k"] < c.warmup and bool(fv)
                     and max(fv) >= c.factor * p.get("top", p["best"]))
            if early and p.get("few") and not p.get("alarmed"):
                # a rise over under 3 records that came back: a spike only if it stands
                # out of the loss that followed, beyond that window's own batch spread
                # (a noisy first minibatch rises 3x and the next ones swing as much)
                lvl = median(fv)
                z = c.level_z * _spread(fv)
                early = (lvl > 0 and p["peak0"] >= c.factor * lvl
                         and math.log(p["peak0"] / lvl) >= z)
            if stays or early:
                kind = "divergence" if stays else "spike"
                peak = max(fv) if fv else math.nan
                if stays or not p.get("alarmed"):  # an early spike is raised once
                    out = (kind, p["onset"], peak, p["best"], "jump")
                s["armed"], s["pending"], s["ref"] = False, [], p["best"]
                s["lpend"] = []
                self._watch(p["onset"], p["best"])
                return out
        while s["lpend"] and len(s["lpend"][0]["vals"]) >= c.stay:
            p = s["lpend"].pop(0)
            vals = p["vals"]
            fv = [v for v in vals if math.isfinite(v)]
            if len(fv) * 2 > len(vals) and sorted(fv)[len(fv) // 5] >= p["bar"]:
                # the loss rose and stays rearm x over its level: not coming back
                out = ("divergence", p["onset"], max(fv), p["best"], "stays-high")
                s["armed"], s["pending"], s["lpend"], s["ref"] = False, [], [], p["best"]
                self._watch(p["onset"], p["best"])
                break
        return out

    def _early_rise(self) -> tuple[str, int, float, float, str] | None:
        r"""The early-rise rule, once, at record ``hold``: with :math:`L_0` the first
        loss and :math:`m` the median of records :math:`1..hold`, a spike (then watched)
        when :math:`m \ge` ``rearm`` :math:`L_0` and
        :math:`\log(m/L_0) \ge` ``early_z`` :math:`\sigma`, :math:`\sigma` the window's
        batch-to-batch spread (:func:`_spread`): the loss rose in the first steps and
        stayed up beyond its own noise. A lucky low first minibatch does not pass: the
        batches after it swing as far."""
        c, h = self.config, self._s["hist"]
        if len(h) != c.hold + 1 or not (math.isfinite(h[0][1]) and h[0][1] > 0):
            return None
        top = h[0][1]
        win = [(st, v) for st, v in h[1:] if math.isfinite(v)]
        if len(win) * 2 <= c.hold:
            return None
        vals = [v for _, v in win]
        lvl = median(vals)
        if not (lvl >= c.rearm * top and math.log(lvl / top) >= c.early_z * _spread(vals)):
            return None
        onset = next(st for st, v in win if v >= c.rearm * top)
        s = self._s
        s["armed"], s["ref"], s["pending"], s["lpend"] = False, top, [], []
        self._watch(onset, top)
        return ("spike", onset, max(vals), top, "jump")

    def advance_quiet(self, steps: list[int], losses: list[float], limit: int,
                      loss_arr: Any = None) -> int:
        """The fast path of :meth:`update` for a stored trace (:func:`replay`): feed records
        ``0 .. limit-1`` (finite losses; ``loss_arr`` the same as a float64 array) while
        the rule is armed with nothing pending and no record is high; returns how many
        were fed (a high record is left to :meth:`update`).

        Vectorised, with the same numbers as :meth:`update`: each running median is the
        same selection (or the same ``0.5 * (a + b)``) from a sorted window, the best is a
        running minimum (``tests/diagnosis/test_replay_fast.py`` compares the states)."""
        c, s = self.config, self._s
        if (not s["armed"] or s["pending"] or s.get("lpend") or s.get("watch") is not None
                or limit <= 0 or s["n"] <= c.hold):  # the early-rise check: record by record
            return 0
        import numpy as np
        from numpy.lib.stride_tricks import sliding_window_view

        sm, isfinite = c.smooth, math.isfinite
        lvec = (np.asarray(losses[:limit], dtype=np.float64) if loss_arr is None
                else np.asarray(loss_arr[:limit], dtype=np.float64))
        old_h = [v for _, v in s["hist"][-sm:]]
        old_m = list(s["meds"][-sm:])
        med_arr = np.empty(limit)
        k0 = min(sm - 1, limit)  # windows that reach into the records before the chunk
        head = old_h + losses[:k0]
        for k in range(k0):
            fin = [v for v in head[max(0, len(old_h) + k + 1 - sm):len(old_h) + k + 1]
                   if isfinite(v)]
            med_arr[k] = median(fin) if fin else math.nan
        if k0 < limit:
            w = np.sort(sliding_window_view(lvec, sm), axis=1)
            med_arr[k0:] = (w[:, sm // 2] if sm % 2
                            else 0.5 * (w[:, sm // 2 - 1] + w[:, sm // 2]))
        # the best before each record: the previous record's median folded in
        best0 = s["best"]
        if s["meds"] and isfinite(s["meds"][-1]):
            best0 = min(best0, s["meds"][-1])
        fin_meds = np.where(np.isfinite(med_arr), med_arr, np.inf)
        best = np.minimum.accumulate(np.concatenate([[best0], fin_meds[:-1]]))
        # the lowest of the previous `smooth` medians (finite ones), else the best
        low = np.empty(limit)
        k1 = min(sm, limit)
        ext_m = old_m + med_arr[:k1].tolist()
        for k in range(k1):
            rec = [m for m in ext_m[max(0, len(old_m) + k - sm):len(old_m) + k] if isfinite(m)]
            low[k] = min(rec) if rec else best[k]
        if k1 < limit:
            mins = sliding_window_view(fin_meds[:limit - 1], sm).min(axis=1)
            low[k1:] = np.where(np.isinf(mins), best[k1:], mins)
        kk = s["n"] + np.arange(limit)
        f = min(c.factor, c.rearm)  # a record high for the jump rule or raised for stays-high
        high = ((kk >= 1) & (best > 0) & np.isfinite(best) & (lvec >= f * best)
                & (lvec >= f * low))
        hit = np.flatnonzero(high)
        stop = int(hit[0]) if hit.size else limit
        if stop:
            keep = max(c.hold, c.smooth, 50) + 1
            j = max(0, stop - keep)
            s["n"] += stop
            s["hist"] = (s["hist"] + list(zip(steps[j:stop], losses[j:stop],
                                              strict=True)))[-keep:]
            s["meds"] = (s["meds"] + med_arr[j:stop].tolist())[-keep:]
            s["best"] = float(best[stop - 1])
        return stop

    def outlier_spike(self, loss: float) -> float | None:
        """The median of the 20 records before this one when ``loss`` left it by
        ``outlier_loss`` x (a gradient-outlier batch that also jumped the loss), else None."""
        prev = [v for _, v in self._s["hist"][-21:-1] if math.isfinite(v)]
        if len(prev) >= 5 and math.isfinite(loss):
            m = median(prev)
            if m > 0 and loss >= self.config.outlier_loss * m:
                return m
        return None

    @property
    def watching(self) -> bool:
        """Whether no jump regime is open (the rule is armed)."""
        return bool(self._s["armed"])

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state."""
        return copy.deepcopy(self._s)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        s = copy.deepcopy(state)
        s["hist"] = [tuple(x) for x in s["hist"]]
        s.setdefault("lpend", [])  # states saved before the stays-high rule
        s.setdefault("watch", None)
        s.setdefault("early_done", s["n"] > self.config.hold)  # (states from before the rule)
        self._s = s


@dataclass(frozen=True)
class StackConfig:
    """Settings of :class:`DetectorStack`: one config per detector, all explicit."""

    spike: SpikeConfig = field(default_factory=SpikeConfig)
    divergence: DivergenceConfig = field(default_factory=lambda: DivergenceConfig(
        factor=100.0, min_steps=3, smooth=5))
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    periodic: PeriodicConfig = field(default_factory=PeriodicConfig)
    jump: JumpConfig = field(default_factory=JumpConfig)

    def __post_init__(self) -> None:
        for name, cls in (("spike", SpikeConfig), ("divergence", DivergenceConfig),
                          ("outlier", OutlierConfig), ("periodic", PeriodicConfig),
                          ("jump", JumpConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form."""
        return {k: asdict(getattr(self, k)) for k in ("spike", "divergence", "outlier",
                                                       "periodic", "jump")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(spike=SpikeConfig(**d["spike"]), divergence=DivergenceConfig(**d["divergence"]),
                   outlier=OutlierConfig(**d["outlier"]), periodic=PeriodicConfig(**d["periodic"]),
                   jump=JumpConfig(**d.get("jump", {})))


@dataclass(frozen=True)
class StackIncident:
    """One incident: ``step`` the stack raised it at, ``kind`` (see :data:`KINDS`),
    ``onset`` where it began, the ``value`` that raised it, the ``baseline`` it was
    measured against and the ``score`` (excess in the detector's own units); ``rule``:
    ``"jump"`` for the jump rule's incidents, else empty."""

    step: int
    kind: str
    onset: int
    value: float
    baseline: float
    score: float
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form (non-finite numbers as strings)."""
        d = asdict(self)
        for k in ("value", "baseline", "score"):
            if not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d


class DetectorStack:
    """The per-step detectors of stablestep, fed together (see the module docstring).

    Example::

        stack = DetectorStack()
        for step, (loss, gnorm) in enumerate(stream):
            for inc in stack.update(step, loss, grad_norm=gnorm):
                print(inc.step, inc.kind)
        stack.incidents     # every incident so far
        stack.excursions    # spike episodes with onset, peak and recovery
    """

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        c = self.config
        self._spike = SpikeDetector(c.spike)
        self._div = DivergenceDetector(c.divergence)
        self._nf = NonFiniteDetector()
        self._periodic = PeriodicDetector(c.periodic)
        self._pre = PrecursorDetector()
        self._jump = JumpDetector(c.jump)
        self._out: dict[str, Any] = {"n": 0, "mean": 0.0, "var": 0.0, "prev_z": 0.0}
        self.incidents: list[StackIncident] = []

    # ------------------------------------------------------------------ feeding
    def update(self, step: int, loss: float, *, grad_norm: float | None = None,
               nonfinite: bool = False,
               metrics: dict[str, float] | None = None) -> list[StackIncident]:
        """Feed the record of ``step``; returns the incidents it raised (often none).

        ``grad_norm``: global L2 norm of the gradients (``None``/``nan``: not recorded);
        ``nonfinite``: a NaN/Inf was seen elsewhere (gradient entries, parameters,
        optimizer state); ``metrics``: optional optimizer-state metrics (``g2v_rms``).
        """
        out: list[StackIncident] = []
        loss = float(loss)
        gn = math.nan if grad_norm is None else float(grad_norm)
        bad = nonfinite or not math.isfinite(loss) or math.isinf(gn)
        a = self._nf.update(step, loss, nonfinite=bad)
        if a is not None:
            out.append(StackIncident(step, "non-finite", step, loss, math.nan, math.inf))
        outlier = None
        if not bad and math.isfinite(gn) and gn > 0:
            outlier = self._outlier(step, gn)
            if outlier is not None:
                out.append(outlier)
        if math.isfinite(loss):
            out.extend(self._loss(step, loss))
        if self.config.jump.enabled:
            if (outlier is not None and self._jump.watching and not self._spike.in_excursion
                    and not any(i.kind == "spike" for i in out)):
                m = self._jump.outlier_spike(loss)
                if m is not None:
                    out.append(StackIncident(step, "spike", step, loss, m, loss / m, "jump"))
            j = self._jump.update(step, loss)
            if j is not None and not any(i.kind == "divergence" for i in out):
                kind, onset, value, base, rule = j
                out.append(StackIncident(step, kind, onset, value, base,
                                         value / base if base > 0 else math.inf, rule))
            for i in out:
                if i.kind == "divergence":
                    self._jump.disarm(i.baseline)
        g2v = (metrics or {}).get(G2V_RMS)
        if g2v is not None:
            a = self._pre.update(step, float(g2v))
            if a is not None:
                out.append(StackIncident(step, "precursor", a.onset, a.value, a.baseline,
                                         a.score))
        self.incidents.extend(out)
        return out

    def _outlier(self, step: int, gnorm: float) -> StackIncident | None:
        c, st = self.config.outlier, self._out
        y = math.log(gnorm)
        sigma = max(math.sqrt(st["var"]), c.sigma_min)
        z = (y - st["mean"]) / sigma if st["n"] else 0.0
        prev_z, st["prev_z"] = st["prev_z"], z
        if st["n"] >= c.warmup and z >= c.z and prev_z < c.z / 2:
            return StackIncident(step, "gradient-outlier", step, gnorm, math.exp(st["mean"]), z)
        a = 2.0 / (c.window + 1)
        if st["n"] == 0:
            st["mean"] = y
        else:
            d = y - st["mean"]
            st["mean"] += a * d
            st["var"] = (1 - a) * (st["var"] + a * d * d)
        st["n"] += 1
        return None

    def _outlier_quiet(self, glogs: list[float | None], limit: int) -> int:
        r""":meth:`_outlier` on records ``0 .. limit-1`` (``glogs``: log gradient norm, None
        where not fed) until one would alarm; returns how many were fed. The same
        arithmetic in locals (``max(a, b)`` written as what it returns), bit for bit.

        :math:`z \ge z_{alarm}` needs :math:`y - \mu \ge z_{alarm}\,\sigma_{\min}`
        (:math:`\sigma \ge \sigma_{\min}`), so :math:`z` is formed only where
        :math:`y - \mu` reaches that (and for the last record, whose :math:`z` the state
        keeps)."""
        c, st = self.config.outlier, self._out
        n, mean, var, prev_z = st["n"], st["mean"], st["var"], st["prev_z"]
        a = 2.0 / (c.window + 1)
        b = 1 - a
        cz, half, warmup, smin, sqrt = c.z, c.z / 2, c.warmup, c.sigma_min, math.sqrt
        glogs = glogs[:limit]
        i = 0
        if n == 0 or None in glogs:  # the general form, record by record
            for y in glogs:
                if y is not None:
                    if n == 0:
                        prev_z, mean = 0.0, y
                    else:
                        sd = sqrt(var)
                        z = (y - mean) / (smin if smin > sd else sd)
                        if z >= cz and prev_z < half and n >= warmup:
                            break
                        prev_z = z
                        d = y - mean
                        mean += a * d
                        var = b * (var + a * d * d)
                    n += 1
                i += 1
        else:
            # below this, d / sigma < cz whatever sigma >= smin (a margin for rounding)
            near = cz * smin * (1 - 1e-9)
            pd = pv = None  # the last record's d and var: its z, formed when needed
            for y in glogs:
                d = y - mean
                if d >= near:
                    if pd is not None:
                        sd = sqrt(pv)
                        prev_z = pd / (smin if smin > sd else sd)
                    sd = sqrt(var)
                    z = d / (smin if smin > sd else sd)
                    if z >= cz and prev_z < half and n >= warmup:
                        pd = None
                        break
                    prev_z, pd = z, None
                else:
                    pd, pv = d, var
                mean += a * d
                var = b * (var + a * d * d)
                n += 1
                i += 1
            if pd is not None:
                sd = sqrt(pv)
                prev_z = pd / (smin if smin > sd else sd)
        st["n"], st["mean"], st["var"], st["prev_z"] = n, mean, var, prev_z
        return i

    def _quiet(self) -> bool:
        """Whether every detector would take the next ordinary record without a change of
        mode (no excursion or aftermath, no divergence fired, the jump rule armed with
        nothing pending): the state :func:`replay`'s fast path starts from."""
        j = self._jump._s
        return (self._spike.quiet and self._div.quiet
                and (not self.config.jump.enabled
                     or (self._jump.watching and not j["pending"] and not j.get("lpend")
                         and j.get("watch") is None)))

    def _advance_quiet(self, steps: list[int], losses: list[float], loss_arr: Any,
                       glogs: list[float | None] | None,
                       g2v: tuple[list[int], list[float]] | None) -> int:
        """Feed the leading ordinary records of a chunk (finite positive losses, nothing
        non-finite) through every detector at once, up to the first record on which any
        of them would raise or change mode; returns how many were fed. The state is then
        what :meth:`update` on each of them leaves (the detectors' ``advance_quiet``).
        ``g2v``: the chunk positions with a positive ``g2v_rms`` and its log there."""
        limit = len(losses)
        ys = list(map(math.log, losses))
        dets: list[tuple[Any, Any]] = []
        if self.config.jump.enabled:
            dets.append((self._jump,
                         lambda m: self._jump.advance_quiet(steps, losses, m, loss_arr)))
        dets.append((self._spike, lambda m: self._spike.advance_quiet(steps, ys, m)))
        dets.append((self._div, lambda m: self._div.advance_quiet(steps, ys, m)))
        if glogs is not None:
            dets.append((None, lambda m: self._outlier_quiet(glogs, m)))
        if g2v is not None and g2v[0]:
            dets.append((self._pre, lambda m: self._pre.advance_logs(*g2v, m)))
        saved = [self._snapshot(d) for d, _ in dets]
        reached = []
        for _, run in dets:
            limit = run(limit)
            reached.append(limit)
        for (d, run), snap, r in zip(dets, saved, reached, strict=True):
            if r > limit:  # an earlier detector went past a later one's stop: redo it
                self._restore(d, snap)
                run(limit)
        if limit:
            self._nf._s["bad"] = False
        return limit

    def _snapshot(self, det: Any) -> Any:
        if det is None:
            return dict(self._out)
        if det is self._spike:
            return copy.copy(det._s)
        return {k: (list(v) if isinstance(v, list) else v) for k, v in det._s.items()}

    def _restore(self, det: Any, snap: Any) -> None:
        if det is None:
            self._out = snap
        else:
            det._s = snap

    def _loss(self, step: int, loss: float) -> list[StackIncident]:
        out = []
        open_before = self._spike._s.excursion
        alarm = self._spike.update(step, loss)
        if open_before is not None and alarm is None and self._spike._s.excursion is None:
            closed = self._spike._s.excursions[-1]
            if not closed["recovered"] and (self._jump.watching
                                            or not self.config.jump.enabled):
                # closed by patience: the loss did not come back (and no jump raised it)
                out.append(StackIncident(step, "divergence", closed["onset"], loss,
                                         closed["baseline"], loss / closed["baseline"]))
        if alarm is not None:
            out.append(StackIncident(step, "spike", alarm.onset, alarm.value, alarm.baseline,
                                     alarm.score))
            p = self._periodic.update(step)
            if p is not None:
                out.append(StackIncident(step, "periodic-spikes", p.onset, p.value,
                                         math.nan, p.score))
        d = self._div.update(step, loss)
        if d is not None and any(i.kind == "divergence" for i in out):
            d = None  # one divergence per record
        if d is not None and self.config.jump.enabled and not self._jump.watching:
            d = None  # the jump rule already raised this regime
        if d is not None:
            out.append(StackIncident(step, "divergence", d.onset, d.value, d.baseline, d.score))
        return out

    # ------------------------------------------------------------------ reading
    @property
    def in_excursion(self) -> bool:
        """Whether the loss is in an alarmed spike excursion now."""
        return self._spike.in_excursion

    @property
    def excursions(self) -> list[Excursion]:
        """Spike excursions so far, oldest first (an unfinished one has ``end=None``)."""
        return self._spike.excursions

    @property
    def grad_stats(self) -> tuple[float, float]:
        """(mean, standard deviation) of log gradient norm over the non-outlier records."""
        return self._out["mean"], max(math.sqrt(self._out["var"]),
                                      self.config.outlier.sigma_min)

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (config, every detector, the incidents so far)."""
        return {"config": self.config.to_dict(), "spike": self._spike.state_dict(),
                "divergence": self._div.state_dict(), "nonfinite": self._nf.state_dict(),
                "periodic": self._periodic.state_dict(), "precursor": self._pre.state_dict(),
                "outlier": dict(self._out), "jump": self._jump.state_dict(),
                "incidents": [asdict(i) for i in self.incidents]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        state = copy.deepcopy(state)
        self.config = StackConfig.from_dict(state["config"])
        self._spike.load_state_dict(state["spike"])
        self._div.load_state_dict(state["divergence"])
        self._nf.load_state_dict(state["nonfinite"])
        self._periodic.load_state_dict(state["periodic"])
        self._pre.load_state_dict(state["precursor"])
        self._out = dict(state["outlier"])
        self._jump = JumpDetector(self.config.jump)
        if "jump" in state:
            self._jump.load_state_dict(state["jump"])
        self.incidents = [StackIncident(**i) for i in state["incidents"]]


def replay(trace: Any, *, config: StackConfig | None = None) -> DetectorStack:
    """Feed a stored :class:`~stablestep.diagnosis.trace.Trace` through a fresh stack, record
    by record, exactly as the guard fed it live: ``loss``, ``grad_norm`` (where recorded),
    non-finite marks (``trace.nonfinite_steps`` and ``grad_nonfinite > 0``, the last
    recorded value holding until the next) and ``g2v_rms``.
    Returns the stack (``.incidents``, ``.excursions``).

    Stretches of ordinary records (every detector learning, none raising) go through the
    detectors' fast paths (``advance_quiet``: the same arithmetic without a call per record
    and detector; a 1M-step store in seconds), every other record through
    :meth:`DetectorStack.update`; the incidents and the final state are the same, bit for
    bit, as feeding every record to :meth:`DetectorStack.update`."""
    import numpy as np

    stack = DetectorStack(config)
    gn = trace.metric("grad_norm")
    gnf = trace.metric("grad_nonfinite")
    g2v = trace.metric(G2V_RMS)
    steps, losses = trace.steps.tolist(), trace.loss.tolist()
    if gnf is not None:  # grad_nonfinite is recorded every state_every steps: between two
        held = np.where(np.isfinite(gnf), gnf, np.nan)  # records the last one holds (one
        idx = np.where(np.isfinite(held), np.arange(len(held)), -1)  # run of non-finite
        idx = np.maximum.accumulate(idx)  # gradients is one incident, not one per record)
        gnf = np.where(idx >= 0, held[np.maximum(idx, 0)], 0.0)
    n = len(steps)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(trace.loss) & (trace.loss > 0)
        if trace.nonfinite_steps:
            ok &= ~np.isin(trace.steps, np.fromiter(trace.nonfinite_steps, dtype=np.int64))
        if gnf is not None:
            ok &= ~(gnf > 0)
        if gn is not None:
            ok &= ~np.isinf(gn)
    # where the next record the fast path may not take lies, from each index on
    bad_at = np.flatnonzero(~ok).tolist() + [n]
    gl = gfed = None
    if gn is not None:
        with np.errstate(invalid="ignore"):
            gfed = np.isfinite(gn) & (gn > 0)
        gl = gn.tolist()
    g2pos, g2log = [], []
    if g2v is not None:
        with np.errstate(invalid="ignore"):
            g2pos = np.flatnonzero(np.isfinite(g2v) & (g2v > 0))
        g2log = list(map(math.log, g2v[g2pos].tolist()))
        g2pos = g2pos.tolist()
    log = math.log
    chunk, nb, i, p2 = 64, 0, 0, 0
    while i < n:
        while bad_at[nb] < i:
            nb += 1
        end = min(bad_at[nb], i + chunk)
        if end > i and stack._quiet():
            glogs = None
            if gl is not None:
                part = gl[i:end]
                glogs = (list(map(log, part)) if gfed[i:end].all()
                         else [log(g) if f else None for g, f in zip(part, gfed[i:end].tolist(),
                                                                     strict=True)])
            g2 = None
            if g2v is not None:
                p2 = bisect.bisect_left(g2pos, i, p2)
                q2 = bisect.bisect_left(g2pos, end, p2)
                g2 = ([k - i for k in g2pos[p2:q2]], g2log[p2:q2])
            fed = stack._advance_quiet(steps[i:end], losses[i:end], trace.loss[i:end], glogs,
                                       g2)
            i += fed
            if i == end:  # the whole chunk was ordinary: take a longer one next
                chunk = min(chunk * 2, 1 << 16)
                continue
            chunk = 64  # record i would raise or change a mode: update() takes it
        st, loss = steps[i], losses[i]
        bad = st in trace.nonfinite_steps or (gnf is not None and gnf[i] > 0)
        g = None if gn is None else float(gn[i])
        m = None
        if g2v is not None and math.isfinite(g2v[i]):
            m = {G2V_RMS: float(g2v[i])}
        stack.update(st, loss, grad_norm=g, nonfinite=bool(bad), metrics=m)
        i += 1
    return stack
