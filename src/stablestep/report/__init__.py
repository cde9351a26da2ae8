"""stablestep.report: plots (matplotlib, imported lazily) and one self-contained HTML
report per run store or log (images inline, no network).

- :func:`write_report` ``(source, out)``: every run of a store or log on shared axes;
- :func:`write_sweep_report` ``(result, out)``: a sweep's stability map.

The lab's scenario pages are built from these parts in :mod:`stablestep.lab.pages`.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "write_report": "stablestep.report.build",
    "write_sweep_report": "stablestep.report.sweepmap",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
