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


def test_verify_from_a_guard_snapshot():
    """A Guard snapshot taken before the lr was set 500x too high: replayed unchanged the
    run blows up, replayed with the lr set back it does not; the live state is untouched."""
    import torch

    from stablestep.guard import Guard, GuardPolicy
    from stablestep.lab.verify import verify_snapshot

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=20))

    def train_step(t: int) -> float:
        idx = torch.randint(128, (32,), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        return loss.item()

    losses = []
    for t in range(60):
        idx = torch.randint(128, (32,), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        losses.append(loss.item())
        if guard.check(loss):
            opt.step()
    snaps = guard.state_dict()["snapshots"]
    assert snaps
    for grp in opt.param_groups:
        grp["lr"] = 0.5  # the cause: an lr 500x too high from here on
    before = [p.detach().clone() for p in model.parameters()]
    vs = verify_snapshot(model, opt, snaps[-1], train_step,
                         [{"action": "set-lr", "value": 1e-3},
                          {"action": "skip-batch", "value": 12}],
                         horizon=60, history=losses[:snaps[-1]["step"]])
    assert vs[0].action == "control" and not vs[0].removed
    assert vs[1].removed and vs[1].summary.startswith("verified: set-lr")
    assert vs[2].summary.startswith("not replayable")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.param_groups[0]["lr"] == 0.5
