"""Long series are drawn from a few thousand points that keep every bucket's exact extrema
and its gaps (a 1M-step store's report draws 4000 points a line, not 1M)."""

from __future__ import annotations

import numpy as np

from stablestep.report import plots


def test_thinning_keeps_the_extrema_and_the_gaps() -> None:
    rng = np.random.default_rng(0)
    n = 100_003
    v = 1.0 + 0.01 * rng.standard_normal(n)
    v[31_337] = 40.0  # a one-step spike
    v[70_000] = 0.2  # a one-step dip
    v[50_000:50_010] = np.nan  # a gap (non-finite records)
    s = np.arange(n) * 3
    ts, tv = plots._thin(s, v)
    assert len(ts) <= 3 * plots.THIN and np.all(np.diff(ts) > 0)
    assert 31_337 * 3 in ts.tolist() and np.nanmax(tv) == 40.0
    assert 70_000 * 3 in ts.tolist() and np.nanmin(tv) == 0.2
    assert np.isnan(tv).any()  # the gap stays a gap
    # every point kept is a real point of the series
    assert np.array_equal(tv[np.isfinite(tv)], v[ts[np.isfinite(tv)] // 3])
    # the last bucket's padding is not taken for a gap
    assert not np.isnan(plots._thin(s[:-10], np.ones(n - 10))[1]).any()


def test_short_series_are_drawn_whole() -> None:
    s = np.arange(100)
    v = np.linspace(1, 2, 100)
    ts, tv = plots._thin(s, v)
    assert ts is s and tv is v


def test_band_edges_thinned_together() -> None:
    n = 50_000
    s = np.arange(n)
    lo, hi = np.full(n, 1.0), np.full(n, 2.0)
    hi[12_345] = 9.0
    ts, tlo, thi = plots._thin(s, lo, hi)
    assert len(ts) == len(tlo) == len(thi) and thi.max() == 9.0


def test_a_long_loss_panel_is_drawn(tmp_path) -> None:
    n = 200_000
    v = 2.0 + 0.01 * np.random.default_rng(1).standard_normal(n)
    v[n // 2] = 40.0
    r = plots.Series(label="long", metrics={"loss": (np.arange(n), v)})
    png = plots.loss_panel([r])
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
