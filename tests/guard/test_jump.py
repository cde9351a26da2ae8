"""The jump rule is the stack's, so the Guard acts on the jumps ``diagnose`` reports: an lr
jump x1000 in a GPT-2 run (the loss jumps and stays high) and a blow-up from step 1."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from stablestep.diagnosis import diagnose
from stablestep.diagnosis.core import incidents
from stablestep.diagnosis.stack import DetectorStack, JumpConfig, StackConfig
from stablestep.guard import Guard
from stablestep.telemetry import Monitor

pytest.importorskip("transformers")


def _gpt2_run(store, run: str, *, lr: float, jump_at: int | None, steps: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                     attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    factor = (lambda t: 1.0 if t < jump_at else 1000.0) if jump_at is not None else (
        lambda t: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(1)
    # a learnable stream: each sequence repeats a short random motif
    motifs = torch.randint(1, 64, (8, 4), generator=g)
    losses = []
    with Monitor(model, opt, store=str(store), run=run) as mon:
        guard = Guard(model, opt, monitor=mon)
        for _ in range(steps):
            x = motifs[torch.randint(8, (8,), generator=g)].repeat(1, 4)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            mon.observe(loss)
            losses.append(float(loss.detach()))
            if guard.check(loss):
                opt.step()
            sched.step()
        guard.close()
    return guard, losses


def _same_as_replay(guard, store, run):
    live = [(i.step, i.kind) for i in guard.incidents]
    assert [(i.step, i.kind) for i in incidents(str(store), run=run)] == live


def test_lr_jump_x1000_is_rolled_back_and_the_lr_cut_live_as_diagnose_reports(tmp_path):
    store = tmp_path / "runs.db"
    guard, losses = _gpt2_run(store, "jump", lr=1e-3, jump_at=40, steps=90)
    _same_as_replay(guard, store, "jump")
    jumps = [i for i in guard.incidents if i.kind == "divergence" and i.rule == "jump"]
    assert jumps and 38 <= jumps[0].onset <= 45, guard.incidents
    rb = [r for r in guard.records if r.action == "rollback"]
    assert rb and rb[0].data["to_step"] < jumps[0].onset
    assert rb[0].data["cause"] == "lr-jump" and rb[0].data["lr_jump"]["factor"] >= 100
    cut = [r for r in guard.records if r.action == "adapt" and r.data.get("remedy") == "lr"]
    assert cut and guard.lr_scale < 1.0
    # diagnose names the same regime, at the same onset, with the lr jump as its cause
    found = [f for f in diagnose(str(store)) if f.kind == "divergence"]
    assert any(f.step == jumps[0].onset and "lr_jump" in f.evidence for f in found), found
    # the run ends back near its pre-jump loss (it went past 3x that after the jump)
    pre = statistics.median(losses[30:40])
    assert max(losses[40:55]) > 3 * pre
    assert statistics.median(losses[-10:]) < 1.5 * pre


def test_blow_up_from_step_1_is_rolled_back_live_as_diagnose_reports(tmp_path):
    store = tmp_path / "runs.db"
    guard, losses = _gpt2_run(store, "blowup", lr=1.0, jump_at=None, steps=40)
    _same_as_replay(guard, store, "blowup")
    jumps = [i for i in guard.incidents if i.kind == "divergence" and i.rule == "jump"]
    assert jumps and jumps[0].onset <= 2, guard.incidents
    rb = [r for r in guard.records if r.action == "rollback" and r.reason == "divergence"]
    assert rb and rb[0].data["to_step"] == 0 and rb[0].data["cause"] == "blow-up-from-start"
    # far past the edge, not near it: the lr goes to its bound at once (restored when calm)
    assert guard.lr_scale == guard.policy.min_lr_scale
    found = [f for f in diagnose(str(store)) if f.kind == "divergence"]
    assert any(f.step == jumps[0].onset for f in found), found


def test_healthy_noisy_stream_raises_no_jump_and_state_round_trips():
    g = torch.Generator().manual_seed(5)
    base = torch.exp(-torch.arange(300) / 80.0) + 0.02
    noisy = (base * torch.exp(0.5 * torch.randn(300, generator=g))).tolist()
    stack = DetectorStack()
    for t, v in enumerate(noisy):
        stack.update(t, v)
    assert not [i for i in stack.incidents if i.rule == "jump"]
    # a jump x20 that stays is one divergence, raised hold - 1 records after it
    a, b = DetectorStack(), DetectorStack()
    stream = noisy[:150] + [20 * v + 1 for v in noisy[150:]]
    for t, v in enumerate(stream[:155]):
        a.update(t, v)
    b.load_state_dict(a.state_dict())
    for t, v in enumerate(stream[155:], start=155):
        assert a.update(t, v) == b.update(t, v)
    j = [i for i in a.incidents if i.rule == "jump"]
    assert [i.kind for i in j] == ["divergence"] and 148 <= j[0].onset <= 150
    assert j[0].step == 150 + JumpConfig().hold - 1
    assert StackConfig.from_dict(StackConfig().to_dict()) == StackConfig()
    with pytest.raises(ValueError):
        JumpConfig(factor=1.0)
    assert math.isfinite(j[0].score)


def _feed(guard, model, opt, losses):
    """Drive the guard with a given loss stream (a tiny model, gradients of a fixed batch)."""
    x = torch.ones(4, 8)
    out = []
    for v in losses:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        out.append(guard.check(float(v)))
        opt.step()
    return out


def _stream(seed, n, level):
    g = torch.Generator().manual_seed(seed)
    return (level * torch.exp(0.1 * torch.randn(n, generator=g))).tolist()


def test_a_jump_that_stays_high_after_the_rollback_is_rolled_back_again_then_a_person():
    from stablestep.guard import GuardError, GuardPolicy
    from tests.guard.conftest import mlp

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=20))
    # calm at 1.0, then the loss jumps x10 and stays whatever the guard does
    with pytest.raises(GuardError, match="stays .* above its level"):
        _feed(guard, model, opt, _stream(0, 60, 1.0) + _stream(1, 200, 10.0))
    rb = [r for r in guard.records if r.action == "rollback"]
    assert len(rb) >= 2 and rb[1].data["cause"] == "stays-high-after-rollback"
    assert all(r.data["to_step"] < 60 for r in rb)
    cuts = [r.data["lr_scale"] for r in guard.records if r.action == "adapt"]
    assert cuts == sorted(cuts, reverse=True) and cuts[-1] == guard.policy.min_lr_scale


def test_a_jump_that_comes_back_after_the_rollback_is_left_alone():
    from tests.guard.conftest import mlp

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = Guard(model, opt)
    # the jump stays for its hold window, then (after the rollback) the loss is back
    _feed(guard, model, opt, _stream(0, 60, 1.0) + _stream(1, 12, 10.0) + _stream(2, 80, 1.1))
    rb = [r for r in guard.records if r.action == "rollback"]
    assert len(rb) == 1 and rb[0].data["cause"] == "loss-jump"
    assert guard.lr_scale == 0.5
    # the stack watched the loss come back: no stays-high incident after the rollback
    assert not [i for i in guard.incidents if i.rule == "stays-high"], guard.incidents
