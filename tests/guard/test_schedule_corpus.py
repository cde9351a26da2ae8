"""The scheduled healthy corpus (``benchmarks/guard_schedules.py``) is built as documented:
its seeds are its own, every schedule family and both callbacks are in it, its warm
restarts happen as often as it says, and its runner trains a schedule (no guard here)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from benchmarks.guard import framework_corpus, healthy_corpus
from benchmarks.guard_schedules import (
    FAMILIES,
    WARM_RESTARTS,
    make_scheduler,
    run_scheduled,
    schedule_corpus,
    warm_restarts,
)

from stablestep.guard import GuardError

CORPUS = schedule_corpus()


def test_seeds_are_the_corpus_own():
    seeds = [s["seed"] for s in CORPUS]
    assert len(set(seeds)) == len(seeds) and all(2000 <= s <= 2099 for s in seeds)
    others = {s["seed"] for s in healthy_corpus(500) + healthy_corpus(900) + framework_corpus()}
    assert not others & set(seeds)
    assert len({s["name"] for s in CORPUS}) == len(CORPUS)


def test_covers_the_families_kinds_optimizers_and_batches():
    assert {s["sched"] for s in CORPUS} == set(FAMILIES)
    plain = [s for s in CORPUS if "framework" not in s]
    assert {s["kind"] for s in plain} == {"mlp-reg", "mlp-cls", "cnn", "gpt2"}
    assert {s["opt"] for s in plain} == {"adam", "adamw", "sgd", "ss-adam-torch", "ss-adam-tf"}
    assert min(s["batch"] for s in CORPUS) == 8 and max(s["batch"] for s in CORPUS) == 512
    assert {s["sched_kw"]["mode"] for s in CORPUS if s["sched"] == "cyclic"} >= {
        "triangular", "exp_range"}
    assert all(300 <= s["steps"] <= 600 for s in CORPUS if s["kind"] != "gpt2")


def test_at_least_12_warm_restart_runs_each_restarting_2_to_5_times():
    warm = [s for s in CORPUS if s["sched"] in WARM_RESTARTS]
    assert len(warm) >= 12
    assert all(2 <= warm_restarts(s) <= 5 for s in warm)
    assert {s["sched_kw"]["T_mult"] for s in warm if s["sched"] == "sgdr"} == {1, 2}


def test_the_callback_runs():
    lit = [s for s in CORPUS if s.get("framework") == "lightning"]
    hf = [s for s in CORPUS if s.get("framework") == "hf"]
    assert len(lit) == 3 and len(hf) == 3
    for s in hf:
        h = s["hf_schedule"]
        assert h["lr_scheduler_type"] == "cosine_with_restarts" and h["warmup_steps"] > 0
        assert h["lr_scheduler_kwargs"]["num_cycles"] == s["sched_kw"]["num_cycles"] >= 3


@pytest.mark.parametrize("spec", [s for s in CORPUS
                                  if s["sched"] not in ("plateau", "hf-cosine-restarts")],
                         ids=lambda s: s["name"])
def test_the_schedule_jumps_back_as_often_as_the_spec_says(spec):
    # the scheduler alone, on a dummy optimizer: the lr stays in [0, peak] (warmups start
    # near 0); SGDR jumps back up exactly at its warm restarts; the one-cycle, warmup and
    # decay schedules never rise again once at their peak
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec["lr"], momentum=0.9)
    sched = make_scheduler(spec, opt)
    lrs = []
    for _ in range(spec["steps"]):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0 <= v <= spec["lr"] * (1 + 1e-9) for v in lrs)
    if spec["sched"] == "sgdr":
        assert sum(b > 1.5 * a for a, b in pairwise(lrs)) == warm_restarts(spec)
    elif spec["sched"] == "cyclic":
        assert max(lrs) > 5 * min(lrs)
    else:
        top = lrs.index(max(lrs))
        assert all(b <= a * (1 + 1e-9) for a, b in pairwise(lrs[top:]))


def test_run_scheduled_trains_a_tiny_run_with_its_schedule():
    spec = {**CORPUS[0], "steps": 24, "sched_kw": {**CORPUS[0]["sched_kw"], "T_0": 8}}
    r = run_scheduled(spec, "none")
    assert math.isfinite(r["final"]) and r["actions"] == 0 and r["error"] is None
    assert len(r["losses"]) == len(r["lrs"]) == 24
    assert sum(b > 1.5 * a for a, b in pairwise(r["lrs"])) == 2  # at 8 and 16


def test_run_scheduled_through_lightning_with_a_plateau_scheduler():
    # the monitored ReduceLROnPlateau entry: Lightning needs the logged train_loss
    lit = next(s for s in CORPUS if s.get("framework") == "lightning"
               and s["sched"] == "plateau")
    r = run_scheduled({**lit, "batch": 256, "steps": 20}, "none")
    assert math.isfinite(r["final"]) and len(r["losses"]) == 20
    assert run_scheduled(lit, "zclip") is None  # only stablestep has a callback


def test_a_guard_error_is_a_failed_run_with_an_action(monkeypatch):
    # the runner's bookkeeping alone, no guard runs: a method whose check raises GuardError
    import benchmarks.guard as bench

    def refuse(self, loss, model, count=True):
        raise GuardError("gave up")

    monkeypatch.setattr(bench.Method, "take", refuse)
    r = run_scheduled({**CORPUS[12], "steps": 5}, "olmo-skip")
    assert r["error"] == "gave up" and r["actions"] == 1 and math.isnan(r["final"])
    assert not bench.healthy(r, {"final": 1.0})


def test_main_tabulates_the_methods(monkeypatch, capsys):
    # main's bookkeeping on made-up results (nothing trains): the table and the last line
    from types import SimpleNamespace

    import benchmarks.guard_schedules as gs

    def made_up(spec, method):
        if "framework" in spec and method not in ("none", "stablestep"):
            return None
        acted = method == "stablestep" and spec["seed"] % 2 == 0
        rec = SimpleNamespace(action="rollback", reason="made-up", step=3)
        return {"final": 1.0 if method == "none" else 1.5, "first": 4.0,
                "actions": int(acted), "guard": SimpleNamespace(records=[rec]),
                "losses": [3.0, 2.0, 1.0] * 4, "lrs": [], "error": None, "stopped": False}

    monkeypatch.setattr(gs, "run_scheduled", made_up)
    monkeypatch.setattr(gs, "bigram_entropy", lambda spec: 2.0)
    assert gs.main(["--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    acted = sum(CORPUS[i]["seed"] % 2 == 0 for i in gs.QUICK)
    assert out[-1] == (f"stablestep false actions on scheduled healthy runs: {acted} "
                       f"({acted} runs)")
    assert sum("rollback(made-up)@3" in line for line in out) == acted
