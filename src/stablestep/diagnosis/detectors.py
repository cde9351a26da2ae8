"""Online detectors besides the spike detector: divergence, non-finite values, periodic
spiking and telemetry precursors. O(1) work and memory per step, explicit windows and
thresholds, ``state_dict()`` / ``load_state_dict()`` for a resumed run; each returns an
:class:`Alarm` or ``None`` and never prints or raises on a finding.

The spike detector, with the statistics it keeps, is in :mod:`stablestep.diagnosis.spike`
(re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from stablestep.diagnosis.spike import Alarm, Excursion, SpikeConfig, SpikeDetector

__all__ = [
    "Alarm", "DivergenceConfig", "DivergenceDetector", "Excursion", "NonFiniteDetector",
    "PeriodicConfig", "PeriodicDetector", "PrecursorDetector", "SpikeConfig", "SpikeDetector",
]


@dataclass(frozen=True)
class DivergenceConfig:
    """Settings of :class:`DivergenceDetector`.

    ``factor``: loss growth over the running minimum that counts as divergence;
    ``min_steps``: records the growth must be sustained over; ``window``: span of the
    minimum's memory (records); ``smooth``: the detector follows the running median of
    the last ``smooth`` log losses (1: the raw loss), so one noisy minibatch is not growth.
    """

    factor: float = 4.0
    min_steps: int = 3
    window: int = 100
    warmup: int = 5
    smooth: int = 1

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise ValueError(f"Invalid factor: {self.factor} (need > 1)")
        if self.min_steps < 1:
            raise ValueError(f"Invalid min_steps: {self.min_steps} (need >= 1)")
        if self.window < 1:
            raise ValueError(f"Invalid window: {self.window} (need >= 1)")
        if self.smooth < 1:
            raise ValueError(f"Invalid smooth: {self.smooth} (need >= 1)")


class DivergenceDetector:
    r"""Sustained geometric growth: the loss has risen ``min_steps`` records in a row and
    stands ``factor`` above its (slowly forgetting) running minimum; with ``smooth`` > 1
    both are taken on the running median of the last ``smooth`` log losses.

    The minimum forgets at rate :math:`1/\text{window}` in log space,
    :math:`m_t = \min(y_t, m_{t-1} + \log(\text{factor}) / \text{window})`, so a slow
    legitimate rise (e.g. a new data phase) is not divergence while a blow-up is.
    Fires once per divergence; re-arms when the loss falls back under the bar.
    """

    def __init__(self, config: DivergenceConfig | None = None) -> None:
        self.config = config or DivergenceConfig()
        self._s: dict[str, Any] = {"n": 0, "min": math.nan, "prev": math.nan,
                                   "rising": 0, "rise_start": -1, "fired": False,
                                   "buf": []}

    def update(self, step: int, loss: float) -> Alarm | None:
        """Feed one loss; ``inf`` counts as growth, ``nan`` is ignored."""
        c, s = self.config, self._s
        if math.isnan(loss) or loss <= 0:
            return None
        y = math.log(loss) if math.isfinite(loss) else math.inf
        if c.smooth > 1:
            buf = s.setdefault("buf", [])
            buf.append(y)
            del buf[:-c.smooth]
            y = sorted(buf)[len(buf) // 2]
        if s["n"] == 0:
            s.update(n=1, min=y, prev=y)
            return None
        if y > s["prev"]:
            if s["rising"] == 0:
                s["rise_start"] = step
            s["rising"] += 1
        else:
            s["rising"] = 0
        bar = s["min"] + math.log(c.factor)
        alarm = None
        if (not s["fired"] and s["n"] >= c.warmup and y >= bar
                and s["rising"] >= c.min_steps):
            s["fired"] = True
            alarm = Alarm(step=step, onset=s["rise_start"], kind="divergence",
                          value=loss, baseline=math.exp(s["min"]), score=y - s["min"])
        elif s["fired"] and y < bar:
            s["fired"] = False
        if not s["fired"]:
            s["min"] = min(y, s["min"] + math.log(c.factor) / c.window)
        s["prev"] = y
        s["n"] += 1
        return alarm

    @property
    def quiet(self) -> bool:
        """Whether :meth:`advance_quiet` may take the next record (seen one, not fired)."""
        return self._s["n"] > 0 and not self._s["fired"]

    def advance_quiet(self, steps: list[int], ys: list[float], limit: int) -> int:
        """The fast path of :meth:`update` for a stored trace (``diagnosis.stack.replay``):
        feed records ``0 .. limit-1`` (``steps``, log losses ``ys``, all finite) while
        :attr:`quiet` holds and no alarm would fire; returns how many were fed.

        The state afterwards equals :meth:`update`'s on each record, bit for bit: the
        running medians are the same selections (``numpy.sort`` of each window, the same
        element picked), the rest is :meth:`update`'s arithmetic in locals
        (``tests/diagnosis/test_replay_fast.py`` compares the states)."""
        if not self.quiet or limit <= 0:
            return 0
        import numpy as np
        from numpy.lib.stride_tricks import sliding_window_view

        c, s = self.config, self._s
        ys = ys[:limit]
        if c.smooth > 1:
            old = list(s.get("buf", []))
            ext = old + ys
            y = np.empty(limit)
            k0 = 0
            while k0 < limit and len(old) + k0 + 1 < c.smooth:  # window still filling
                w = ext[:len(old) + k0 + 1]
                y[k0] = sorted(w)[len(w) // 2]
                k0 += 1
            if k0 < limit:
                a = np.asarray(ext[len(old) + k0 + 1 - c.smooth:], dtype=np.float64)
                y[k0:] = np.sort(sliding_window_view(a, c.smooth), axis=1)[:, c.smooth // 2]
        else:
            y = np.asarray(ys, dtype=np.float64)
        lf = math.log(c.factor)
        lfw = math.log(c.factor) / c.window
        k = np.arange(limit)
        prev = np.empty(limit)
        prev[0] = s["prev"]
        prev[1:] = y[:-1]
        last_flat = np.maximum.accumulate(np.where(~(y > prev), k, -1))
        rising = np.where(last_flat >= 0, k - last_flat, s["rising"] + k + 1)
        starts = np.maximum.accumulate(np.where(rising == 1, k, -1))
        step_arr = np.asarray(steps[:limit], dtype=np.int64)
        rise_start = np.where(starts >= 0, step_arr[np.maximum(starts, 0)], s["rise_start"])
        # the running minimum m_k = min(y_k, m_{k-1} + log(factor)/window): a fixed point,
        # each pass settling one more record of every chain (min() returns the chained
        # value only where it is below y, as here); a long chain finishes record by record
        m = y.copy()
        mprev = np.empty(limit)
        settled = 0
        while settled < limit:
            mprev[0] = s["min"]
            mprev[1:] = m[:-1]
            chained = mprev + lfw
            new = np.where(chained < y, chained, y)
            settled += 1
            if np.array_equal(new, m):
                settled = limit
                break
            m = new
            if settled >= 64:
                for j in range(settled, limit):
                    t = m[j - 1] + lfw
                    m[j] = t if t < y[j] else y[j]
                settled = limit
        mprev[0] = s["min"]
        mprev[1:] = m[:-1]
        alarm = (s["n"] + k >= c.warmup) & (y >= mprev + lf) & (rising >= c.min_steps)
        hit = np.flatnonzero(alarm)
        i = int(hit[0]) if hit.size else limit
        if i:
            if c.smooth > 1:
                s["buf"] = (list(s.get("buf", [])) + ys[:i])[-c.smooth:]
            s["n"] += i
            s["min"], s["prev"] = float(m[i - 1]), float(y[i - 1])
            s["rising"], s["rise_start"] = int(rising[i - 1]), int(rise_start[i - 1])
        return i

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        return {"config": asdict(self.config),
                "state": {**self._s, "buf": list(self._s.get("buf", []))}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.config = DivergenceConfig(**state["config"])
        self._s = dict(state["state"])
        self._s["buf"] = list(self._s.get("buf", []))


class NonFiniteDetector:
    """Fires on the first non-finite record of each run of them (loss, gradient count...)."""

    def __init__(self) -> None:
        self._s: dict[str, Any] = {"bad": False, "count": 0}

    def update(self, step: int, value: float, *, nonfinite: bool = False) -> Alarm | None:
        """``value`` non-finite, or ``nonfinite=True`` (e.g. NaN gradients seen), is bad."""
        bad = nonfinite or not math.isfinite(value)
        alarm = None
        if bad and not self._s["bad"]:
            self._s["count"] += 1
            alarm = Alarm(step=step, onset=step, kind="non-finite", value=value,
                          baseline=math.nan, score=math.inf)
        self._s["bad"] = bad
        return alarm

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        return dict(self._s)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self._s = dict(state)


@dataclass(frozen=True)
class PeriodicConfig:
    """Settings of :class:`PeriodicDetector`: spikes needed, and the largest coefficient
    of variation of the intervals still called (approximately) periodic."""

    min_spikes: int = 4
    max_cv: float = 1.0

    def __post_init__(self) -> None:
        if self.min_spikes < 3:
            raise ValueError(f"Invalid min_spikes: {self.min_spikes} (need >= 3)")
        if not self.max_cv > 0:
            raise ValueError(f"Invalid max_cv: {self.max_cv} (need > 0)")


class PeriodicDetector:
    r"""Recurring spikes: period and regularity from the spike times, O(1) per spike.

    Intervals :math:`\Delta_i` between consecutive spikes are summarised with Welford's
    running mean and variance; ``period`` is the mean interval and ``cv`` its
    coefficient of variation :math:`\sigma_\Delta/\bar\Delta` (0 = perfectly periodic).
    """

    def __init__(self, config: PeriodicConfig | None = None) -> None:
        self.config = config or PeriodicConfig()
        self._s: dict[str, Any] = {"count": 0, "last": None, "first": None, "mean": 0.0,
                                   "m2": 0.0, "fired": False}

    @property
    def count(self) -> int:
        """Spikes seen."""
        return int(self._s["count"])

    @property
    def period(self) -> float:
        """Mean interval between spikes (steps); ``nan`` before two spikes."""
        return self._s["mean"] if self._s["count"] >= 2 else math.nan

    @property
    def cv(self) -> float:
        """Coefficient of variation of the intervals; ``nan`` before three spikes."""
        k = self._s["count"] - 1
        if k < 2 or self._s["mean"] <= 0:
            return math.nan
        return math.sqrt(self._s["m2"] / (k - 1)) / self._s["mean"]

    def update(self, spike_step: int) -> Alarm | None:
        """Register a spike at ``spike_step``; fires once the pattern is established."""
        s = self._s
        if s["last"] is not None:
            d = float(spike_step - s["last"])
            k = s["count"]  # intervals after this one
            delta = d - s["mean"]
            s["mean"] += delta / k
            s["m2"] += delta * (d - s["mean"])
        else:
            s["first"] = spike_step
        s["last"] = spike_step
        s["count"] += 1
        c = self.config
        if not s["fired"] and s["count"] >= c.min_spikes and self.cv <= c.max_cv:
            s["fired"] = True
            return Alarm(step=spike_step, onset=s["first"], kind="periodic-spikes",
                         value=self.period, baseline=math.nan, score=self.cv)
        return None

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        return {"config": asdict(self.config), "state": dict(self._s)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.config = PeriodicConfig(**state["config"])
        self._s = dict(state["state"])


class PrecursorDetector:
    r"""Early warning on a positive telemetry signal (``g2v_rms``, ``eff_step_max``...):
    fires when :math:`\log x_t` exceeds its running mean by ``z`` mean absolute deviations
    (and by at least ``min_rise``), after ``warmup`` records. Statistics are EMAs of span
    ``window``, not updated by alarmed records."""

    def __init__(self, *, window: int = 50, warmup: int = 10, z: float = 8.0,
                 min_rise: float = math.log(3.0)) -> None:
        if window < 2:
            raise ValueError(f"Invalid window: {window} (need >= 2)")
        self.window, self.warmup, self.z, self.min_rise = window, warmup, z, min_rise
        self._s: dict[str, Any] = {"n": 0, "mean": 0.0, "dev": 0.0}

    def update(self, step: int, value: float) -> Alarm | None:
        """Feed one value; non-finite or non-positive values are ignored."""
        if not (math.isfinite(value) and value > 0):
            return None
        s, y = self._s, math.log(value)
        if s["n"] == 0:
            s.update(n=1, mean=y, dev=0.0)
            return None
        excess = y - s["mean"]
        if s["n"] >= self.warmup and excess >= max(self.min_rise, self.z * s["dev"]):
            return Alarm(step=step, onset=step, kind="precursor", value=value,
                         baseline=math.exp(s["mean"]), score=excess / max(s["dev"], 1e-12))
        a = 2.0 / (self.window + 1)
        s["dev"] += a * (abs(excess) - s["dev"])
        s["mean"] += a * excess
        s["n"] += 1
        return None

    def advance_logs(self, positions: list[int], logs: list[float], limit: int) -> int:
        """The fast path of :meth:`update` for a stored trace (``diagnosis.stack.replay``):
        of records ``0 .. limit-1``, those at ``positions`` carry a positive value whose
        log is ``logs``; feed them until one would alarm. Returns how many records were
        fed (the alarming one is left to :meth:`update`). :meth:`update`'s arithmetic in
        locals, bit for bit the same state."""
        s = self._s
        n, mean, dev = s["n"], s["mean"], s["dev"]
        a = 2.0 / (self.window + 1)
        warmup, z, min_rise = self.warmup, self.z, self.min_rise
        fed = limit
        for pos, y in zip(positions, logs, strict=True):
            if pos >= limit:
                break
            if n == 0:
                n, mean, dev = 1, y, 0.0
                continue
            excess = y - mean
            zd = z * dev
            if n >= warmup and excess >= (zd if zd > min_rise else min_rise):
                fed = pos
                break
            dev += a * (abs(excess) - dev)
            mean += a * excess
            n += 1
        s["n"], s["mean"], s["dev"] = n, mean, dev
        return fed

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        return {"window": self.window, "warmup": self.warmup, "z": self.z,
                "min_rise": self.min_rise, "state": dict(self._s)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.window, self.warmup = state["window"], state["warmup"]
        self.z, self.min_rise = state["z"], state["min_rise"]
        self._s = dict(state["state"])
