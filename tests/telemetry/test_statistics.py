"""Every statistic the Monitor stores equals its definition recomputed from the
optimizer's own state (torch.optim as the reference), in both epsilon conventions."""

from __future__ import annotations

import math

import pytest
import torch

import stablestep
from stablestep.telemetry import Monitor, open_run
from stablestep.telemetry.probes import CoordinateSample, quantiles
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

from .helpers import loss_of, reference_stats, tiny_problem

# Cases beyond the table's rows (tests/optim_table.py): weight decay, a small eps, plain GD,
# and the TF convention declared through a torch param group (the state of a Keras-trained
# run read by torch). Each: (build, eps_mode the reference uses, kind).
EXTRA = {
    "adam-tiny-eps": (lambda ps: torch.optim.Adam(ps, lr=3e-2, eps=1e-3), "torch", "adam"),
    "adamw-decay": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), "torch", "adam"),
    "adam-tf-group": (lambda ps: torch.optim.Adam(
        [{"params": list(ps), "eps_mode": "tf"}], lr=3e-2, eps=1e-3), "tf", "adam"),
    "ss-adamw-amsgrad-decay": (lambda ps: stablestep.AdamW(
        ps, lr=3e-2, amsgrad=True, weight_decay=0.1), "torch", "adam"),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), None, "sgd"),
}
# every row whose statistics reference_stats writes out (AdamAtan2 has no epsilon: its own
# tests above)
CASES = {
    **{i.name: (i, i.eps_mode, i.kind) for i in OPTIMIZER_TABLE
       if i.kind == "sgd" or "epsilon" not in i.not_applicable},
    **EXTRA,
}


@pytest.mark.parametrize("name", list(CASES))
def test_stored_statistics_equal_definitions(tmp_path, name):
    torch.manual_seed(0)
    model, x, y = tiny_problem()
    make, eps_mode, kind = CASES[name]
    opt = make(model.parameters())
    expected = {}
    with Monitor(model, opt, store=tmp_path / "s.db", run=name, state_every=1) as mon:
        for step in range(12):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad.detach().clone() for p in model.parameters()]
            mon.observe(loss)
            opt.step()
            ref = reference_stats(opt, model, before, grads, eps_mode=eps_mode or "torch")
            ref["loss"] = loss.item()
            ref["lr"] = opt.param_groups[0]["lr"]
            ref["grad_norm"] = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            ref["grad_nonfinite"] = 0.0
            expected[step] = ref
    run = open_run(tmp_path / "s.db", name)
    assert run.config["optimizer"] == type(opt).__name__
    assert run.config["hyper"]["kind"] == kind
    names = set(run.names())
    assert set(expected[0]) <= names
    if kind == "sgd":
        assert "eff_step_max" not in names
    for stat in expected[0]:
        steps, values = run.series(stat)
        assert steps.tolist() == list(range(12)), stat
        want = [expected[s][stat] for s in range(12)]
        assert values.tolist() == pytest.approx(want, rel=2e-4, abs=1e-12), stat
    # per-tensor gradient norms for every tensor, and the worst tensors by name
    _, w = run.series("grad_norm/0.weight")
    assert w[0] == pytest.approx(float(torch.linalg.vector_norm(_first_grad())), rel=1e-5)
    if kind != "sgd":
        assert sum(n.startswith("eff_step_max/") for n in names) == 3


def _first_grad():
    model, x, y = tiny_problem()
    loss_of(model, x, y).backward()
    return model[0].weight.grad


def test_amsgrad_gap_is_positive_once_v_decays(tmp_path):
    model, x, y = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2, amsgrad=True, betas=(0.9, 0.9))
    with Monitor(model, opt, store=tmp_path / "s.db", state_every=1) as mon:
        for _ in range(30):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            mon.observe(loss)
            opt.step()
        _, gap = mon.read().series("amsgrad_gap")
    assert gap[0] == 0.0 and gap.max() > 0.01


