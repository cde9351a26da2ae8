"""stablestep.report: plots (matplotlib, imported lazily) and one self-contained HTML
report per run store or lab scenario (images inline, no network).

- :func:`write_report` ``(store, out)``: every run of a store on shared axes;
- :func:`write_scenario_report` ``(scenario, outcome, out)``: a lab scenario's story,
  scores, diagnosis and panels;
- :func:`write_index` ``(outcomes, out)``: links to several scenario reports;
- :func:`write_sweep_report` ``(result, out)``: a sweep's stability map.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "write_index": "stablestep.report.build",
    "write_report": "stablestep.report.build",
    "write_scenario_report": "stablestep.report.build",
    "write_sweep_report": "stablestep.report.sweepmap",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Resolve a public name on first use (PEP 562), keeping ``stablestep --help`` light."""
    try:
        module = importlib.import_module(_LAZY[name])
    except KeyError:
        raise AttributeError(f"module 'stablestep.report' has no attribute {name!r}") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
