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
  real decays (seed 002);
- :func:`interval_panel`: spikes per run and the median interval between them (seed 001).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stablestep.telemetry import names as N

_EMPTY = (np.zeros(0, dtype=np.int64), np.zeros(0))


@dataclass
class Incident:
    """A numbered marker on the loss panel: ``number`` (shown), ``step``, ``text``."""

    number: int
    step: int
    text: str


@dataclass
class Series:
    """What the panels need from one run: its ``label``, a ``get(name)`` of
    ``(steps, values)`` and its ``incidents``."""

    label: str
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    incidents: list[Incident] = field(default_factory=list)

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
    return Series(label=label or run.name, metrics=metrics, incidents=list(incidents))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


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
        fig.savefig(buf, format="png")
    else:
        fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _positive(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v, np.nan)


def _rolling_mean(v: np.ndarray, k: int) -> np.ndarray:
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def loss_panel(runs: Sequence[Series], *, smooth: int = 0) -> bytes | None:
    """Loss on a log axis; numbered circles at incidents, a cross where a run stops
    (non-finite loss: the run's data end before the others). ``smooth > 0`` (noisy
    minibatch losses): draw the running mean over ``smooth`` steps, raw loss faint."""
    if not any(r.has(N.LOSS) for r in runs):
        return None
    fig, ax = _figure("Training loss (log scale), incidents numbered", "loss", logy=True)
    last = max(int(r.get(N.LOSS)[0][-1]) for r in runs if r.has(N.LOSS))
    # a diverging run may reach 1e30: keep the others readable, clip it at the top
    top = 1e4 * float(np.median([r.get(N.LOSS)[1][0] for r in runs if r.has(N.LOSS)]))
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(N.LOSS)
        if not len(s):
            continue
        if smooth > 0:
            ax.plot(s, _positive(v), color=c, lw=0.5, alpha=0.15)
            ax.plot(s, _rolling_mean(v, smooth), color=c, lw=1.5,
                    label=f"{r.label} (mean of {smooth} steps)")
        else:
            ax.plot(s, _positive(v), color=c, lw=1.0, label=r.label)
        if s[-1] < last:  # stopped early: diverged
            ax.plot([s[-1]], [min(v[-1], top)], marker="X", ms=11, color=c, mec="black",
                    ls="none")
        for inc in r.incidents:
            i = int(np.clip(np.searchsorted(s, inc.step), 0, len(s) - 1))
            y = v[i] if v[i] > 0 else np.nanmax(_positive(v))
            ax.annotate(str(inc.number), (s[i], y), xytext=(0, 9), textcoords="offset points",
                        ha="center", fontsize=8, color="white", weight="bold",
                        bbox=dict(boxstyle="circle,pad=0.2", fc=c, ec="black", lw=0.5))
    if ax.get_ylim()[1] > top:
        ax.set_ylim(top=top)
    ax.legend(fontsize=8, loc="best")
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
        ax.plot(s, _positive(p50), color=c, lw=1.2, label=r.label)
        if len(s99) == len(s):
            ax.fill_between(s, _positive(p50), _positive(p99), color=c, alpha=0.18, lw=0)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def eps_share_panel(runs: Sequence[Series]) -> bytes | None:
    """Share of coordinates whose step epsilon governs (sqrt(v_hat) < eps_t)."""
    return line_panel(runs, N.EPS_SHARE, title="Share of coordinates governed by eps "
                      "(sqrt(v_hat) < eps)", ylabel="share", ylim=(-0.02, 1.02))


