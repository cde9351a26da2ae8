"""The records the diagnosis returns: :class:`Finding` and :class:`Remedy`.

``Finding.to_dict()`` is the JSON contract of DESIGN.md::

    {"step": int, "kind": "spike"|"divergence"|"non-finite"|"periodic-spikes"|"warning",
     "mechanism": "adaptive-edge-of-stability"|"lr-too-high"|"gradient-outlier"|
                  "non-finite"|"attention-logit-growth"|"output-logit-divergence"|
                  "epsilon-scale"|"loss-scale-collapse"|"unknown",
     "confidence": float, "evidence": {...}, "remedies": [{"action", "value", "why"}]}

A ``"warning"`` is a mechanism that holds before (or without) a loss incident
(docs/architecture.md, "JSON contract of a finding").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("spike", "divergence", "non-finite", "periodic-spikes", "warning")
MECHANISMS = (
    "adaptive-edge-of-stability",
    "lr-too-high",
    "gradient-outlier",
    "non-finite",
    "attention-logit-growth",
    "output-logit-divergence",
    "epsilon-scale",
    "loss-scale-collapse",
    "unknown",
)


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, non-finite floats to strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


@dataclass(frozen=True)
class Remedy:
    """A computed change for this run: ``action`` (e.g. ``"set-eps"``), its ``value``
    (a number, bool or small dict) and ``why`` (one sentence with the numbers)."""

    action: str
    value: Any
    why: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"action": self.action, "value": _jsonable(self.value), "why": self.why}


@dataclass
class Finding:
    """One incident with its mechanism, the numbers that show it and computed remedies.

    ``step`` is the incident's onset (first step of the rise, or the first non-finite
    step); ``evidence["detected_at"]`` is where the online detector fired.
    """

    step: int
    kind: str
    mechanism: str
    confidence: float
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: list[Remedy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r} (one of {', '.join(KINDS)})")
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"Invalid mechanism: {self.mechanism!r} (one of {', '.join(MECHANISMS)})"
            )
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Invalid confidence: {self.confidence} (need 0 <= c <= 1)")

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract of DESIGN.md (plain Python types only)."""
        return {
            "step": int(self.step),
            "kind": self.kind,
            "mechanism": self.mechanism,
            "confidence": round(float(self.confidence), 3),
            "evidence": _jsonable(self.evidence),
            "remedies": [r.to_dict() for r in self.remedies],
        }
