r"""The report's panels: one matplotlib figure per quantity, every variant (run) of a
store on shared axes, rendered to PNG bytes.

matplotlib is imported lazily with the Agg backend (no display needed). Each panel
function takes a list of :class:`Series` bundles (one per run) and returns PNG bytes,
or ``None`` when no run recorded the quantity. Panels:

- :func:`loss_panel`: loss on a log axis, incidents (findings / spikes / NaN) marked
  with numbers that the HTML explains;
- :func:`eff_step_panel`: the effective per-coordinate step
  :math:`\mathrm{lr}_t/(\sqrt{\hat v}+\epsilon_t)` as a p50-p99 quantile band;
- :func:`eps_share_panel`: share of coordinates where :math:`\sqrt{\hat v} < \epsilon_t`;
- :func:`precond_panel`: :math:`\lambda_{\max}(P^{-1}H)` against its threshold
  :math:`(2+2\beta_1)/(1-\beta_1)`;
- :func:`lr_sharpness_panel`: :math:`\mathrm{lr}\cdot\lambda_{\max}(H)` against 2;
- :func:`line_panel`: any metric (gradient norm, learning rate, ...);
- :func:`bias_correction_panel`: Adam's :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` next to
  real decays (the adam-decay story);
- :func:`interval_panel`: spikes per run and the median interval between them (periodic spikes).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stablestep.telemetry import names as N
from stablestep.text import plot_label

_EMPTY = (np.zeros(0, dtype=np.int64), np.zeros(0))


@dataclass
class Incident:
    """A numbered marker on the loss panel: ``number`` (shown), ``step``, ``text`` (a
    one-sentence headline) and the ``finding`` dict it explains (``None`` for a bare
    marker)."""

    number: int
    step: int
    text: str
    finding: dict | None = None


@dataclass
class Series:
    """What the panels need from one run: its ``label``, a ``get(name)`` of
    ``(steps, values)``, its ``incidents`` and the steps where a non-finite value
    (NaN/Inf loss or gradients) was recorded (``nonfinite``)."""

    label: str
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    incidents: list[Incident] = field(default_factory=list)
    nonfinite: tuple[int, ...] = ()

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of metric ``name`` (empty arrays when not recorded)."""
        return self.metrics.get(name, _EMPTY)

    def has(self, name: str) -> bool:
        """Whether the run recorded at least one value of ``name``."""
        return len(self.get(name)[0]) > 0


def from_run(run, *, label: str | None = None, incidents: Sequence[Incident] = ()) -> Series:
    """Bundle the metrics of a stored :class:`stablestep.telemetry.Run` the panels use."""
    wanted = (N.LOSS, N.LR, N.GRAD_NORM, N.EFF_STEP_P50, N.EFF_STEP_P90, N.EFF_STEP_P99,
              N.EFF_STEP_MAX, N.EPS_SHARE, N.PRECOND_SHARPNESS, N.PRECOND_THRESHOLD,
              N.SHARPNESS, N.LR_SHARPNESS, N.GD_THRESHOLD)
    have = set(run.names())
    metrics = {n: run.series(n) for n in wanted if n in have}
    nonfinite = tuple(sorted(int(e.step) for e in run.events if e.kind == N.EVENT_NONFINITE))
    return Series(label=label or run.name, metrics=metrics, incidents=list(incidents),
                  nonfinite=nonfinite)


def from_trace(trace, *, label: str | None = None,
               incidents: Sequence[Incident] = ()) -> Series:
    """Bundle a :class:`stablestep.diagnosis.trace.Trace` (any readable log) for the
    panels. A trace aligns every metric onto the union of steps with NaN where nothing was
    recorded; those gaps are dropped here, and a NaN loss is kept only at the steps the
    reader marked non-finite."""
    steps = np.asarray(trace.steps, dtype=np.int64)
    loss = np.asarray(trace.loss, dtype=np.float64)
    nonfinite = tuple(sorted(int(x) for x in trace.nonfinite_steps))
    keep = np.isfinite(loss) | np.isin(steps, np.asarray(nonfinite, dtype=np.int64))
    metrics = {N.LOSS: (steps[keep], loss[keep])}
    for name, values in trace.metrics.items():
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        if ok.any():
            metrics[name] = (steps[ok], v[ok])
    return Series(label=label or trace.name or "run", metrics=metrics,
                  incidents=list(incidents), nonfinite=nonfinite)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# matplotlib's tab10, as hex so the HTML can colour incident badges like their run's line
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
         "#7f7f7f", "#bcbd22", "#17becf")


