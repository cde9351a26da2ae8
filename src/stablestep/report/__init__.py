"""stablestep.report: plots (matplotlib, imported lazily) and one self-contained HTML
report per run store or lab scenario (images inline, no network).

- :func:`write_report` ``(store, out)``: every run of a store on shared axes;
- :func:`write_scenario_report` ``(scenario, outcome, out)``: a lab scenario's story,
  scores, diagnosis and panels;
- :func:`write_index` ``(outcomes, out)``: links to several scenario reports;
- :func:`write_sweep_report` ``(result, out)``: a sweep's stability map.
"""

from __future__ import annotations

from stablestep._lazy import attach

_LAZY = {
    "write_index": "stablestep.report.build",
    "write_report": "stablestep.report.build",
    "write_scenario_report": "stablestep.report.build",
    "write_sweep_report": "stablestep.report.sweepmap",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, globals())
