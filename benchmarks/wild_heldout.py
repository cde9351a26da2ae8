"""Held-out runs for benchmarks/wild.py (filled below)."""

RUNS: list[dict] = []