def _colors(n: int) -> list:
    return [TAB10[i % 10] for i in range(n)]


def _figure(title: str, ylabel: str, *, logy: bool = False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.4), dpi=100)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _png(fig, *, tight: bool = True) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
        fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.08)
    else:
        fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _legend(ax, n: int) -> None:
    """The legend under the axes (below the step label), never over the data."""
    _tidy_log(ax)
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncol = 1 if n == 1 else (3 if max(len(x) for x in labels) <= 24 else 2)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol,
              frameon=False, handlelength=1.6, columnspacing=1.2)


def _tidy_log(ax) -> None:
    """Plain tick labels (1, 2, 5, 10, 20, ...) on a log y axis spanning under three
    decades, instead of crowded minor labels like 4x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if ax.get_yscale() != "log":
        return
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 1e3:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _note(ax, text: str) -> None:
    """A grey note in the middle of the axes (why a panel shows nothing of interest)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9,
            color="#444", bbox=dict(boxstyle="round,pad=0.4", fc="white", ec="#bbb"))


def _positive(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v, np.nan)


def _rolling_mean(v: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last ``k`` values at each point (fewer at the start), from a cumsum."""
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(len(v))
    lo = np.maximum(0, i - k + 1)
    return (c[i + 1] - c[lo]) / (i + 1 - lo)


THIN = 2000  # buckets a long line is drawn from (the panels are 720 px wide)


def _thin_index(n: int, ys: Sequence[np.ndarray], buckets: int = THIN) -> np.ndarray:
    """Indices that draw a line of ``n`` points like all of them: up to ``2 * buckets``
    points, each bucket of consecutive points keeping its lowest and highest finite value
    of every ``y`` in ``ys`` (the exact extrema: a one-step spike is drawn at its true
    height) and its first non-finite point (the gap stays a gap). All indices when
    ``n <= 2 * buckets``."""
    if n <= 2 * buckets:
        return np.arange(n)
    size = -(-n // buckets)
    rows = -(-n // size)
    keep = []
    for y in ys:
        pad = np.full(rows * size, np.nan)
        pad[:n] = y
        grid = pad.reshape(rows, size)
        fin = np.isfinite(grid)
        base = np.arange(rows) * size
        lo = np.where(fin, grid, np.inf).argmin(axis=1)
        hi = np.where(fin, grid, -np.inf).argmax(axis=1)
        has = fin.any(axis=1)
        keep += [(base + lo)[has], (base + hi)[has]]
        gap = ~fin
        gap[-1, n - base[-1]:] = False  # the padding is not a gap
        any_gap = gap.any(axis=1)
        keep.append((base + gap.argmax(axis=1))[any_gap])
    return np.unique(np.concatenate(keep)) if keep else np.arange(n)


def _thin(s: np.ndarray, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(s, *ys)`` at :func:`_thin_index`'s points: what a line plot of a long series
    draws, in a few thousand points instead of a million."""
    idx = _thin_index(len(s), ys)
    if idx.size == len(s):
        return (s, *ys)
    return (s[idx], *(y[idx] for y in ys))


def first_nonfinite(r: Series) -> int | None:
    """The first step at which run ``r`` recorded a non-finite loss or gradient (from
    ``r.nonfinite`` and the loss values), ``None`` when there is none: a run that simply
    ended is not a run that blew up."""
    s, v = r.get(N.LOSS)
    bad = [int(x) for x in r.nonfinite]
    if len(s):
        nf = ~np.isfinite(v)
        if nf.any():
            bad.append(int(s[np.argmax(nf)]))
    return min(bad) if bad else None


# Where an incident's numbered circle may sit, in points from its data point: straight
# above first, then beside, then a row higher; the first place no other circle covers.
_SLOTS = [(dx, dy) for dy in (9, 24, 39) for dx in (0, 15, -15, 30, -30, 45, -45)]


def _place_markers(ax, markers: list[tuple[float, float, str, int]]) -> None:
    """Draw numbered circles ``(x, y, colour, number)`` so that none covers another:
    each takes the first slot of :data:`_SLOTS` whose centre is at least a circle's width
    from every circle placed before (compared in display pixels, after the layout)."""
    fig = ax.figure
    fig.tight_layout()
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before transforming
    px_per_pt = fig.dpi / 72.0
    min_gap = 15 * px_per_pt  # a two-digit circle at fontsize 8 is about 13 pt wide
    placed: list[tuple[float, float]] = []
    for x, y, color, number in sorted(markers, key=lambda m: (m[0], m[3])):
        bx, by = ax.transData.transform((x, y))
        slot = _SLOTS[0]
        for dx, dy in _SLOTS:
            cx, cy = bx + dx * px_per_pt, by + dy * px_per_pt
            if all(math.hypot(cx - qx, cy - qy) >= min_gap for qx, qy in placed):
                slot = (dx, dy)
                break
        placed.append((bx + slot[0] * px_per_pt, by + slot[1] * px_per_pt))
        ax.annotate(str(number), (x, y), xytext=slot, textcoords="offset points",
                    ha="center", va="center", fontsize=8, color="white", weight="bold",
                    annotation_clip=False,
                    arrowprops=None if slot == _SLOTS[0] else dict(arrowstyle="-", lw=0.5,
                                                                   color=color),
                    bbox=dict(boxstyle="circle,pad=0.2", fc=color, ec="black", lw=0.5))


def loss_panel(runs: Sequence[Series], *, smooth: int = 0) -> bytes | None:
    """Loss on a log axis; numbered circles at incidents (circles of different runs at
    the same place are set side by side, never on top of each other), and a cross only
    where a run's loss or gradients became non-finite (:func:`first_nonfinite`), at the
    last finite loss before it. ``smooth > 0`` (noisy minibatch losses): draw the running
    mean over ``smooth`` steps, raw loss faint."""
    if not any(r.has(N.LOSS) for r in runs):
        return None
    title = "Training loss (log scale), incidents numbered"
    if smooth > 0:
        title += f"; lines: mean of {smooth} steps"
    fig, ax = _figure(title, "loss", logy=True)
    # a diverging run may reach 1e30: keep the others readable, clip it at the top
    firsts = [r.get(N.LOSS)[1][np.isfinite(r.get(N.LOSS)[1])][:1] for r in runs]
    firsts = [float(x[0]) for x in firsts if len(x) and x[0] > 0]
    top = 1e4 * float(np.median(firsts)) if firsts else np.inf
    crosses, markers = [], []
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(N.LOSS)
        if not len(s):
            continue
        if smooth > 0:
            ax.plot(*_thin(s, _positive(v)), color=c, lw=0.5, alpha=0.15)
            ax.plot(*_thin(s, _rolling_mean(v, smooth)), color=c, lw=1.5,
                    label=plot_label(r.label))
        else:
            ax.plot(*_thin(s, _positive(v)), color=c, lw=1.0, label=plot_label(r.label))
        good = np.isfinite(v) & (v > 0)
        fallback = float(v[good].max()) if good.any() else 1.0
        bad = first_nonfinite(r)
        if bad is not None:
            before = good & (s <= bad)
            y = float(v[before][-1]) if before.any() else fallback
            crosses.append((bad, min(y, top), c))
        for inc in r.incidents:
            i = int(np.clip(np.searchsorted(s, inc.step), 0, len(s) - 1))
            y = float(v[i]) if good[i] else fallback
            markers.append((float(s[i]), min(y, top), c, inc.number))
    if ax.get_ylim()[1] > top:
        ax.set_ylim(top=top)
    for x, y, c in crosses:
        ax.plot([x], [y], marker="X", ms=11, color=c, mec="black", ls="none", clip_on=False)
        ax.annotate(f"NaN/Inf at step {x:g}", (x, y), xytext=(8, -12),
                    textcoords="offset points", fontsize=8, color=c, annotation_clip=False)
    _legend(ax, len(runs))
    _place_markers(ax, markers)
    return _png(fig)


def eff_step_panel(runs: Sequence[Series]) -> bytes | None:
    r"""Effective step :math:`\mathrm{lr}_t/(\sqrt{\hat v}+\epsilon_t)`: median line and
    p50-p99 band per run, log axis."""
    if not any(r.has(N.EFF_STEP_P50) for r in runs):
        return None
    fig, ax = _figure("Effective per-coordinate step lr_t/(sqrt(v_hat)+eps): p50, band to p99",
                      "effective step", logy=True)
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, p50 = r.get(N.EFF_STEP_P50)
        if not len(s):
            continue
        s99, p99 = r.get(N.EFF_STEP_P99)
        if len(s99) == len(s):  # band edge drawn too: overlapping bands stay tellable apart
            st, a50, a99 = _thin(s, _positive(p50), _positive(p99))
            ax.plot(st, a50, color=c, lw=1.4, label=plot_label(r.label))
            ax.fill_between(st, a50, a99, color=c, alpha=0.10, lw=0)
            ax.plot(st, a99, color=c, lw=0.6, ls=":")
        else:
            ax.plot(*_thin(s, _positive(p50)), color=c, lw=1.4, label=plot_label(r.label))
    _legend(ax, len(runs))
    return _png(fig)


def eps_share_panel(runs: Sequence[Series]) -> bytes | None:
    """Share of coordinates whose step epsilon governs (sqrt(v_hat) < eps_t); says so
    on the panel when eps governs no coordinate in any run."""
    vals = [r.get(N.EPS_SHARE)[1] for r in runs if r.has(N.EPS_SHARE)]
    flat = bool(vals) and all(np.nanmax(np.abs(v)) < 1e-3 for v in vals if np.isfinite(v).any())
    return line_panel(runs, N.EPS_SHARE, title="Share of coordinates governed by eps "
                      "(sqrt(v_hat) < eps)", ylabel="share", ylim=(-0.02, 1.02),
                      note="0 throughout: sqrt(v_hat) > eps on every coordinate,\n"
                      "eps never sets the step in these runs" if flat else None)


def _bound_lines(ax, bounds: dict[float, list[str]], word: str) -> None:
    """Dashed bound lines; when runs have different bounds, each says whose it is."""
    for b, who in sorted(bounds.items()):
        ax.axhline(b, color="black", ls="--", lw=1.0)
        names = ", ".join(plot_label(w, limit=24) for w in who[:3]) + (", ..." if len(who) > 3
                                                                        else "")
        whose = f" ({names})" if len(bounds) > 1 else ""
        ax.annotate(f"{word} {b:g}{whose}", (0.01, b), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8,
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))


