r"""The spike detector: finds loss spikes at their onset, O(1) work and memory per step.

Each detector (here and in :mod:`stablestep.diagnosis.detectors`) is fed one record
at a time (``update(step, value)``), returns an :class:`Alarm` or ``None``, and
round-trips through ``state_dict()`` / ``load_state_dict()`` so a resumed run continues
identically. Printing, raising and
acting are someone else's job (the diagnosis, the guard, the CLI).

The spike detector works on :math:`y_t = \log \ell_t` (a spike is multiplicative) and
keeps exponential moving statistics with span ``window``
(:math:`\alpha = \max(2/(w+1), 1/(n+1))` after :math:`n` records: a plain mean until
the EMA fills, so nothing lags the first fast fall of the loss):

.. math::

    d_t = y_t - y_{t-1},\quad \tau_t = \tau_{t-1} + \alpha (d_t - \tau_{t-1}),\quad
    \mu_t = \mu_{t-1} + \tau_t + \alpha (y_t - \mu_{t-1} - \tau_t),\quad
    s_t = s_{t-1} + \alpha (2\max(d_t^+ - \tau_{t-1}^+, 0) - s_{t-1})

(trend; a level that follows the trend as in Holt's smoothing, so it does not lag a
falling loss; noise as twice the mean one-step *rise* beyond a rising trend, winsorised at
``max(4 s, jump)`` after warmup, so a fast-falling loss does not blunt the
detector). An instability grows geometrically over several steps before it is large,
so the detector measures the excess over the *start of the current rise*:
:math:`e_t = y_t - b_t`, :math:`b_t = \max(y_{\text{rise start}}, \mu - 2 s)` (a low
more than two noise units under the level is taken as noise, not as the start),
and alarms when :math:`e_t \ge \max(\text{min\_rise}, z\,s)` and the rise is confirmed
(two rising records in a row, or a single jump :math:`e_t \ge` ``jump``). Statistics are
frozen during an excursion, which ends when the loss is back within
``max(min_rise, recover * peak excess)`` of the baseline, and for ``window/2`` records of
aftermath, in which a rise of ``nested_rise`` from the lowest loss since the recovery
(confirmed by two rising records, and above ``z s``) is a new spike: Adam's edge of
stability rings after a spike. Inside an excursion, the same rise from the trough after
the peak is a new spike too.
"""


from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alarm:
    """One detection: ``step`` the detector fired at, ``onset`` where the incident began."""

    step: int
    onset: int
    kind: str
    value: float
    baseline: float
    score: float


