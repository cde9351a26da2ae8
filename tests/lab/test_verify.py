"""Verified remedies in the lab: the failing variant's finding says which remedies removed
the incident when the run was replayed from before its onset."""

from __future__ import annotations

from stablestep.lab.pages import verified_note
from stablestep.lab.runner import run_scenario


def test_lab_finding_says_which_remedies_were_verified(tmp_path):
    out = run_scenario("lr-divergence", out=tmp_path, variants=["gd-lr1e-3"], report=False)
    v = out.variant("gd-lr1e-3")
    assert v.findings, "the failing setting no longer fails"
    verified = [f for f in v.findings if f.get("verified")]
    assert len(verified) == 1  # the first finding with replayable remedies
    f = verified[0]
    control, *rest = f["verified"]
    assert control["action"] == "control" and not control["removed"]  # the replay fails too
    assert rest and {r["action"] for r in rest} <= {r["action"] for r in f["remedies"]}
    lr = [r for r in rest if r["action"] == "set-lr"]
    assert lr and lr[0]["removed"], lr  # the computed stable lr trains past the onset
    assert lr[0]["summary"].startswith("verified: set-lr")
    assert "no incident in the next" in lr[0]["summary"]
    note = verified_note(f)
    assert "verified: set-lr" in note


def test_verified_note_without_replay_is_empty():
    assert verified_note({"remedies": []}) == ""
    ctl = {"action": "control", "removed": True, "summary": "verified: the run as is"}
    assert "nothing to verify" in verified_note({"verified": [ctl]})
