"""Where a NaN was born: :func:`nan_origin` and :class:`NanOrigin`, defined in
:mod:`stablestep.telemetry.nan_origin` (the Monitor and the Guard call it when a step turns
non-finite, and telemetry may not import diagnosis); this name is kept for the user's code."""

from __future__ import annotations

from stablestep.telemetry.nan_origin import NanOrigin, OriginWatch, nan_origin

__all__ = ["NanOrigin", "OriginWatch", "nan_origin"]
