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


def test_human_output_fits_80_and_120_columns_actions_first(tmp_path):
    import io

    from rich.console import Console

    from stablestep.diagnosis import diagnose
    from stablestep.diagnosis.cli import _fmt, render

    path = _log(tmp_path)
    (f,) = diagnose(path)
    for width in (80, 120):
        for verbose in (False, True):
            buf = io.StringIO()
            render([f], source=path, console=Console(file=buf, width=width, color_system=None),
                   verbose=verbose)
            text = buf.getvalue()
            lines = text.splitlines()
            assert max(len(ln) for ln in lines) <= width
            # what to do comes before why; the evidence only with --verbose
            assert text.index("what to do") < text.index("why:")
            assert ("    peak_over_baseline: " in text) == verbose
            if verbose:
                assert text.index("why:") < text.index("evidence:")
            flat = " ".join(text.split())
            for r in f.remedies:
                assert any(ln.startswith(f"    {r.action} = ") for ln in lines)
                assert " ".join(f"-- {r.why}".split()) in flat
            # the table row keeps step, kind and mechanism on one line at either width
            assert any("30" in ln and "spike" in ln and "unknown" in ln for ln in lines)
    assert _fmt(1.23456) == "1.23"


def _two_runs(tmp_path):
    p = tmp_path / "two.csv"
    rows = []
    for run in ("alpha", "beta"):
        for i in range(120):
            v = 1.0 / (1 + 0.01 * i) * (20.0 if i == 70 else 1.0)
            rows.append(f"{i},{v},{run}")
    p.write_text("step,loss,run\n" + "\n".join(rows) + "\n")
    return str(p)


def test_summary_has_a_run_column_and_says_what_was_read(tmp_path, capsys):
    assert main(["diagnose", _two_runs(tmp_path)]) == 0
    out, err = capsys.readouterr()
    header = next(ln for ln in out.splitlines() if " step " in ln)
    assert header.split()[:3] == ["#", "run", "step"]
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["1"], ["2"])]
    assert [r[1] for r in rows] == ["alpha", "beta"] and all(r[2] == "70" for r in rows)
    assert "run alpha, step 70" in out and "run beta, step 70" in out
    # which run and how many points were read, on stderr (stdout stays the result)
    assert err.count("120 points") == 2 and "alpha" in err and "beta" in err
    assert main(["diagnose", _two_runs(tmp_path), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_four_findings_fit_on_a_screen(tmp_path, capsys):
    p = tmp_path / "four.csv"
    rows = []
    for run, spikes in (("a", (60, 250)), ("b", (90, 300))):  # two runs, two spikes each
        rows += [f"{i},{(25.0 if i in spikes else 1.0) / (1 + 0.01 * i)},{run}\n"
                 for i in range(400)]
    p.write_text("step,loss,run\n" + "".join(rows))
    from stablestep.diagnosis import diagnose

    n = len(diagnose(str(p)))
    assert n >= 3
    assert main(["diagnose", str(p)]) == 0
    out = capsys.readouterr().out
    assert sum(ln.startswith("[") for ln in out.splitlines()) == n
    assert len(out.splitlines()) <= 12 + 8 * n, out
    assert main(["diagnose", str(p), "--verbose"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > len(out.splitlines())


def test_piped_output_honours_columns(tmp_path, capsys, monkeypatch):
    for cols in (60, 150):
        monkeypatch.setenv("COLUMNS", str(cols))
        assert main(["diagnose", _log(tmp_path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(len(ln) for ln in lines) <= cols
        if cols == 60:
            assert max(len(ln) for ln in lines) > 40  # the sentences use the width
    monkeypatch.delenv("COLUMNS")
    assert main(["diagnose", _log(tmp_path)]) == 0  # piped, no COLUMNS: 80, not 120
    assert max(len(ln) for ln in capsys.readouterr().out.splitlines()) <= 80


def test_hostile_names_do_not_reach_the_terminal_raw(tmp_path, capsys):
    p = tmp_path / "evil.csv"
    rows = [f"{i},{(20.0 if i == 70 else 1.0) / (1 + 0.01 * i)},\x1b[2J\u202eevil"
            for i in range(120)]
    p.write_text("step,loss,run\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert main(["diagnose", str(p)]) == 0
    out, err = capsys.readouterr()
    for raw in ("\x1b", "\u202e"):
        assert raw not in out and raw not in err
    assert "\\x1b[2J\\u202eevil" in out


def test_unreadable_rows_are_skipped_with_a_one_line_warning(tmp_path, capsys):
    p = tmp_path / "partly.csv"
    p.write_text("step,loss\n" + "".join(f"{i},{1.0 / (i + 1)}\n" for i in range(30))
                 + "30,oops\n31,0.03\n")
    assert main(["diagnose", str(p), "--json", "-q"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["findings"] == []
    assert out.err.startswith(f"stablestep: warning: {p}: skipped 1 record(s)")
    assert out.err.count("\n") == 1 and "not a number" in out.err
    assert main(["diagnose", _log(tmp_path), "-q"]) == 0  # a clean file warns about nothing
    assert capsys.readouterr().err == ""
