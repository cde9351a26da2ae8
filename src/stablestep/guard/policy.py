r"""What the guard does and when: :class:`GuardPolicy`, and :class:`GuardRecord`, one action.

Every threshold is explicit and validated at construction with an exact message. The
defaults are meant to leave a healthy run alone (no action at all) and to act on the
failures of DESIGN.md: non-finite values, gradient outliers (a skip), divergence (a
rollback), and Adam's adaptive edge of stability (repeated self-recovering spikes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from stablestep.diagnosis.infer import RESTART_TOLERANCE
from stablestep.diagnosis.stack import StackConfig

REMEDIES = ("amsgrad", "eps", "lr")
ACTIONS = ("skip", "clip", "rollback", "adapt", "restore", "hold")


@dataclass(frozen=True, kw_only=True)
class GuardPolicy:
    r"""Settings of :class:`stablestep.guard.Guard` (keyword-only, validated).

    What the guard *sees* is the incidents of the one detector stack
    (:class:`~stablestep.diagnosis.stack.DetectorStack`, configured by ``stack``; the same
    stack ``diagnose`` replays on the stored run). What it *does* with them:

    - **non-finite** loss or gradients: skip the step (``skip_nonfinite``), so no NaN
      reaches Adam's moments; ``max_nonfinite_run`` in a row roll back. Parameters or
      optimizer state non-finite: roll back at once (skipping cannot mend them). Read as one
      norm per tensor in the same host sync: the parameters every ``state_check_every``
      steps, and the parameters and optimizer state before every snapshot (a snapshot is
      taken only when they are all finite, so a rollback target never holds a NaN). A NaN
      or Inf in Adam's moments reaches the parameters at the next step
      (:math:`\hat m / (\sqrt{\hat v} + \epsilon)` is NaN or Inf), all but
      :math:`v = +\infty` with :math:`m` finite, which freezes its coordinate and is found
      by the read before the next snapshot. ``None``: no state read (snapshots unchecked).
    - **gradient-outlier** (one batch's gradient norm ``stack.outlier.z`` of *this run's*
      standard deviations above its running mean): ``outlier_action`` ``"skip"`` the step,
      ``"clip"`` its gradient to :math:`\exp(\mu + \text{clip\_z}\,\sigma)`, or ``None``
      (record nothing, do nothing). One noisy batch is at most a skip.
    - **divergence** (the loss not coming back: unrecovered after ``stack.spike.patience``
      records, or its running median ``stack.divergence.factor`` above its minimum and
      still rising): roll back to the newest snapshot before the onset (``rollback``), then
      adapt. With the guard's ``curvature_loss`` (a fixed batch), the loss on that batch is
      measured at each snapshot and at the incident: under 2x its snapshot value, the
      model did not diverge (the batches did), and the guard records ``hold`` instead.
      ``snapshot_every`` calm steps a snapshot is taken (CPU copies,
      ``keep_snapshots`` kept). ``max_rollbacks``: raise :class:`GuardError` after this many
      (``None``: never). A divergence of the stack's level rules (``rule`` ``"jump"``: the
      loss jumped ``stack.jump.factor`` x over its best loss so far and stays there, from
      step 0 on; ``"stays-high"``: it rose ``stack.jump.rearm`` x over its level and stays
      ``stack.jump.stay`` records, or it is still that high ``stack.jump.hold`` records after
      a jump or a rollback) is rolled back the same way and then adapted by the lr alone:
      divided by the lr jump seen at the onset (the cause, named in the record's
      ``lr_jump``), else times ``lr_backoff``, and straight to ``min_lr_scale`` for an onset
      in the first ``stack.jump.warmup`` steps (a blow-up from the start); never under
      ``min_lr_scale``. A regime already rolled back that stays high is cut by
      ``lr_backoff`` again, and with the lr at ``min_lr_scale`` the guard raises
      :class:`GuardError`. What counts as high is the stack's (measured against the run's
      own level: minibatch noise is not a jump), so ``diagnose`` reports the same incidents.
    - **recurring spikes** of Adam (``adapt_after`` spike incidents within
      ``adapt_window`` steps, none within ``stack.spike.window`` steps of a gradient outlier,
      none within ``adapt_cooldown`` steps of the last adaptation, none in the first
      ``stack.spike.window`` steps, while the run's noise is still being learnt): adapt
      (``adapt``).
      A single spike is never acted on.
    - **the user's lr schedule**: a divergence whose onset follows an lr jump back to no
      more than 1.05x the highest lr the run trained at before (a warm restart, a cyclic
      schedule: not a new, higher lr) is recorded as ``hold`` (``lr-schedule-restart``),
      not rolled back, while the loss has given back under ``restart_tolerance`` of the
      run's progress, :math:`(\tilde L_{now} - L_{level}) / (\tilde L_{start} -
      L_{level})` (medians of the first 5 and the last 10 losses; the level before the
      rise): after a warm restart the loss rises and comes back as the lr anneals. Past
      it, or non-finite, the guard acts as for any divergence. ``None``: no exception.

    Adaptation walks ``remedies`` (``"amsgrad"``, ``"eps"``: needs the guard's
    ``curvature_loss``, ``"lr"``: the guard's lr scale times ``lr_backoff``, or less when the
    measured preconditioned sharpness asks for less); remedies that do not apply are passed
    over, and once the ladder is used up ``"lr"`` repeats. It is bounded: the lr scale never
    goes under ``min_lr_scale``; and reversible: after ``restore_after`` steps without a
    spike or divergence incident the lr scale is divided by ``lr_backoff`` (up to 1), one
    step at a time. The lr scale is part of the guard's state, never written into the
    optimizer's, so it cannot compound across a resume.
    """

    skip_nonfinite: bool = True
    outlier_action: Literal["skip", "clip"] | None = "skip"
    clip_z: float = 3.0
    snapshot_every: int = 100
    keep_snapshots: int = 2
    rollback: bool = True
    max_nonfinite_run: int = 5
    state_check_every: int | None = 10
    max_rollbacks: int | None = 20
    adapt: bool = True
    adapt_after: int = 3
    adapt_window: int = 2000
    adapt_cooldown: int = 100
    remedies: tuple[str, ...] = REMEDIES
    lr_backoff: float = 0.5
    min_lr_scale: float = 1.0 / 16
    restore_after: int | None = 500
    restart_tolerance: float | None = RESTART_TOLERANCE
    stack: StackConfig = field(default_factory=StackConfig)

    def __post_init__(self) -> None:
        if self.outlier_action not in ("skip", "clip", None):
            raise ValueError(
                f"Invalid outlier_action: {self.outlier_action!r} (expected 'skip', 'clip' "
                "or None)")
        if not self.clip_z > 0:
            raise ValueError(f"Invalid clip_z: {self.clip_z} (need > 0)")
        for name, low in (("snapshot_every", 1), ("keep_snapshots", 1),
                          ("max_nonfinite_run", 1), ("adapt_after", 1), ("adapt_window", 1),
                          ("adapt_cooldown", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Invalid {name}: {value!r} (need an int >= {low})")
        for name in ("max_rollbacks", "state_check_every", "restore_after"):
            value = getattr(self, name)
            low = 0 if name == "max_rollbacks" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < low):
                raise ValueError(f"Invalid {name}: {value!r} (need an int >= {low} or None)")
        if self.restart_tolerance is not None and not (
                isinstance(self.restart_tolerance, (int, float))
                and not isinstance(self.restart_tolerance, bool)
                and 0 < self.restart_tolerance and math.isfinite(self.restart_tolerance)):
            raise ValueError(f"Invalid restart_tolerance: {self.restart_tolerance!r} (need a "
                             "number > 0 or None)")
        if not 0 < self.lr_backoff < 1:
            raise ValueError(f"Invalid lr_backoff: {self.lr_backoff} (need 0 < lr_backoff < 1)")
        if not 0 < self.min_lr_scale <= 1:
            raise ValueError(f"Invalid min_lr_scale: {self.min_lr_scale} (need 0 < "
                             "min_lr_scale <= 1)")
        if isinstance(self.remedies, str):
            raise ValueError(f"Invalid remedies: {self.remedies!r} (need a tuple of names)")
        for r in self.remedies:
            if r not in REMEDIES:
                raise ValueError(f"Invalid remedy: {r!r} (expected one of "
                                 f"{', '.join(map(repr, REMEDIES))})")
        if not isinstance(self.stack, StackConfig):
            raise TypeError("stack must be a stablestep.diagnosis.stack.StackConfig")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for checkpoints and run configs)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["remedies"] = list(self.remedies)
        d["stack"] = self.stack.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardPolicy:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["stack"] = StackConfig.from_dict(d["stack"])
        d["remedies"] = tuple(d["remedies"])
        return cls(**d)


@dataclass(frozen=True)
class GuardRecord:
    """One action of the guard: ``step`` (the guard's step counter, see
    :attr:`Guard.step`), ``action`` (``skip``, ``clip``, ``rollback``, ``adapt``,
    ``restore``, ``hold``), ``reason`` (``non-finite``, ``gradient-outlier``, ``divergence``,
    ``repeated-non-finite``, ``non-finite-state``, ``adaptive-edge-of-stability``,
    ``after-rollback``, ``healthy``, ``divergence-not-on-probe-batch``,
    ``lr-schedule-restart``) and ``data``: the
    numbers behind it (plain floats/ints/strings)."""

    step: int
    action: str
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"step", "action", "reason", **data}`` (the Monitor event's payload)."""
        return {"step": self.step, "action": self.action, "reason": self.reason, **self.data}


class GuardError(RuntimeError):
    """The guard cannot keep the run alive (e.g. ``max_rollbacks`` exceeded)."""
