r"""Learning-rate schedules as plain ``step -> value`` callables.

Every schedule is a :class:`Schedule`: call it with a step count (0 for the first step)
and it returns a float. They are *multipliers* by default (value 1 at the start), so they
plug straight into :class:`torch.optim.lr_scheduler.LambdaLR` with any optimizer, ours
included::

    opt = stablestep.Adam(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, schedules.linear_warmup(500) * schedules.cosine(20_000, alpha=0.1))
    ...; opt.step(); sched.step()

Compose with ``*`` (product of two schedules or a schedule and a number) and
:func:`join` (one schedule after another, like ``optax.join_schedules``).

:func:`bias_correction` is *not* a schedule: it is the factor Adam applies internally
(see its docstring and the adam-decay story).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "Schedule",
    "bias_correction",
    "constant",
    "cosine",
    "exponential_decay",
    "inverse_sqrt",
    "join",
    "linear_warmup",
]


def _value(spec: dict[str, Any], s: int) -> float:
    """Evaluate a schedule's spec (plain data, see :class:`Schedule`) at step ``s``."""
    kind = spec["kind"]
    if kind == "constant":
        return spec["value"]
    if kind == "exponential_decay":
        e = s // spec["decay_steps"] if spec["staircase"] else s / spec["decay_steps"]
        return spec["decay_rate"] ** e
    if kind == "inverse_sqrt":
        return spec["alpha"] / math.sqrt(s + spec["offset"])
    if kind == "linear_warmup":
        return spec["start"] + (1.0 - spec["start"]) * min(1.0, s / spec["warmup_steps"])
    if kind == "cosine":
        t, a = spec["decay_steps"], spec["alpha"]
        return a + (1.0 - a) * 0.5 * (1.0 + math.cos(math.pi * min(s, t) / t))
    if kind == "product":
        out = 1.0
        for part in spec["parts"]:
            out *= _value(part, s)
        return out
    if kind == "join":
        bounds = spec["boundaries"]
        i = sum(1 for b in bounds if s >= b)
        return _value(spec["parts"][i], s - ([0, *bounds])[i])
    raise ValueError(f"unknown schedule kind {kind!r}")


