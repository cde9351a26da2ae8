"""Run names that used to break the report (mathtext, 10k characters), crosses only where
the loss went non-finite, and incident circles of different runs that never cover each
other."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stablestep.report import plots, write_report
from stablestep.report.plots import Incident, Series, first_nonfinite
from stablestep.text import plot_label, printable


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def _csv(tmp_path, names, n=60, spike=30):
    p = tmp_path / "log.csv"
    rows = [f"{i},{(30.0 if i == spike else 1.0) / (1 + 0.05 * i)},{name}"
            for name in names for i in range(n)]
    p.write_text("step,loss,run\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return p


def _images(html: str) -> list[bytes]:
    import base64
    import re

    return [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                     html)]


def test_mathtext_and_huge_run_names_give_normal_plots(tmp_path):
    names = [r"$\undefinedmacro$", "x" * 10_000]
    html = write_report(_csv(tmp_path, names), tmp_path / "r.html").read_text("utf-8")
    imgs = _images(html)
    assert imgs
    for png in imgs:
        w, h = _png_size(png)
        assert w < 1500 and h < 1000, (w, h)  # a 10k-character name gave 60,669 px
    assert r"$\undefinedmacro$" in html  # shown as text in the page
    assert "x" * 10_000 not in html  # cut for display


def test_plot_labels_are_text_not_mathtext():
    assert plot_label(r"$\undefinedmacro$") == r"\$\undefinedmacro\$"
    assert len(plot_label("y" * 500)) == 40 and plot_label("y" * 500).endswith("...")
    assert printable("a\x1b[2J\u202eb\x00") == "a\\x1b[2J\\u202eb\\x00"
    assert printable("line\nnext") == "line\\x0anext"
    assert printable("line\nnext", newlines=True) == "line\nnext"
    png = plots.line_panel([Series(label=r"$\frac{$", metrics={"lr": (np.arange(3),
                                                                        np.ones(3))})],
                           "lr", title="t", ylabel="lr")
    assert _png_size(png)[0] < 1500


def _series(label, n, *, nonfinite=(), values=None, incidents=()):
    s = np.arange(n)
    v = np.linspace(2.0, 1.0, n) if values is None else values
    return Series(label=label, metrics={"loss": (s, v)}, nonfinite=tuple(nonfinite),
                  incidents=list(incidents))


def _crosses(monkeypatch, runs):
    import matplotlib.axes

    seen = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        if kwargs.get("marker") == "X":
            seen.append(args[0][0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    assert plots.loss_panel(runs) is not None
    return seen


def test_a_cross_only_where_the_loss_went_non_finite(monkeypatch):
    ended = _series("short run that simply ended", 40)
    full = _series("full", 100)
    assert first_nonfinite(ended) is None and first_nonfinite(full) is None
    assert _crosses(monkeypatch, [ended, full]) == []  # used to cross the short run
    v = np.linspace(2.0, 1.0, 60)
    v[50:] = np.nan
    nan_loss = _series("nan", 60, values=v)
    grad_event = _series("event", 30, nonfinite=[29])  # the store keeps NaN as events
    assert first_nonfinite(nan_loss) == 50 and first_nonfinite(grad_event) == 29
    assert sorted(_crosses(monkeypatch, [nan_loss, grad_event, full])) == [29, 50]


def test_incident_circles_of_different_runs_do_not_cover_each_other(monkeypatch):
    import matplotlib.axes

    calls = []
    real = matplotlib.axes.Axes.annotate

    def spy(self, text, xy, *args, **kwargs):
        if "bbox" in kwargs and str(kwargs["bbox"].get("boxstyle", "")).startswith("circle"):
            calls.append((text, tuple(xy), tuple(kwargs.get("xytext", (0, 0)))))
        return real(self, text, xy, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", spy)
    v = np.linspace(2.0, 1.0, 100)
    v[50] = 20.0
    runs = [_series(f"run {k}", 100, values=v.copy(),
                    incidents=[Incident(number=k + 1, step=50, text="spike")])
            for k in range(4)]  # four runs, the same spike at the same place
    plots.loss_panel(runs)
    assert len(calls) == 4 and len({c[1] for c in calls}) == 1
    offsets = [c[2] for c in calls]
    assert len(set(offsets)) == 4  # each circle has its own place
    for i, a in enumerate(offsets):  # at least a circle's width apart (15 pt)
        for b in offsets[i + 1:]:
            assert np.hypot(a[0] - b[0], a[1] - b[1]) >= 15 - 1e-9


@pytest.mark.parametrize("name", ["\x00nul", "rlo\u202eexe.txt", "\x1b[31mred"])
def test_control_characters_never_reach_a_plot_or_page(tmp_path, name):
    from stablestep.diagnosis.trace import Trace

    loss = 1.0 / (1 + 0.05 * np.arange(60))
    loss[30] *= 30.0
    trace = Trace(steps=np.arange(60), loss=loss, name=name, source=f"mem-{name}")
    html = write_report(trace, tmp_path / "r.html").read_text("utf-8")
    for raw in ("\x00", "\u202e", "\x1b"):
        assert raw not in html


def test_a_run_without_metrics_does_not_block_the_report(store, tmp_path):
    """A crash before the first flush leaves a run with no metrics; the other runs are
    still reported and the empty one is named with the reason."""
    import shutil

    from stablestep.telemetry.store import RunWriter

    path = tmp_path / "runs.sqlite"
    shutil.copy(store, path)
    RunWriter(path, "crashed-before-flush", config={}).close()
    html = write_report(path, tmp_path / "r.html").read_text("utf-8")
    assert "crashed-before-flush" in html and "left out" in html
    assert len(_images(html)) >= 6  # the runs with data are all there


def test_a_fifo_is_refused_not_waited_on(tmp_path, capsys):
    """Opening a FIFO to sniff its header blocked the report forever."""
    import os

    from stablestep.report.build import _is_store

    fifo = tmp_path / "pipe.sqlite"
    os.mkfifo(fifo)
    assert _is_store(str(fifo)) is False  # returns at once, nothing opened