@dataclass(frozen=True)
class SpikeConfig:
    """Settings of :class:`SpikeDetector` (log-loss units: 0.05 is a 5% rise).

    ``window``: span of the moving statistics (records); ``warmup``: records before any
    alarm; ``z``: alarm threshold in noise units; ``min_rise``: smallest rise that counts
    (``log 1.1``: the 10% by which the benchmark's labels define an episode; at 0.05,
    5-9% wobbles of a flat loss and Adam's early overshoot raised alarms);
    ``jump``: a single-record rise that needs no confirmation; ``recover``: share of the
    peak excess the loss must fall back under to end an excursion; ``patience``: records
    after which an unrecovered excursion is closed as a new regime; ``nested_rise``: rise
    from the trough that makes a new spike while the loss rings after one; ``settle``:
    a rise that begins before this *step* (counted from the start of training, not from
    the first record) raises no alarm until it reaches ``jump``: Adam's and heavy ball's
    first steps overshoot the first minimum the loss falls into by 10-25% (an early
    transient, not an incident), while an early blow-up soon passes 1.5x.
    ``mad_z``: a robust gate against minibatch noise: the rise over the median of the
    5 records before the rise began must also be ``mad_z`` robust standard deviations of
    this run's batch-to-batch spread, :math:`\\sigma = 1.4826\\,\\mathrm{MAD}(d^2)/\\sqrt 6`
    over the second differences :math:`d^2_t = y_t - 2y_{t-1} + y_{t-2}` of the last
    ``mad_window`` calm records (outside spikes and their ringing). Second differences
    cancel a smooth trend, so a full-batch loss has :math:`\\sigma \\approx 0` and the
    gate only speaks where batches are noisy; 0 turns it off.
    """

    window: int = 50
    warmup: int = 10
    z: float = 8.0
    min_rise: float = 0.0953  # log(1.1)
    jump: float = 0.4
    recover: float = 0.5
    patience: int = 200
    nested_rise: float = 0.08
    settle: int = 20
    mad_z: float = 12.0
    mad_window: int = 30

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"Invalid window: {self.window} (need >= 2)")
        if self.warmup < 0:
            raise ValueError(f"Invalid warmup: {self.warmup} (need >= 0)")
        if self.settle < 0:
            raise ValueError(f"Invalid settle: {self.settle} (need >= 0)")
        for name in ("z", "min_rise", "jump"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (need > 0)")
        if not 0 < self.recover < 1:
            raise ValueError(f"Invalid recover: {self.recover} (need 0 < recover < 1)")


@dataclass
class Excursion:
    """An episode of the loss above its baseline, from onset to recovery (or not)."""

    onset: int
    detected: int
    baseline: float  # loss units
    peak: float
    peak_step: int
    end: int | None = None
    recovered: bool = False
    jump: bool = False
    trough: float = math.inf  # lowest log-loss since the peak
    trough_step: int = -1
    follows: bool = False  # began inside the previous excursion or its aftermath


@dataclass
class _SpikeState:
    n: int = 0
    prev_y: float = math.nan
    prev2_y: float = math.nan
    level: float = math.nan
    trend: float = 0.0
    noise: float = 0.0
    rise_start_y: float = math.nan
    rise_start_step: int = -1
    rise_len: int = 0
    prev_step: int = -1
    excursion: dict | None = None
    excursions: list = field(default_factory=list)
    after_left: int = 0  # records left in the aftermath of the last spike
    after_trough: float = math.inf
    after_base: float = math.nan
    recent: list = field(default_factory=list)  # the last mad_window + 1 log-losses


def median(xs: Any) -> float:
    """The median of a non-empty sequence (the mean of the two middle values for an even
    count): the one definition the detectors, the stack and the guard use."""
    v = sorted(xs)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class SpikeDetector:
    """Find loss spikes at their onset (see module docstring for the statistics).

    Example::

        det = SpikeDetector(SpikeConfig(window=50, warmup=10))
        for step, loss in enumerate(losses):
            alarm = det.update(step, loss)
            if alarm: ...
        det.excursions  # every episode with onset, peak and recovery
    """

    def __init__(self, config: SpikeConfig | None = None) -> None:
        self.config = config or SpikeConfig()
        self._s = _SpikeState()

    @property
    def excursions(self) -> list[Excursion]:
        """Finished and ongoing excursions, oldest first."""
        out = [Excursion(**e) for e in self._s.excursions]
        if self._s.excursion is not None:
            out.append(Excursion(**self._s.excursion))
        return out

    @property
    def in_excursion(self) -> bool:
        """Whether the loss is currently in an alarmed excursion."""
        return self._s.excursion is not None

    def update(self, step: int, loss: float) -> Alarm | None:
        """Feed the loss of ``step``; non-finite or non-positive losses are ignored."""
        if not (math.isfinite(loss) and loss > 0):
            return None
        c, s = self.config, self._s
        y = math.log(loss)
        a = max(2.0 / (c.window + 1), 1.0 / (s.n + 1))  # a plain mean until the EMA fills
        if s.n == 0:
            s.n, s.level, s.prev_y, s.rise_start_y, s.prev_step = 1, y, y, y, step
            s.recent = [y]
            s.rise_start_step = step
            return None
        # rising-run bookkeeping
        if y > s.prev_y:
            s.rise_len += 1
            if s.rise_len == 1:
                s.rise_start_y, s.rise_start_step = s.prev_y, step
        else:
            s.rise_len = 0
        alarm = None
        if s.excursion is not None:
            e = s.excursion
            base_y = math.log(e["baseline"])
            excess_peak = math.log(e["peak"]) - base_y
            if y - base_y <= max(c.min_rise, c.recover * excess_peak):
                e["end"], e["recovered"] = step, True
                self._close()
                s.after_left, s.after_trough, s.after_base = c.window // 2, y, e["baseline"]
            elif e["trough_step"] > e["peak_step"] and (
                    y - e["trough"] >= max(c.jump, c.z * s.noise)
                    or (s.rise_len >= 2
                        and y - e["trough"] >= max(c.nested_rise, c.z * s.noise))):
                # a new spike on the way down from the previous one (recurring spikes)
                # (the new one keeps the episode's baseline, so recovery means back to it)
                e["end"] = step
                self._close()
                alarm = Alarm(step=step, onset=step, kind="spike", value=loss,
                              baseline=math.exp(e["trough"]),
                              score=(y - e["trough"]) / max(s.noise, 1e-12))
                s.excursion = asdict(Excursion(onset=step, detected=step, baseline=e["baseline"],
                                               peak=loss, peak_step=step, jump=True,
                                               follows=True))
            elif step - e["detected"] > c.patience:
                e["end"] = step
                self._close()
                s.level, s.trend = y, 0.0
            if s.excursion is not None:
                e = s.excursion
                if y > math.log(e["peak"]):
                    e["peak"], e["peak_step"] = loss, step
                if e["peak_step"] == step or y < e["trough"]:
                    e["trough"], e["trough_step"] = y, step
            self._shift(y, step)
            return alarm
        if s.after_left > 0:  # aftermath of a spike: the loss rings around its baseline
            s.after_left -= 1
            rise = y - s.after_trough
            if (rise >= max(c.jump, c.z * s.noise)
                    or (s.rise_len >= 2 and rise >= max(c.nested_rise, c.z * s.noise))):
                s.after_left = 0
                alarm = Alarm(step=step, onset=step, kind="spike", value=loss,
                              baseline=math.exp(s.after_trough),
                              score=rise / max(s.noise, 1e-12))
                s.excursion = asdict(Excursion(onset=step, detected=step,
                                               baseline=s.after_base, peak=loss,
                                               peak_step=step, jump=True, follows=True))
            s.after_trough = min(s.after_trough, y)
            # the level stays frozen, but the noise keeps learning (winsorised), so an
            # alarm raised before the noise was known cannot lock the detector in alarms
            up = max(max(y - s.prev_y, 0.0) - max(s.trend, 0.0), 0.0)
            s.noise += a * (2.0 * min(up, max(4.0 * s.noise, c.jump)) - s.noise)
            s.n += 1
            self._shift(y, step)
            return alarm  # statistics stay frozen until the ringing is over
        base = max(s.rise_start_y if s.rise_len else s.prev_y, s.level - 2 * s.noise)
        excess = y - base
        thr = max(c.min_rise, c.z * s.noise)
        prev_excess = s.prev_y - base
        confirmed = excess >= c.jump or (s.rise_len >= 2 and prev_excess >= thr / 3)
        is_jump = s.rise_len < 2 or prev_excess < thr / 3
        onset = step if is_jump else s.rise_start_step
        early = onset < c.settle and excess < c.jump  # within the early overshoot
        if s.n >= c.warmup and excess >= thr and confirmed and not early \
                and not self._noise_gate(y):
            alarm = Alarm(step=step, onset=onset, kind="spike", value=loss,
                          baseline=math.exp(base), score=excess / max(s.noise, 1e-12))
            s.excursion = asdict(Excursion(onset=onset, detected=step, baseline=math.exp(base),
                                           peak=loss, peak_step=step, jump=is_jump))
        else:
            d = y - s.prev_y
            # only a real rise beyond a rising trend is noise: a falling loss that
            # decelerates (d > trend, d < 0) says nothing about upward fluctuations
            up = max(max(d, 0.0) - max(s.trend, 0.0), 0.0)
            s.trend += a * (d - s.trend)
            if s.n >= c.warmup:  # winsorise: one odd record moves the noise scale little
                up = min(up, max(4.0 * s.noise, c.jump))
            s.noise += a * (2.0 * up - s.noise)
            s.level += s.trend + a * (y - s.level - s.trend)  # Holt: follows a falling loss
        s.n += 1
        self._shift(y, step)
        return alarm

    @property
    def quiet(self) -> bool:
        """Whether the next record takes :meth:`update`'s ordinary branch (statistics
        learning, no excursion, no aftermath): the only branch :meth:`advance_quiet` runs."""
        s = self._s
        return s.n > 0 and s.excursion is None and s.after_left <= 0

    def advance_quiet(self, steps: list[int], ys: list[float], limit: int) -> int:
        """The fast path of :meth:`update` for a stored trace (``diagnosis.stack.replay``):
        feed records ``0 .. limit-1`` (``steps``, log losses ``ys``, all finite) while
        :attr:`quiet` holds and no alarm would fire; returns how many were fed (the record
        that would alarm is left to :meth:`update`).

        The state afterwards equals :meth:`update`'s on each record, bit for bit: what
        depends on the losses alone (the rising run, its start, the one-step rises) is
        computed with numpy's exact comparisons and subtractions, and the moving
        statistics with :meth:`update`'s operations in the same order in locals (``max(a,
        b)`` written ``b if b > a else a``, which is what ``max`` returns;
        ``tests/diagnosis/test_replay_fast.py`` compares the states)."""
        if not self.quiet or limit <= 0:
            return 0
        import numpy as np

        c, s = self.config, self._s
        y_arr = np.asarray(ys[:limit], dtype=np.float64)
        prev_arr = np.empty(limit)
        prev_arr[0] = s.prev_y
        prev_arr[1:] = y_arr[:-1]
        k = np.arange(limit)
        falls = np.where(~(y_arr > prev_arr), k, -1)
        last_fall = np.maximum.accumulate(falls)
        rl_arr = np.where(last_fall >= 0, k - last_fall, s.rise_len + k + 1)
        starts = np.maximum.accumulate(np.where(rl_arr == 1, k, -1))
        step_arr = np.asarray(steps[:limit], dtype=np.int64)
        rsy_arr = np.where(starts >= 0, prev_arr[np.maximum(starts, 0)], s.rise_start_y)
        rss_arr = np.where(starts >= 0, step_arr[np.maximum(starts, 0)], s.rise_start_step)
        b0_arr = np.where(rl_arr > 0, rsy_arr, prev_arr)
        d_arr = y_arr - prev_arr
        n, level, trend, noise = s.n, s.level, s.trend, s.noise
        aw = 2.0 / (c.window + 1)
        warmup, z, min_rise, jump = c.warmup, c.z, c.min_rise, c.jump
        b0s, ds = b0_arr.tolist(), d_arr.tolist()
        i = 0
        while i < limit:
            y, b0, d = ys[i], b0s[i], ds[i]
            steady = n >= warmup and not 1.0 / (n + 1) > aw  # a == aw from here on
            if steady:
                break
            b1 = level - 2 * noise
            base = b1 if b1 > b0 else b0
            excess = y - base
            zn = z * noise
            thr = zn if zn > min_rise else min_rise
            if n >= warmup and excess >= thr and self._alarms(
                    excess, thr, int(rl_arr[i]), ys[i - 1] if i else s.prev_y, base,
                    steps[i], int(rss_arr[i])):
                break
            inv = 1.0 / (n + 1)
            a = inv if inv > aw else aw
            dp = 0.0 if 0.0 > d else d
            up = dp - (0.0 if 0.0 > trend else trend)
            up = 0.0 if 0.0 > up else up
            trend += a * (d - trend)
            if n >= warmup:
                cap = 4.0 * noise
                cap = jump if jump > cap else cap
                up = cap if cap < up else up
            noise += a * (2.0 * up - noise)
            level += trend + a * (y - level - trend)
            n += 1
            i += 1
        else:
            steady = False
        if steady:  # the statistics' steady state: a fixed rate, the noise capped
            a = aw
            # an alarm needs y - base >= min_rise, and base >= b0: where y - b0 is under
            # min_rise no test is needed (the rise from the run's start is too small)
            near = (y_arr[i:] - b0_arr[i:] >= min_rise).tolist()
            dps = np.where(0.0 > d_arr[i:], 0.0, d_arr[i:]).tolist()  # max(d, 0.0)
            for y, d, dp, test in zip(ys[i:limit], ds[i:], dps, near, strict=True):
                if test:
                    b0 = b0s[i]
                    b1 = level - 2 * noise
                    base = b1 if b1 > b0 else b0
                    zn = z * noise
                    thr = zn if zn > min_rise else min_rise
                    if y - base >= thr and self._alarms(
                            y - base, thr, int(rl_arr[i]), ys[i - 1] if i else s.prev_y, base,
                            steps[i], int(rss_arr[i])):
                        break
                up = dp - (0.0 if 0.0 > trend else trend)
                if 0.0 > up:
                    up = 0.0
                trend += a * (d - trend)
                cap = 4.0 * noise
                if jump > cap:
                    cap = jump
                if cap < up:
                    up = cap
                noise += a * (2.0 * up - noise)
                level += trend + a * (y - level - trend)
                i += 1
        fed = i
        if fed:
            s.n = s.n + fed
            s.prev2_y = ys[fed - 2] if fed >= 2 else s.prev_y
            s.prev_y, s.prev_step = ys[fed - 1], steps[fed - 1]
            s.level, s.trend, s.noise = level, trend, noise
            s.rise_len = int(rl_arr[fed - 1])
            s.rise_start_y = float(rsy_arr[fed - 1])
            s.rise_start_step = int(rss_arr[fed - 1])
            s.recent = (s.recent + ys[:fed])[-(c.mad_window + 1):]  # calm records: _shift
        return fed

    def _alarms(self, excess: float, thr: float, rise_len: int, prev_y: float, base: float,
                step: int, rise_start_step: int) -> bool:
        """:meth:`update`'s alarm test past its threshold (confirmed, not an early
        overshoot), for :meth:`advance_quiet`."""
        c = self.config
        prev_excess = prev_y - base
        confirmed = excess >= c.jump or (rise_len >= 2 and prev_excess >= thr / 3)
        is_jump = rise_len < 2 or prev_excess < thr / 3
        onset = step if is_jump else rise_start_step
        return confirmed and not (onset < c.settle and excess < c.jump)

    def _noise_gate(self, y: float) -> bool:
        """Whether a rise to ``y`` is within this run's batch-to-batch spread (the
        ``mad_z`` gate of :class:`SpikeConfig`), measured on the records before it."""
        c, r = self.config, self._s.recent
        if c.mad_z <= 0 or len(r) < 8:
            return False
        def spread(d: list[float], k: float) -> float:
            md = median(d)
            return 1.4826 * median([abs(x - md) for x in d]) / math.sqrt(k)

        # iid noise: first and second differences give the same sigma; a smooth trend
        # (a fast fall at the start) inflates the first, not the second
        sigma = min(spread([r[i] - r[i - 1] for i in range(1, len(r))], 2.0),
                    spread([r[i] - 2 * r[i - 1] + r[i - 2] for i in range(2, len(r))], 6.0))
        before = r[:max(1, len(r) - self._s.rise_len + 1)] if self._s.rise_len else r
        ref = min(median(before[-5:]), self._s.level)  # the level follows a fast fall
        return y - ref < c.mad_z * sigma

    def _shift(self, y: float, step: int) -> None:
        self._s.prev2_y, self._s.prev_y, self._s.prev_step = self._s.prev_y, y, step
        if self._s.excursion is None and self._s.after_left == 0:  # calm records only,
            self._s.recent.append(y)  # like the other statistics: a spike and its ringing
            del self._s.recent[:-(self.config.mad_window + 1)]  # are not batch noise

    def _close(self) -> None:
        self._s.excursions.append(self._s.excursion)
        self._s.excursion = None
        self._s.rise_len = 0

    def finish(self) -> list[Excursion]:
        """Return all excursions (an unfinished one keeps ``end=None``)."""
        return self.excursions

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        st = asdict(self._s)
        return {"config": asdict(self.config), "state": st}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.config = SpikeConfig(**state["config"])
        st = dict(state["state"])
        st["excursions"] = [dict(e) for e in st["excursions"]]
        st["excursion"] = dict(st["excursion"]) if st["excursion"] is not None else None
        self._s = _SpikeState(**st)
