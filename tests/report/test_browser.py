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