def test_sampled_quantiles_within_5_percent_of_exact():
    # a heavy-tailed spread of effective steps over 4M coordinates in uneven tensors
    g = torch.Generator().manual_seed(1)
    sizes = [3_000_000, 700_000, 299_990, 10]
    xs = [torch.randn(n, generator=g).mul_(1.5).exp_() for n in sizes]
    sample = CoordinateSample(sizes, 65536)
    assert not sample.exact
    est = quantiles(torch.cat([sample.take(i, x) for i, x in enumerate(xs)]), [0.5, 0.9, 0.99])
    exact = torch.quantile(
        torch.cat(xs)[::4].double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.double)
    )
    for e, x in zip(est, exact.tolist(), strict=True):
        assert abs(e / x - 1) < 0.05


def test_monitor_quantiles_from_sample_match_exact(tmp_path):
    # 270k Adam coordinates, sample of 20k: estimates from the store vs torch.quantile
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 16)
    )
    x, y = torch.randn(32, 512), torch.randn(32, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, store=tmp_path / "s.db", quantile_sample=20000, state_every=1)
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        mon.observe(loss)
        opt.step()
    mon.close()
    ref = reference_stats(
        opt, model, [p.detach() for p in model.parameters()], [p.grad for p in model.parameters()]
    )
    run = open_run(tmp_path / "s.db")
    for k in ("eff_step_p50", "eff_step_p90", "eff_step_p99"):
        assert abs(run.series(k)[1][-1] / ref[k] - 1) < 0.05, k
    assert run.series("eff_step_max")[1][-1] == pytest.approx(ref["eff_step_max"], rel=1e-5)


def test_eps_free_optimizer_uses_its_own_effective_step(tmp_path):
    # AdamAtan2 has no epsilon: the Monitor asks the optimizer for its effective step
    model, x, y = tiny_problem()
    opt = stablestep.AdamAtan2(model.parameters(), lr=1e-2)
    with Monitor(model, opt, store=tmp_path / "s.db", state_every=1) as mon:
        for _ in range(5):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            mon.observe(loss)
            opt.step()
        run = mon.read()
    assert run.events == []
    want = max(float(opt.effective_step(p).max()) for p in model.parameters())
    assert run.series("eff_step_max")[1][-1] == pytest.approx(want, rel=1e-6)
    assert run.series("eps_share")[1].tolist() == [0.0] * 5


# ------------------------------------------------------------ over the table of optimizers
# The Adam-family statistics against the optimizer's actual update, for every row of
# tests/optim_table.py (torch's and stablestep's, the TF convention on the optimizer that runs
# it, AMSGrad, StableAdamW's update clipping, AdamAtan2): D = -(theta_t - theta_{t-1}) /
# direction, read off the step the optimizer took, in float64.

STEPS = 6


def _row_eps_t(info, group, t):
    """The epsilon added to sqrt(v_hat), written from the convention the row runs."""
    if info.eps_mode is None:
        return 0.0
    bc2 = 1 - group["betas"][1] ** t
    return group["eps"] / math.sqrt(bc2) if info.eps_mode == "tf" else group["eps"]