def precond_panel(runs: Sequence[Series]) -> bytes | None:
    r""":math:`\lambda_{\max}(P^{-1}H)` per run with its threshold as a dashed line (labelled
    with its runs when they differ, e.g. Adam's 38 next to gradient descent's 2)."""
    if not any(r.has(N.PRECOND_SHARPNESS) for r in runs):
        return None
    fig, ax = _figure("Preconditioned sharpness lam_max(P^-1 H) vs its stability bound",
                      "lam_max(P^-1 H)", logy=True)
    thresholds: dict[float, list[str]] = {}
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(N.PRECOND_SHARPNESS)
        if not len(s):
            continue
        ax.plot(s, _positive(v), color=c, lw=1.2, marker=".", ms=3, label=plot_label(r.label))
        _, th = r.get(N.PRECOND_THRESHOLD)
        for t in np.unique(np.round(th[np.isfinite(th)], 6)).tolist():
            thresholds.setdefault(t, []).append(r.label)
    _bound_lines(ax, thresholds, "bound")
    _legend(ax, len(runs))
    return _png(fig)


def lr_sharpness_panel(runs: Sequence[Series]) -> bytes | None:
    r""":math:`\mathrm{lr}\cdot\lambda_{\max}(H)` of the non-adaptive runs against the
    gradient-descent bound 2 (or the run's recorded ``gd_threshold``). Runs that record a
    preconditioned sharpness (Adam) are left out: their bound is on
    :math:`\lambda_{\max}(P^{-1}H)` (:func:`precond_panel`), and a GD bound next to them
    would mislead; ``None`` when no run is left."""
    shown = [r for r in runs if r.has(N.LR_SHARPNESS)
             and (r.has(N.GD_THRESHOLD) or not r.has(N.PRECOND_SHARPNESS))]
    if not shown:
        return None
    fig, ax = _figure("lr * lam_max(H) vs the gradient-descent bound", "lr * lam_max(H)",
                      logy=True)
    bounds: dict[float, list[str]] = {}
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        if not any(r is x for x in shown):
            continue
        s, v = r.get(N.LR_SHARPNESS)
        ax.plot(s, _positive(v), color=c, lw=1.2, marker=".", ms=3, label=plot_label(r.label))
        _, gd = r.get(N.GD_THRESHOLD)
        for b in np.unique(np.round(gd[np.isfinite(gd)], 6)).tolist() or [2.0]:
            bounds.setdefault(b, []).append(r.label)
    _bound_lines(ax, bounds, "stable below")
    _legend(ax, len(shown))
    return _png(fig)