class Schedule:
    """A named ``step -> float`` function; ``*`` multiplies schedules (or scales by a number).

    A schedule is plain data, ``spec`` (a dict of numbers, strings and lists of such dicts),
    evaluated at each call: so it pickles, and a ``LambdaLR`` driven by one saves with
    ``torch.save(scheduler.state_dict())`` and loads back with ``torch.load`` (the default
    ``weights_only=True`` included), which a schedule holding a lambda could not.
    """

    def __init__(self, spec: dict[str, Any], name: str) -> None:
        self.spec = spec
        self.name = name

    def __call__(self, step: int) -> float:
        """Value at ``step`` (number of steps already taken, so 0 for the first step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return float(_value(self.spec, step))

    def __mul__(self, other: Schedule | float) -> Schedule:
        if isinstance(other, Schedule):
            return Schedule({"kind": "product", "parts": [self.spec, other.spec]},
                            f"{self.name} * {other.name}")
        k = float(other)
        return Schedule({"kind": "product", "parts": [self.spec, constant(k).spec]},
                        f"{self.name} * {k:g}")

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.spec, self.name) == (other.spec, other.name)

    __hash__ = None  # type: ignore[assignment]  # mutable (LambdaLR.load_state_dict updates it)

    def __repr__(self) -> str:
        return f"Schedule({self.name})"


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def constant(value: float = 1.0) -> Schedule:
    """The constant schedule ``value``."""
    return Schedule({"kind": "constant", "value": float(value)}, f"constant({value:g})")


def exponential_decay(decay_steps: int, decay_rate: float, *, staircase: bool = False) -> Schedule:
    r"""``tf.train.exponential_decay`` / Keras ``ExponentialDecay`` as a multiplier.

    .. math:: f(s) = r^{\,s/T}\quad(\text{staircase: } r^{\lfloor s/T\rfloor})

    Multiply by the initial value for TF's absolute form: the adam-decay story's
    ``tf.train.exponential_decay(0.15, step, 1, 0.9999)`` is
    ``exponential_decay(1, 0.9999) * 0.15``.
    """
    decay_steps = _positive_int("decay_steps", decay_steps)
    if not decay_rate > 0.0:
        raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
    spec = {"kind": "exponential_decay", "decay_steps": decay_steps,
            "decay_rate": float(decay_rate), "staircase": bool(staircase)}
    tail = ", staircase=True" if staircase else ""
    return Schedule(spec, f"exponential_decay({decay_steps}, {decay_rate:g}{tail})")


def inverse_sqrt(alpha: float = 1.0, *, offset: int = 1) -> Schedule:
    r"""The Adam paper's :math:`\alpha_t = \alpha/\sqrt{t}`, :math:`t` = step + offset.

    With the default ``offset=1``, step 0 (the first update, Adam's :math:`t = 1`) gives
    ``alpha``.
    """
    offset = _positive_int("offset", offset)
    return Schedule({"kind": "inverse_sqrt", "alpha": float(alpha), "offset": offset},
                    f"inverse_sqrt({alpha:g})")


def linear_warmup(warmup_steps: int, *, start: float = 0.0) -> Schedule:
    r"""Linear ramp from ``start`` to 1 over ``warmup_steps``, then 1.

    .. math:: f(s) = \mathrm{start} + (1-\mathrm{start})\min(1, s/W)
    """
    warmup_steps = _positive_int("warmup_steps", warmup_steps)
    return Schedule({"kind": "linear_warmup", "warmup_steps": warmup_steps, "start": float(start)},
                    f"linear_warmup({warmup_steps})")


def cosine(decay_steps: int, *, alpha: float = 0.0) -> Schedule:
    r"""Cosine decay (Loshchilov & Hutter 2017; Keras ``CosineDecay`` as a multiplier).

    .. math:: f(s) = \alpha + (1-\alpha)\,\tfrac12\big(1+\cos(\pi\min(s,T)/T)\big)
    """
    decay_steps = _positive_int("decay_steps", decay_steps)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return Schedule({"kind": "cosine", "decay_steps": decay_steps, "alpha": float(alpha)},
                    f"cosine({decay_steps}, alpha={alpha:g})")


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, each restarted at its own step 0.

    ``len(boundaries) == len(schedules) - 1``, boundaries strictly increasing (as
    ``optax.join_schedules``). Example: warmup for 100 steps, then inverse-sqrt decay:
    ``join([linear_warmup(100), inverse_sqrt()], [100])``.
    """
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            "need len(boundaries) == len(schedules) - 1, "
            f"got {len(boundaries)} and {len(schedules)}"
        )
    increasing = all(b > a for a, b in zip(boundaries, boundaries[1:], strict=False))
    if not increasing or any(b < 0 for b in boundaries):
        raise ValueError(
            f"boundaries must be non-negative and strictly increasing, got {boundaries}"
        )
    spec = {"kind": "join", "parts": [x.spec for x in schedules],
            "boundaries": [int(b) for b in boundaries]}
    return Schedule(spec, "join(" + ", ".join(x.name for x in schedules) + ")")


def bias_correction(t: int, b1: float = 0.9, b2: float = 0.999) -> float:
    r"""Adam's effective step multiplier :math:`\sqrt{1-b_2^t}/(1-b_1^t)` at step ``t >= 1``.

    TF writes Adam as ``lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)``; the adam-decay story asks if this
    is a learning-rate decay. It is not: it compensates the zero initialisation of ``m`` and
    ``v`` and tends to **1** as ``t`` grows. For the default betas it starts at 0.316,
    dips to 0.153 at ``t = 10``, then *rises* monotonically (0.795 at ``t = 1000``, 0.99998
    at ``t = 10_000``): if anything it is a warmup, and a decay must be added separately.
    """
    if isinstance(t, bool) or int(t) != t or t < 1:
        raise ValueError(f"t must be an integer >= 1, got {t}")
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    return math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
