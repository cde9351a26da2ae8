"""``MonitorConfig``: the Monitor's settings as one typed, validated value.

The same object configures :class:`stablestep.Monitor` and the framework callbacks
(Keras, Lightning, Hugging Face), so the settings are declared, documented and checked
in one place::

    cfg = MonitorConfig(state_every=50, flush_every=200, overwrite=True)
    monitor = stablestep.Monitor(model, opt, store="runs.db", run="baseline", config=cfg)

The Monitor's keyword arguments (``every=``, ``state_every=``, ...) still work and win
over the fields of ``config``; ``config=`` also still accepts a plain dict, which is the
run config extras (:attr:`MonitorConfig.extra`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stablestep.telemetry._common import check_every

#: ``Run.config`` keys the Monitor writes itself; ``extra`` may not use them.
RESERVED_CONFIG_KEYS = (
    "optimizer",
    "hyper",
    "group_hypers",
    "n_params",
    "torch_version",
    "started_at",
    "monitor",
    "world_size",
)


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """What the Monitor records, how often, and where it writes.

    Attributes:
        every: record ``loss``, ``lr``, ``grad_norm``, ``grad_nonfinite`` every ``every``
            steps (a positive int; default 1).
        state_every: record the update and Adam-state statistics every ``state_every``
            steps (a positive int, or ``None`` for never; default 10).
        top_k: per-tensor statistics for the ``top_k`` worst tensors (an int >= 0).
        quantile_sample: number of coordinates sampled for the effective-step quantiles
            (a positive int; exact when the model has no more coordinates).
        flush_every: write to the store every ``flush_every`` recorded steps.
        flush_seconds: ... or when ``flush_seconds`` seconds have passed (> 0).
        curvature_every: measure curvature every ``curvature_every`` steps (with
            ``curvature_loss``; both or neither).
        curvature_loss: a closure returning the loss on a fixed probe batch.
        secant_every: record the free secant curvature along the update every
            ``secant_every`` steps (at the step after; no Hessian-vector product:
            :mod:`stablestep.telemetry.secant`), or ``None`` for never (default 10; under
            ``torch.distributed`` the one-process value, its dot products summed over
            ranks).
        sinks: extra destinations (``write``/``event``/``close``), e.g.
            :class:`stablestep.telemetry.TensorBoardSink`. Under ``torch.distributed``
            only rank 0 writes to them.
        overwrite: when the run name already exists in the store, replace that run
            (``True``) instead of recording under a new name with a visible suffix.
        extra: JSON-serialisable entries added to ``Run.config`` (e.g. ``scenario``).
        distributed: ``None`` (default) reduces over ``torch.distributed``'s default
            group when it is initialised; ``False`` records this process alone.
        keep_batch: keep a reference to each step's replay closure
            (``monitor.observe(loss, batch=lambda: loss_fn(model(x), y))``) until the next
            step, read one finiteness flag per step, and on the first non-finite loss or
            gradient of an incident replay that step once under
            :func:`stablestep.telemetry.nan_origin.nan_origin` to record where the NaN was
            born (an event of kind ``"nan-origin"``; ``diagnose`` shows it). Default
            ``False``: nothing is kept or read. Under ``torch.distributed`` the replay is
            left to the Guard (its decisions are the same on every rank).
    """

    every: int = 1
    state_every: int | None = 10
    top_k: int = 3
    quantile_sample: int = 65536
    flush_every: int = 100
    flush_seconds: float = 10.0
    curvature_every: int | None = None
    curvature_loss: Callable[[], Any] | None = None
    secant_every: int | None = 10
    sinks: tuple[Any, ...] = ()
    overwrite: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    distributed: bool | None = None
    keep_batch: bool = False

    def __post_init__(self) -> None:
        check_every("every", self.every)
        check_every("state_every", self.state_every, optional=True)
        check_every("flush_every", self.flush_every)
        check_every("curvature_every", self.curvature_every, optional=True)
        check_every("secant_every", self.secant_every, optional=True)
        check_every("quantile_sample", self.quantile_sample)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"Invalid top_k: {self.top_k!r} (an int >= 0)")
        fs = self.flush_seconds
        if (
            isinstance(fs, bool)
            or not isinstance(fs, (int, float))
            or not math.isfinite(fs)
            or fs <= 0
        ):
            raise ValueError(f"Invalid flush_seconds: {fs!r} (a finite number > 0)")
        if (self.curvature_every is None) != (self.curvature_loss is None):
            raise ValueError("curvature_every and curvature_loss must be given together")
        if self.curvature_loss is not None and not callable(self.curvature_loss):
            raise ValueError("Invalid curvature_loss: not callable (a closure returning the loss)")
        if isinstance(self.sinks, (str, bytes)) or not isinstance(self.sinks, Sequence):
            raise ValueError(f"Invalid sinks: {self.sinks!r} (a list of sink objects)")
        object.__setattr__(self, "sinks", tuple(self.sinks))
        for sink in self.sinks:
            for method in ("write", "event", "close"):
                if not callable(getattr(sink, method, None)):
                    raise ValueError(
                        f"Invalid sink {type(sink).__name__}: no {method}() method"
                    )
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"Invalid overwrite: {self.overwrite!r} (True or False)")
        if not isinstance(self.keep_batch, bool):
            raise ValueError(f"Invalid keep_batch: {self.keep_batch!r} (True or False)")
        if self.distributed not in (None, True, False):
            raise ValueError(f"Invalid distributed: {self.distributed!r} (None, True or False)")
        if not isinstance(self.extra, Mapping):
            raise ValueError(
                f"Invalid extra: {type(self.extra).__name__} (a dict of run config entries)"
            )
        for key in self.extra:
            if not isinstance(key, str):
                raise ValueError(f"Invalid extra key {key!r} (a str)")
            if key in RESERVED_CONFIG_KEYS:
                raise ValueError(f"config key {key!r} is reserved for the Monitor")
        object.__setattr__(self, "extra", dict(self.extra))

    def replace(self, **changes: Any) -> MonitorConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """The cadence settings stored under ``Run.config["monitor"]`` (JSON-safe)."""
        return {
            "every": self.every,
            "state_every": self.state_every,
            "curvature_every": self.curvature_every,
            "secant_every": self.secant_every,
            "top_k": self.top_k,
            "flush_every": self.flush_every,
        }


def resolve_config(config: MonitorConfig | Mapping[str, Any] | None, **given: Any) -> MonitorConfig:
    """The effective :class:`MonitorConfig` from a ``config=`` argument and keyword overrides.

    ``config`` is a :class:`MonitorConfig`, ``None``, or (the pre-``MonitorConfig`` form) a
    dict of run config extras; the keyword arguments in ``given`` are applied on top, except
    those left at :data:`UNSET` (not given by the caller).
    """
    if config is None:
        base = MonitorConfig()
    elif isinstance(config, MonitorConfig):
        base = config
    elif isinstance(config, Mapping):
        base = MonitorConfig(extra=dict(config))
    else:
        raise TypeError(
            f"config must be a MonitorConfig or a dict of run config entries, "
            f"got {type(config).__name__}"
        )
    changes = {k: v for k, v in given.items() if v is not UNSET}
    return dataclasses.replace(base, **changes) if changes else base


class _Unset:
    """Marker for a keyword argument the caller did not give."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