def line_panel(
    runs: Sequence[Series],
    name: str,
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
    smooth: int = 0,
    from_zero: bool = False,
    note: str | None = None,
) -> bytes | None:
    """Metric ``name`` of every run as lines on shared axes. ``smooth > 0``: running
    mean over ``smooth`` steps on top of the faint raw values; ``from_zero``: linear axis
    from 0 (a constant does not get a magnified offset axis); ``note``: a sentence shown
    on the panel."""
    if not any(r.has(name) for r in runs):
        return None
    fig, ax = _figure(title + (f"; lines: mean of {smooth} steps" if smooth > 0 else ""),
                      ylabel, logy=logy)
    top = 0.0
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(name)
        if not len(s):
            continue
        y = _positive(v) if logy else v
        if np.isfinite(v).any():
            top = max(top, float(np.nanmax(np.where(np.isfinite(v), v, np.nan))))
        if smooth > 0:
            ax.plot(*_thin(s, y), color=c, lw=0.5, alpha=0.15)
            ax.plot(*_thin(s, _rolling_mean(v, smooth)), color=c, lw=1.5,
                    label=plot_label(r.label))
        else:
            ax.plot(*_thin(s, y), color=c, lw=1.0, label=plot_label(r.label))
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif from_zero and not logy and top > 0:
        ax.set_ylim(0, 1.1 * top)
    if note:
        _note(ax, note)
    _legend(ax, len(runs))
    return _png(fig)


