"""The report is one self-contained HTML file: images inline as PNG data URLs, nothing
fetched from the network, and every user-supplied string escaped."""

from __future__ import annotations

import base64
import re

import pytest

from stablestep.cli import main
from stablestep.report import write_report
from stablestep.report.html import esc, table

from .conftest import HOSTILE


@pytest.fixture(scope="module")
def html(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    write_report(store, out, title=HOSTILE)
    return out.read_text(encoding="utf-8")


def test_user_strings_are_escaped(html):
    assert HOSTILE not in html
    assert "<script>alert" not in html and "<img src=x" not in html
    assert html.count("<script>") == 1  # only the report's own image check
    assert esc(HOSTILE) in html  # shown, as text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_escape_helpers():
    assert esc('<a href="x">&\'') == "&lt;a href=&quot;x&quot;&gt;&amp;&#x27;"
    cell = table(["<h>"], [["<b>"]])
    assert "<b>" not in cell and "&lt;b&gt;" in cell and "&lt;h&gt;" in cell


def test_self_contained_images_are_png(html):
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(srcs) >= 6  # loss, eff step, eps share, precond, lr*lam, grad norm, lr
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_report_cli(store, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(store), "-o", str(out), "--run", "plain"]) == 0
    assert out.exists() and "report:" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.sqlite"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run store" in err
    assert main(["report", str(store), "-o", str(out), "--run", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
