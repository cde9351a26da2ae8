"""The Incidents section: headline sentence, compact evidence table with summarised
lists, remedies as "action = value -- why" with formatted values, everything escaped,
badge numbers matching the loss panel's markers."""

from __future__ import annotations

import re

from stablestep.report.html import incident_list, incidents_for
from stablestep.report.incidents import (
    evidence_rows,
    headline,
    incident_html,
    remedy_value,
    summarise,
)
from stablestep.report.plots import Series

from .conftest import HOSTILE

ALARMS = [3058, 3065] + list(range(3100, 9871, 90))  # 77 alarms, 3058..9870 (max 9850)


def _periodic() -> dict:
    return {
        "step": 1938, "kind": "periodic-spikes", "mechanism": "adaptive-edge-of-stability",
        "confidence": 0.75,
        "evidence": {"detected_at": 1943, "baseline_loss": 0.000155, "peak_loss": 0.00017,
                     "precond_sharpness": 37.7, "precond_threshold": 38.0,
                     "peak_over_baseline": 1.1, "follow_on_alarms": ALARMS,
                     "spike_steps": ALARMS, "period": 212.0, "n_episodes": 30,
                     "mechanism_counts": {"adaptive-edge-of-stability": 28, "unknown": 2},
                     "peak_over_baseline_median": 1.4, "run": HOSTILE},
        "remedies": [
            {"action": "set-eps", "value": 0.0017, "why": "caps the effective step"},
            {"action": "amsgrad", "value": True, "why": "v never decreases"},
            {"action": "exponential-decay", "value": {"decay_rate": 0.9, "decay_steps": 16},
             "why": HOSTILE},
        ],
    }


def test_headline_names_mechanism_and_numbers():
    text = headline(_periodic(), "Adam, 128 points")
    assert text.startswith("Adam, 128 points, step 1938: 30 recurring loss spikes")
    assert "Adam's preconditioned sharpness lam_max(P^-1 H) reached 37.7, at its bound 38" in text
    assert ", while the loss rose 1.4x (median over the spikes)" in text
    assert "confidence 0.75" in text
    f = {"step": 5, "kind": "spike", "mechanism": "lr-too-high", "confidence": 0.9,
         "evidence": {"lr_sharpness": 3.1, "gd_threshold": 2.0, "peak_over_baseline": 4.0}}
    assert "lr * lam_max(H) reached 3.1, above its bound 2, while the loss rose 4x" in headline(f)


def test_list_evidence_is_summarised_as_count_and_range():
    assert summarise(ALARMS) == f"{len(ALARMS)} values, 3058-{max(ALARMS)}"
    rows = {r[0]: r for r in evidence_rows(_periodic())}
    assert rows["spike alarms"][1] == f"{len(ALARMS)}, steps 3058-{max(ALARMS)}"
    assert rows["lam_max(P^-1 H)"][1:3] == ["37.7", "bound 38"]
    assert rows["episodes by mechanism"][1] == "adaptive-edge-of-stability 28, unknown 2"
    block = incident_html(3, "run", _periodic())
    assert "3065, 3100" not in block  # the list is never dumped
    assert "periodic-spikes / adaptive-edge-of-stability</code>" in block  # as in the JSON
    assert "follow_on_alarms</code>: 77 values" in block.replace(str(len(ALARMS)), "77")


def test_remedy_values_are_formatted():
    assert remedy_value("exponential-decay", {"decay_rate": 0.9, "decay_steps": 16}) == \
        "decay_rate 0.9 every 16 steps"
    assert remedy_value("amsgrad", True) == "on"
    assert remedy_value("restore", 1200) == "step 1200"
    assert remedy_value("set-eps", 0.0017123) == "0.00171"
    assert remedy_value("record", ["sharpness", "g2v_rms"]) == "sharpness, g2v_rms"
    block = incident_html(1, "run", _periodic())
    assert "<code>exponential-decay = decay_rate 0.9 every 16 steps</code>\n&mdash;" in block
    assert "{&#39;decay_rate" not in block and "{'decay_rate" not in block


def test_incident_block_escapes_every_finding_string():
    f = _periodic()
    f["mechanism"] = HOSTILE
    f["remedies"].append({"action": HOSTILE, "value": {HOSTILE: HOSTILE}, "why": "x"})
    f["evidence"][HOSTILE] = [HOSTILE]
    block = incident_html(2, HOSTILE, f, color='red"><script>')
    assert "<script" not in block and "<img" not in block
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in block


def test_numbers_match_loss_panel_markers():
    incs = incidents_for([_periodic(), {"step": 9, "kind": "non-finite",
                                        "mechanism": "non-finite", "confidence": 0.95,
                                        "evidence": {"first_non_finite_step": 9,
                                                     "last_finite_loss": 1e6}}], 4)
    assert [i.number for i in incs] == [4, 5]
    page = incident_list([Series(label="a", metrics={}, incidents=incs)])
    assert re.findall(r'id="incident-(\d+)"', page) == ["4", "5"]
    assert re.findall(r'class="badge"[^>]*>(\d+)<', page) == ["4", "5"]
    assert "the loss became non-finite (NaN/Inf)" in page and "last finite loss was 1e+06" in page
    assert incident_list([Series(label="a", metrics={})]) == "<p>No incidents were found.</p>"