def precond_panel(runs: Sequence[Series]) -> bytes | None:
    r""":math:`\lambda_{\max}(P^{-1}H)` per run with its threshold as a dashed line."""
    if not any(r.has(N.PRECOND_SHARPNESS) for r in runs):
        return None
    fig, ax = _figure("Preconditioned sharpness lam_max(P^-1 H) vs threshold (2+2b1)/(1-b1)",
                      "lam_max(P^-1 H)", logy=True)
    thresholds = set()
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(N.PRECOND_SHARPNESS)
        if not len(s):
            continue
        ax.plot(s, _positive(v), color=c, lw=1.2, marker=".", ms=3, label=r.label)
        _, th = r.get(N.PRECOND_THRESHOLD)
        thresholds.update(np.unique(np.round(th, 6)).tolist())
    for th in sorted(thresholds):
        ax.axhline(th, color="black", ls="--", lw=1.0)
        ax.annotate(f"threshold {th:g}", (0.01, th), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def lr_sharpness_panel(runs: Sequence[Series]) -> bytes | None:
    r""":math:`\mathrm{lr}\cdot\lambda_{\max}(H)` per run against the gradient-descent
    bound 2 (or the run's recorded ``gd_threshold``)."""
    if not any(r.has(N.LR_SHARPNESS) for r in runs):
        return None
    fig, ax = _figure("lr * lam_max(H) vs the gradient-descent bound", "lr * lam_max(H)",
                      logy=True)
    bounds = set()
    gd_only = any(r.has(N.GD_THRESHOLD) for r in runs)  # Adam runs: see precond_panel
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(N.LR_SHARPNESS)
        if not len(s) or (gd_only and not r.has(N.GD_THRESHOLD)):
            continue
        ax.plot(s, _positive(v), color=c, lw=1.2, marker=".", ms=3, label=r.label)
        _, gd = r.get(N.GD_THRESHOLD)
        bounds.update(np.unique(np.round(gd, 6)).tolist() or [2.0])
    for b in sorted(bounds or {2.0}):
        ax.axhline(b, color="black", ls="--", lw=1.0)
        ax.annotate(f"stable below {b:g}", (0.01, b), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def line_panel(
    runs: Sequence[Series],
    name: str,
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
) -> bytes | None:
    """Metric ``name`` of every run as lines on shared axes."""
    if not any(r.has(name) for r in runs):
        return None
    fig, ax = _figure(title, ylabel, logy=logy)
    for r, c in zip(runs, _colors(len(runs)), strict=True):
        s, v = r.get(name)
        if len(s):
            ax.plot(s, _positive(v) if logy else v, color=c, lw=1.0, label=r.label)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def bias_correction_panel(steps: int, decays: dict[str, np.ndarray], *, b1: float = 0.9,
                          b2: float = 0.999) -> bytes:
    r"""Adam's bias-correction factor :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` against real
    lr decays (multipliers ``decays[label][t]``): the factor rises to 1, it does not decay."""
    from stablestep.optim.schedules import bias_correction

    fig, ax = _figure("Bias correction sqrt(1-b2^t)/(1-b1^t) is not a decay", "lr multiplier")
    t = np.arange(1, steps + 1)
    bc = np.array([bias_correction(int(k), b1, b2) for k in t])
    ax.plot(t, bc, color="black", lw=2.0, label="Adam bias correction (tends to 1)")
    for (label, d), c in zip(decays.items(), _colors(len(decays)), strict=True):
        ax.plot(t[: len(d)], d, color=c, lw=1.0, ls="--", label=label)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def interval_panel(spikes: dict[str, Sequence[int]]) -> bytes:
    """Number of spikes per run (bars) and the median interval between consecutive
    spikes (annotated), e.g. to compare dataset sizes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.4), dpi=100)
    labels = list(spikes)
    counts = [len(spikes[k]) for k in labels]
    bars = ax.bar(range(len(labels)), counts, color=_colors(len(labels)))
    for b, k in zip(bars, labels, strict=True):
        st = np.asarray(spikes[k])
        text = f"median gap {np.median(np.diff(st)):.0f} steps" if len(st) > 1 else "no period"
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=10)
    ax.set_ylabel("spikes")
    ax.set_title("Spikes per run and their period", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)