def bias_correction_panel(steps: int, decays: dict[str, np.ndarray], *, b1: float = 0.9,
                          b2: float = 0.999, colors: dict[str, str] | None = None) -> bytes:
    r"""Adam's bias-correction factor :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` against real
    lr decays (multipliers ``decays[label][t]``): the factor rises to 1, it does not decay.
    ``colors[label]``: the run's colour in the other panels."""
    from stablestep.optim.schedules import bias_correction

    fig, ax = _figure("Bias correction sqrt(1-b2^t)/(1-b1^t) is not a decay", "lr multiplier")
    t = np.arange(1, steps + 1)
    bc = np.array([bias_correction(int(k), b1, b2) for k in t])
    ax.plot(t, bc, color="black", lw=2.0, label="Adam bias correction (tends to 1)")
    own = _colors(len(decays))
    for (label, d), c in zip(decays.items(), own, strict=True):
        ax.plot(t[: len(d)], d, color=(colors or {}).get(label, c), lw=1.0, ls="--",
                label=plot_label(label))
    ax.set_ylim(0, 1.1)
    _legend(ax, len(decays) + 1)
    return _png(fig)


def interval_panel(spikes: dict[str, Sequence[int]]) -> bytes:
    """Number of spikes per run (bars) and the median interval between consecutive
    spikes (annotated), e.g. to compare dataset sizes."""
    import textwrap

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.4), dpi=100)
    labels = list(spikes)
    counts = [len(spikes[k]) for k in labels]
    bars = ax.bar(range(len(labels)), counts, color=_colors(len(labels)))
    for b, k in zip(bars, labels, strict=True):
        st = np.asarray(spikes[k])
        text = (f"{len(st)} spikes,\nmedian gap {np.median(np.diff(st)):.0f} steps"
                if len(st) > 1 else "no spikes" if not len(st) else "1 spike")
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax.set_ylim(0, max(1, max(counts, default=0)) * 1.3)  # room for the labels
    ax.set_xticks(range(len(labels)), [textwrap.fill(plot_label(x, limit=44), 22)
                                       for x in labels], fontsize=8)
    ax.set_ylabel("spikes (lab count)")
    ax.set_title("Spikes per run and their period", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)