def _monitored_row(info, tmp_path):
    """STEPS monitored steps of the row on the float64 tiny problem; per step the actual
    effective steps, the eps share implied by them and the g2v ratio from the state."""
    model, x, y = tiny_problem()
    model = model.double()
    x, y = x.double(), y.double()
    opt = info(model.parameters())
    params = list(model.parameters())
    ref = []
    with Monitor(model, opt, store=tmp_path / "s.db", run=info.name, state_every=1) as mon:
        for _ in range(STEPS):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            before = [p.detach().clone() for p in params]
            mon.observe(loss)
            opt.step()
            group = opt.param_groups[0]
            effs, governed, ratios = [], [], []
            for p, b in zip(params, before, strict=True):
                g = p.grad.detach()
                d = info.direction(opt, p, g)
                assert bool((d != 0).all())
                eff = -(p.detach() - b) / d  # the step the optimizer took, per unit direction
                effs.append(eff.reshape(-1))
                if info.kind != "adam":
                    continue
                st = opt.state[p]
                t = float(st["step"])
                b1, b2 = group["betas"]
                eps_t = _row_eps_t(info, group, t)
                lr = group["lr"] * float(st.get("update_scale", 1.0))
                # eps governs where sqrt(v_hat) < eps_t: D above half its ceiling lr/bc1/eps_t
                if eps_t > 0:
                    governed.append((eff > lr / (1 - b1**t) / eps_t / 2).reshape(-1))
                v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
                v_hat = v / (1 - b2**t)
                ratios.append((g**2 / torch.clamp(v_hat, min=max(eps_t**2, 1e-300))).reshape(-1))
            e = torch.cat(effs)
            row = {"eff_step_max": float(e.max())}
            for q, k in ((0.5, "eff_step_p50"), (0.9, "eff_step_p90"), (0.99, "eff_step_p99")):
                row[k] = float(torch.quantile(e, q))
            if governed:
                row["eps_share"] = float(torch.cat(governed).double().mean())
            if ratios:
                r = torch.cat(ratios)
                row["g2v_rms"], row["g2v_max"] = math.sqrt(float(r.mean())), float(r.max())
            ref.append(row)
    return open_run(tmp_path / "s.db", info.name), ref


def _assert_series(run, ref, name, **tol):
    steps, values = run.series(name)
    assert steps.tolist() == list(range(STEPS)), name
    assert values.tolist() == pytest.approx([r[name] for r in ref], **tol), name


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_eff_step_is_the_actual_update(tmp_path, info):
    """eff_step_max and the p50/p90/p99 quantiles are those of the optimizer's own step."""
    info.skip_unless("eff_step")
    run, ref = _monitored_row(info, tmp_path)
    for name in ("eff_step_max", "eff_step_p50", "eff_step_p90", "eff_step_p99"):
        _assert_series(run, ref, name, rel=1e-6)


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_eps_share_in_the_convention_the_optimizer_runs(tmp_path, info):
    """eps_share is the share of coordinates whose actual step is above half the eps-only
    ceiling lr/(bc1 eps_t), i.e. sqrt(v_hat) < eps_t; eps = 1e-2 makes it neither 0 nor 1."""
    info.skip_unless("epsilon")
    run, ref = _monitored_row(info, tmp_path)
    _assert_series(run, ref, "eps_share", abs=1e-12)
    shares = [r["eps_share"] for r in ref]
    assert max(shares) > 0 and min(shares) < 1


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_g2v_is_the_stableadamw_ratio_of_the_state(tmp_path, info):
    """g2v_rms / g2v_max: g^2 / max(v_hat, eps_t^2) with the optimizer's own v (the AMSGrad
    max) and eps_t in the row's convention."""
    info.skip_unless("second_moment")
    run, ref = _monitored_row(info, tmp_path)
    _assert_series(run, ref, "g2v_rms", rel=1e-6)
    _assert_series(run, ref, "g2v_max", rel=1e-6)


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_adam_statistics_only_for_the_adam_family(tmp_path, info):
    """The store has the Adam statistics exactly for the rows that have the state for them."""
    model, x, y = tiny_problem()
    opt = info(model.parameters())
    with Monitor(model, opt, store=tmp_path / "s.db", state_every=1) as mon:
        for _ in range(2):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            mon.observe(loss)
            opt.step()
        names = set(mon.read().names())
    assert ("eff_step_max" in names) == ("eff_step" not in info.not_applicable)
    assert ("g2v_rms" in names) == ("second_moment" not in info.not_applicable)
    assert {"loss", "grad_norm", "update_norm"} <= names
