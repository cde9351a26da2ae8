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
from stablestep.diagnosis.spike import Excursion, SpikeConfig, SpikeDetector

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
class StackConfig:
    """Settings of :class:`DetectorStack`: one config per detector, all explicit."""

    spike: SpikeConfig = field(default_factory=SpikeConfig)
    divergence: DivergenceConfig = field(default_factory=lambda: DivergenceConfig(
        factor=100.0, min_steps=3, smooth=5))
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    periodic: PeriodicConfig = field(default_factory=PeriodicConfig)

    def __post_init__(self) -> None:
        for name, cls in (("spike", SpikeConfig), ("divergence", DivergenceConfig),
                          ("outlier", OutlierConfig), ("periodic", PeriodicConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form."""
        return {k: asdict(getattr(self, k)) for k in ("spike", "divergence", "outlier",
                                                       "periodic")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(spike=SpikeConfig(**d["spike"]), divergence=DivergenceConfig(**d["divergence"]),
                   outlier=OutlierConfig(**d["outlier"]), periodic=PeriodicConfig(**d["periodic"]))


@dataclass(frozen=True)
class StackIncident:
    """One incident: ``step`` the stack raised it at, ``kind`` (see :data:`KINDS`),
    ``onset`` where it began, the ``value`` that raised it, the ``baseline`` it was
    measured against and the ``score`` (excess in the detector's own units)."""

    step: int
    kind: str
    onset: int
    value: float
    baseline: float
    score: float

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
        if not bad and math.isfinite(gn) and gn > 0:
            inc = self._outlier(step, gn)
            if inc is not None:
                out.append(inc)
        if math.isfinite(loss):
            out.extend(self._loss(step, loss))
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

    def _loss(self, step: int, loss: float) -> list[StackIncident]:
        out = []
        open_before = self._spike._s.excursion
        alarm = self._spike.update(step, loss)
        if open_before is not None and alarm is None and self._spike._s.excursion is None:
            closed = self._spike._s.excursions[-1]
            if not closed["recovered"]:  # closed by patience: the loss did not come back
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
                "outlier": dict(self._out),
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
        self.incidents = [StackIncident(**i) for i in state["incidents"]]


def replay(trace: Any, *, config: StackConfig | None = None) -> DetectorStack:
    """Feed a stored :class:`~stablestep.diagnosis.trace.Trace` through a fresh stack, record
    by record, exactly as the guard fed it live: ``loss``, ``grad_norm`` (where recorded),
    non-finite marks (``trace.nonfinite_steps`` and ``grad_nonfinite > 0``) and ``g2v_rms``.
    Returns the stack (``.incidents``, ``.excursions``)."""
    stack = DetectorStack(config)
    gn = trace.metric("grad_norm")
    gnf = trace.metric("grad_nonfinite")
    g2v = trace.metric(G2V_RMS)
    for i, (st, loss) in enumerate(zip(trace.steps.tolist(), trace.loss.tolist(), strict=True)):
        bad = st in trace.nonfinite_steps or (gnf is not None and gnf[i] > 0)
        g = None if gn is None else float(gn[i])
        m = None
        if g2v is not None and math.isfinite(g2v[i]):
            m = {G2V_RMS: float(g2v[i])}
        stack.update(st, loss, grad_norm=g, nonfinite=bool(bad), metrics=m)
    return stack
