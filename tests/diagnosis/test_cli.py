"""`stablestep diagnose PATH [--run NAME] [--json]`."""

import json

from stablestep.cli import main


def _log(tmp_path):
    p = tmp_path / "log.csv"
    loss = [1.0 - 0.01 * i for i in range(40)]
    loss[30] = 9.0
    p.write_text("step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(loss)))
    return str(p)


def test_json_contract(tmp_path, capsys):
    path = _log(tmp_path)
    assert main(["diagnose", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"source", "findings"}
    (f,) = doc["findings"]
    assert set(f) == {"step", "kind", "mechanism", "confidence", "evidence", "remedies"}
    assert (f["step"], f["kind"], f["mechanism"]) == (30, "spike", "unknown")
    assert isinstance(f["confidence"], float)
    for r in f["remedies"]:
        assert set(r) == {"action", "value", "why"}


def test_table_names_the_incident(tmp_path, capsys):
    assert main(["diagnose", _log(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spike" in out and "unknown" in out and "grad_norm" in out


def test_clean_log_says_so(tmp_path, capsys):
    p = tmp_path / "clean.csv"
    p.write_text("step,loss\n" + "".join(f"{i},{1.0 / (i + 1)}\n" for i in range(50)))
    assert main(["diagnose", str(p)]) == 0
    assert "no spike" in capsys.readouterr().out


def test_unusable_input_exit_2_one_line(tmp_path, capsys):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    assert main(["diagnose", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stablestep: error:") and err.count("\n") == 1
    assert main(["diagnose", str(tmp_path / "missing.csv"), "--json"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_human_output_fits_80_and_120_columns(tmp_path):
    import io

    from rich.console import Console

    from stablestep.diagnosis import diagnose
    from stablestep.diagnosis.cli import _fmt, render

    path = _log(tmp_path)
    (f,) = diagnose(path)
    for width in (80, 120):
        buf = io.StringIO()
        render([f], source=path, console=Console(file=buf, width=width, color_system=None))
        lines = buf.getvalue().splitlines()
        assert max(len(ln) for ln in lines) <= width
        text = buf.getvalue()
        # evidence as key: value lines, remedies as "action value -- why" lines
        assert "    peak_over_baseline: " in text
        flat = " ".join(text.split())
        for r in f.remedies:
            assert any(ln.startswith(f"    {r.action} ") for ln in lines)
            assert " ".join(f"{r.action} {_fmt(r.value)} -- {r.why}".split()) in flat
        # the table row keeps step, kind and mechanism on one line at either width
        assert any("30" in ln and "spike" in ln and "unknown" in ln for ln in lines)


def test_not_a_terminal_prints_120_wide(tmp_path, capsys):
    assert main(["diagnose", _log(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(ln) for ln in lines) <= 120
    assert any(len(ln) > 80 for ln in lines)  # the remedies' sentences use the width


def test_unreadable_rows_are_skipped_with_a_one_line_warning(tmp_path, capsys):
    p = tmp_path / "partly.csv"
    p.write_text("step,loss\n" + "".join(f"{i},{1.0 / (i + 1)}\n" for i in range(30))
                 + "30,oops\n31,0.03\n")
    assert main(["diagnose", str(p), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["findings"] == []
    assert out.err == f"stablestep: warning: {p}: skipped 1 record(s) whose step or 'loss' " \
                      "is not a number\n"
    assert main(["diagnose", _log(tmp_path)]) == 0  # a clean file warns about nothing
    assert capsys.readouterr().err == ""
