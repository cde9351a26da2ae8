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
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


def test_escape_helpers():
    assert esc('<a href="x">&\'') == "&lt;a href=&#34;x&#34;&gt;&amp;&#39;"
    cell = str(table(["<h>"], [["<b>"]]))
    assert "<b>" not in cell and "&lt;b&gt;" in cell and "&lt;h&gt;" in cell
    # raw cells are this package's own HTML: passed through, the rest still escaped
    cell = str(table(["<h>"], [["<b>ok</b>"]], raw=True))
    assert "<b>ok</b>" in cell and "&lt;h&gt;" in cell


def test_templates_autoescape_everything_they_print():
    from markupsafe import Markup

    from stablestep.report.templates import TEMPLATES, environment, get

    assert environment().autoescape is True
    for name in TEMPLATES:  # no template opts out of escaping
        assert "|safe" not in TEMPLATES[name].replace(" ", "") and "autoescape" not in \
            TEMPLATES[name]
    out = get("img").render(alt=HOSTILE, src="data:image/png;base64,AAAA")
    assert "<script>" not in out and "onerror=alert(1)>" not in out
    assert get("img").render(alt=Markup("<b>"), src="x").count("<b>") == 1


def test_control_and_bidi_characters_are_not_copied_into_the_html(tmp_path):
    from stablestep.report import write_report

    p = tmp_path / "evil.csv"
    name = "a\u202eexe.txt\x1b[31m"
    p.write_text("step,loss,run\n" + "".join(f"{i},{1.0 / (i + 1)},{name}\n"
                                              for i in range(30)), encoding="utf-8")
    html = write_report(p, tmp_path / "r.html", title="t\u202e\x00").read_text("utf-8")
    for raw in ("\x00", "\u202e", "\x1b"):
        assert raw not in html
    assert "a\\u202eexe.txt\\x1b[31m" in html  # shown, as visible escapes


def test_self_contained_images_are_png(html):
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(srcs) >= 6  # loss, eff step, eps share, precond, lr*lam, grad norm, lr
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "Not in this log:" not in html  # a Monitor's store fills every panel


def test_report_cli(store, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(store), "-o", str(out), "--run", "plain"]) == 0
    assert out.exists() and "report:" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.sqlite"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert main(["report", str(store), "-o", str(out), "--run", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_a_missing_run_gets_one_message_whichever_command(store, tmp_path, capsys):
    """diagnose and report pass the readers' message through unchanged; export (the
    readers' command) must say the same."""
    errors = []
    for argv in (["diagnose", str(store), "--run", "nope"],
                 ["report", str(store), "--run", "nope", "-o", str(tmp_path / "r.html")],
                 ["export", str(store), "--run", "nope", "--csv"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("stablestep: error: ") and err.count("\n") == 1, err
        errors.append(err)
    assert "'nope'" in errors[0]
    assert len(set(errors)) == 1, errors


def test_report_output_that_cannot_be_written_is_one_line_before_any_work(store, tmp_path,
                                                                          capsys, monkeypatch):
    import stablestep.report.build as build

    monkeypatch.setattr(build, "load_runs", lambda *a, **k: pytest.fail("read the input"))
    assert main(["report", str(store), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(store), "-o", str(blocker / "r.html")]) == 2
    assert "not a directory" in capsys.readouterr().err
    import os

    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["report", str(store), "-o", str(ro / "r.html")]) == 2
        assert "permission denied" in capsys.readouterr().err
