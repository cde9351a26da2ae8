"""stablestep.report: plots (matplotlib, imported lazily) and one self-contained HTML
report per run store or lab scenario (images inline, no network)."""

from stablestep.report.build import write_index, write_report, write_scenario_report

__all__ = ["write_index", "write_report", "write_scenario_report"]
