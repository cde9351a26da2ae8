r"""What the guard does and when: :class:`GuardPolicy`, and :class:`GuardRecord`, one action.

Every threshold is explicit and validated at construction with an exact message. The
defaults are meant to leave a healthy run alone (no action at all) and to act on the
failures of DESIGN.md: non-finite values, gradient outliers, divergence, and Adam's
adaptive edge of stability (repeated self-recovering spikes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from stablestep.diagnosis.detectors import DivergenceConfig, SpikeConfig

REMEDIES = ("amsgrad", "eps", "lr")
ACTIONS = ("skip", "clip", "rollback", "adapt")


@dataclass(frozen=True, kw_only=True)
class GuardPolicy:
    r"""Settings of :class:`stablestep.guard.Guard` (keyword-only, validated).

    Skip / clip (per step):

    - ``skip_nonfinite``: skip a step whose loss or gradients hold a NaN/Inf, so no NaN
      ever reaches Adam's moments.
    - ``outlier_z``: a step is a *gradient outlier* when
      :math:`z_t = (\log\|g_t\| - \mu_{t-1}) / \max(\sigma_{t-1}, \sigma_{\min}) \ge`
      ``outlier_z`` while the previous step was normal (:math:`z_{t-1} <` ``outlier_z/2``; a
      sustained rise is an instability for the loss detectors, not one bad batch).
      :math:`\mu, \sigma^2` are exponential moving mean and variance of :math:`\log\|g\|`
      over accepted steps, span ``stats_window`` (:math:`\alpha = 2/(w+1)`), used after
      ``stats_warmup`` accepted steps; ``sigma_min`` is a floor in log units (0.1: z = 6
      needs at least :math:`e^{0.6} = 1.8\times` the running mean). ``None`` turns it off.
    - ``outlier_action``: ``"skip"`` the step, or ``"clip"`` the gradient norm to
      :math:`\exp(\mu + \text{clip\_z}\,\sigma)` and take it.

    Rollback (to the last good snapshot of model + optimizer state, kept on CPU):

    - ``snapshot_every``: steps between snapshots (taken only while calm: finite loss, no
      spike in progress, step accepted); ``keep_snapshots`` bounds memory (each holds the
      model's parameters and buffers and the optimizer's per-parameter state).
    - ``divergence``: :class:`~stablestep.diagnosis.detectors.DivergenceConfig` (loss
      ``factor`` above its running minimum, rising ``min_steps`` records in a row);
      ``recover_patience``: a spike not recovered within this many steps of its first alarm
      is rolled back too; ``max_nonfinite_run``: this many non-finite steps in a row (the
      parameters themselves may be gone) roll back as well.
    - ``max_rollbacks``: raise :class:`GuardError` after this many rollbacks (``None``:
      never); a run that keeps diverging after every remedy needs a person.

    Adapt (so the same thing does not happen again at the same point):

    - ``adapt``: apply the next remedy after each rollback, and after ``adapt_after``
      spikes of the adaptive-edge-of-stability kind within ``adapt_window`` steps; spikes
      within ``adapt_cooldown`` steps of an adaptation are not counted (the remedy needs
      time to act, and Adam's loss rings for a while after a spike).
    - ``remedies``: the ladder, in order, from ``"amsgrad"`` (turn AMSGrad on, the max
      initialised at the current second moment), ``"eps"`` (raise eps to the value that caps
      the effective step below the stability threshold; needs the guard's
      ``curvature_loss``, skipped without it), ``"lr"`` (multiply the guard's lr scale by
      ``lr_backoff``, or less when the measured preconditioned sharpness asks for less).
      Remedies that do not apply (AMSGrad already on, SGD) are passed over; once the ladder
      is used up ``"lr"`` repeats.
    - ``spike``: :class:`~stablestep.diagnosis.detectors.SpikeConfig` of the loss spike
      detector (shared with the diagnosis).
    """

    skip_nonfinite: bool = True
    outlier_z: float | None = 6.0
    outlier_action: Literal["skip", "clip"] = "skip"
    clip_z: float = 3.0
    stats_window: int = 100
    stats_warmup: int = 20
    sigma_min: float = 0.1
    snapshot_every: int = 100
    keep_snapshots: int = 2
    rollback: bool = True
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    recover_patience: int = 100
    max_nonfinite_run: int = 5
    max_rollbacks: int | None = 20
    adapt: bool = True
    adapt_after: int = 3
    adapt_window: int = 2000
    adapt_cooldown: int = 100
    remedies: tuple[str, ...] = REMEDIES
    lr_backoff: float = 0.5
    spike: SpikeConfig = field(default_factory=SpikeConfig)

    def __post_init__(self) -> None:
        if self.outlier_z is not None and not (
            math.isfinite(self.outlier_z) and self.outlier_z > 0
        ):
            raise ValueError(f"Invalid outlier_z: {self.outlier_z} (need > 0 or None)")
        if self.outlier_action not in ("skip", "clip"):
            raise ValueError(
                f"Invalid outlier_action: {self.outlier_action!r} (expected 'skip' or 'clip')"
            )
        if not self.clip_z > 0:
            raise ValueError(f"Invalid clip_z: {self.clip_z} (need > 0)")
        if not self.sigma_min > 0:
            raise ValueError(f"Invalid sigma_min: {self.sigma_min} (need > 0)")
        for name, low in (("stats_window", 2), ("stats_warmup", 0), ("snapshot_every", 1),
                          ("keep_snapshots", 1), ("recover_patience", 1),
                          ("max_nonfinite_run", 1), ("adapt_after", 1), ("adapt_window", 1),
                          ("adapt_cooldown", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Invalid {name}: {value!r} (need an int >= {low})")
        if self.max_rollbacks is not None and (
            not isinstance(self.max_rollbacks, int) or self.max_rollbacks < 0
        ):
            raise ValueError(f"Invalid max_rollbacks: {self.max_rollbacks!r} (need an int >= 0 "
                             "or None)")
        if not 0 < self.lr_backoff < 1:
            raise ValueError(f"Invalid lr_backoff: {self.lr_backoff} (need 0 < lr_backoff < 1)")
        if isinstance(self.remedies, str):
            raise ValueError(f"Invalid remedies: {self.remedies!r} (need a tuple of names)")
        for r in self.remedies:
            if r not in REMEDIES:
                raise ValueError(f"Invalid remedy: {r!r} (expected one of "
                                 f"{', '.join(map(repr, REMEDIES))})")
        if not isinstance(self.divergence, DivergenceConfig):
            raise TypeError("divergence must be a stablestep.diagnosis.detectors."
                            "DivergenceConfig")
        if not isinstance(self.spike, SpikeConfig):
            raise TypeError("spike must be a stablestep.diagnosis.detectors.SpikeConfig")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for checkpoints and run configs)."""
        from dataclasses import asdict

        d = asdict(self)
        d["remedies"] = list(self.remedies)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardPolicy:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["divergence"] = DivergenceConfig(**d["divergence"])
        d["spike"] = SpikeConfig(**d["spike"])
        d["remedies"] = tuple(d["remedies"])
        return cls(**d)


@dataclass(frozen=True)
class GuardRecord:
    """One action of the guard: ``step`` (the guard's step counter, see
    :attr:`Guard.step`), ``action`` (``skip``, ``clip``, ``rollback``, ``adapt``),
    ``reason`` (``non-finite``, ``gradient-outlier``, ``divergence``,
    ``unrecovered-spike``, ``repeated-non-finite``, ``adaptive-edge-of-stability``,
    ``after-rollback``) and ``data``: the numbers behind it (plain floats/ints/strings)."""

    step: int
    action: str
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"step", "action", "reason", **data}`` (the Monitor event's payload)."""
        return {"step": self.step, "action": self.action, "reason": self.reason, **self.data}


class GuardError(RuntimeError):
    """The guard cannot keep the run alive (e.g. ``max_rollbacks`` exceeded)."""
