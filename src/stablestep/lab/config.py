"""Typed configuration of one lab training run (one *variant* of a scenario).

A scenario is data: a list of :class:`Variant` (a name, a label and a
:class:`TrainConfig`) plus the one training function :func:`stablestep.lab.train.train`.
Sweeps override fields of a variant's config with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Problem = Literal["sin-regression", "random-targets", "ill-conditioned", "noisy-regression"]
OptimizerName = Literal["adam", "sgd"]
ScheduleName = Literal["constant", "exponential", "inverse-sqrt", "warmup-cosine"]

_PROBLEMS = ("sin-regression", "random-targets", "ill-conditioned", "noisy-regression")
_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("constant", "exponential", "inverse-sqrt", "warmup-cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a lab run; two equal configs give identical runs.

    Problem: ``problem`` (see :mod:`stablestep.lab.problems`), ``n`` data points of
    dimension ``dim``, a tanh MLP of hidden ``width`` (``ill-conditioned`` is linear),
    ``batch`` (``None``: full batch), ``seed``.
    Optimizer: ``optimizer`` (``adam``: :class:`stablestep.Adam`, PyTorch epsilon
    convention; ``sgd``: plain gradient descent), ``lr``, ``eps``, ``betas``,
    ``amsgrad``, ``momentum`` (SGD).
    Schedule: ``schedule`` with ``decay_rate``/``decay_steps`` (exponential:
    ``lr * decay_rate**(t/decay_steps)``), ``warmup`` steps (inverse-sqrt, warmup-cosine).
    ``steps``: optimizer steps; training stops early at the first non-finite loss.
    ``curvature_every``: steps between curvature probes (0: none).
    """

    problem: Problem = "sin-regression"
    n: int = 128
    dim: int = 4
    width: int = 256
    batch: int | None = None
    seed: int = 0
    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = False
    momentum: float = 0.0
    schedule: ScheduleName = "constant"
    decay_rate: float = 0.1
    decay_steps: int = 1000
    warmup: int = 100
    steps: int = 2000
    curvature_every: int = 0

    def __post_init__(self) -> None:
        if self.problem not in _PROBLEMS:
            raise ValueError(f"problem must be one of {', '.join(_PROBLEMS)}; got {self.problem!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(_OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(_SCHEDULES)}; got {self.schedule!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if not self.eps >= 0:
            raise ValueError(f"Invalid epsilon value: {self.eps}")
        for name in ("n", "dim", "width", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.batch is not None and not 1 <= self.batch <= self.n:
            raise ValueError(f"batch must be in [1, n={self.n}] or None; got {self.batch}")
        if self.curvature_every < 0:
            raise ValueError(f"curvature_every must be >= 0; got {self.curvature_every}")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the fields (stored as the run's config)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass(frozen=True)
class Variant:
    """One setting a scenario compares: ``name`` (short, used in run names and the CLI),
    ``label`` (legend text), ``config``, and ``role``: ``"failing"`` for the setting the
    user story starts from, ``"fix"`` for a proposed remedy, ``"compare"`` otherwise."""

    name: str
    label: str
    config: TrainConfig
    role: Literal["failing", "fix", "compare"] = "compare"
    note: str = field(default="")
