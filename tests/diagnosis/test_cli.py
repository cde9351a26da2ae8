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
