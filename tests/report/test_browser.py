"""Render a report in headless Chromium (Debian's ``chromium``): the page loads, every
image decodes (the page's own script marks ``data-images-ready``), no console errors.
Skipped only when chromium is not installed (``make browser`` installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from stablestep.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(args, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make browser)")
def test_report_renders_in_headless_chromium(store, tmp_path):
    page = write_report(store, tmp_path / "report.html")
    n_imgs = page.read_text(encoding="utf-8").count("<img ")
    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body[^>]*>", res.stdout)
    assert body, res.stdout[:500]
    assert "data-images-broken" not in body.group(0)
    m = re.search(r'data-images-ready="(\d+)"', body.group(0))
    assert m and int(m.group(1)) == n_imgs >= 6, body.group(0)
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert "Refused to" not in res.stderr  # nothing blocked by the CSP, so nothing fetched


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make browser)")
def test_browser_check_catches_a_broken_image(tmp_path):
    """The marker is not set when an image fails, so the test above can fail."""
    from stablestep.report.html import page

    broken = tmp_path / "broken.html"
    broken.write_text(page("broken", '<img alt="x" src="data:image/png;base64,AAAA">'))
    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", broken.as_uri()], tmp_path)
    body = re.search(r"<body[^>]*>", res.stdout).group(0)
    assert 'data-images-broken="1"' in body and "data-images-ready" not in body


# Injected into a copy of the report (the CSP allows inline scripts): after load, the
# page's own width against the viewport, and every image's box against the viewport and
# against its own pixels.
_MEASURE = """<script>
window.addEventListener('load', function () {
  var d = document.documentElement, vw = window.innerWidth, b = document.body;
  var imgs = Array.prototype.slice.call(document.images);
  var wide = imgs.filter(function (i) {
    var r = i.getBoundingClientRect(); return r.right > vw + 0.5 || r.left < -0.5; });
  var scaled = imgs.filter(function (i) {
    return i.getBoundingClientRect().width < i.naturalWidth - 0.5; });
  b.setAttribute('data-viewport', String(vw));
  b.setAttribute('data-scroll-width', String(d.scrollWidth));
  b.setAttribute('data-images', String(imgs.length));
  b.setAttribute('data-images-outside', String(wide.length));
  b.setAttribute('data-images-scaled', String(scaled.length));
});
</script>"""


# Headless Chromium will not make a window narrower than 500 px, so the report is shown
# in an iframe exactly ``width`` px wide (its own viewport: media queries, innerWidth and
# the page's CSP apply inside); the outer page copies the measurements out.
_FRAME = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="f" style="border:0;width:{width}px;height:900px" srcdoc="{srcdoc}"></iframe>
<script>
document.getElementById('f').addEventListener('load', function () {{
  var inner = this.contentDocument.body;
  Array.prototype.slice.call(inner.attributes).forEach(function (a) {{
    if (a.name.indexOf('data-') === 0) {{ document.body.setAttribute(a.name, a.value); }}
  }});
}});
</script></body></html>"""


def framed(html, width):
    """An outer page showing ``html`` in an iframe ``width`` px wide."""
    import html as html_mod

    return _FRAME.format(width=width, srcdoc=html_mod.escape(html, quote=True))


def _measure(html, width, tmp_path):
    page = tmp_path / f"measure-{width}.html"
    page.write_text(framed(html.replace("</body>", _MEASURE + "</body>"), width),
                    encoding="utf-8")
    res = _chromium([f"--window-size={max(width + 50, 600)},1000", "--hide-scrollbars",
                     "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body[^>]*>", res.stdout).group(0)
    return {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', body)}


@pytest.fixture(scope="module")
def two_run_log(tmp_path_factory):
    """A CSV of two runs (a log without optimizer state) with a long run name."""
    p = tmp_path_factory.mktemp("log") / "two.csv"
    rows = [f"{i},{(20.0 if i == 70 else 1.0) / (1 + 0.01 * i)},{run}"
            for run in ("a-rather-long-run-name-that-a-sweep-tool-generated-" * 3, "b")
            for i in range(150)]
    p.write_text("step,loss,run\n" + "\n".join(rows) + "\n")
    return p


@pytest.fixture(scope="module")
def reports(store, two_run_log, tmp_path_factory):
    """The report of a run store and of a CSV log, as HTML text."""
    out = tmp_path_factory.mktemp("reports")
    return [write_report(src, out / f"r{i}.html").read_text(encoding="utf-8")
            for i, src in enumerate((store, two_run_log))]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make browser)")
@pytest.mark.parametrize("width", [390, 1400])
def test_layout_has_no_horizontal_overflow_and_images_scale(reports, width, tmp_path):
    for html in reports:
        m = _measure(html, width, tmp_path)
        assert m["viewport"] == width, m
        assert m["scroll-width"] <= width, m  # the page never scrolls sideways
        assert m["images"] >= 1 and m["images-outside"] == 0, m
        if width == 390:  # every panel is drawn wider than a phone: all scaled down
            assert m["images-scaled"] == m["images"], m


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make browser)")
def test_layout_check_catches_a_fixed_minimum_column(reports, tmp_path):
    """The old grid (a 620 px minimum column) overflows at 390 px, so the test above can
    fail."""
    old = reports[0].replace("</style>", ".grid{grid-template-columns:repeat(auto-fit,"
                       "minmax(620px,1fr))}</style>")
    m = _measure(old, 390, tmp_path)
    assert m["scroll-width"] > 390 and m["images-outside"] > 0, m
