"""Every statistic the Monitor stores equals its definition recomputed from the
optimizer's own state (torch.optim as the reference), in both epsilon conventions."""

from __future__ import annotations

import math

import pytest
import torch

import stablestep
from stablestep.telemetry import Monitor, open_run
from stablestep.telemetry.probes import CoordinateSample, quantiles

from .helpers import loss_of, reference_stats, tiny_problem

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=3e-2),
    "adam-tiny-eps": lambda ps: torch.optim.Adam(ps, lr=3e-2, eps=1e-3),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=3e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    # TensorFlow/Keras convention declared through the param group (inspect reads it)
    "adam-tf": lambda ps: torch.optim.Adam(
        [{"params": list(ps), "eps_mode": "tf"}], lr=3e-2, eps=1e-3
    ),
    "ss-adam-tf": lambda ps: stablestep.Adam(ps, lr=3e-2, eps=1e-3, eps_mode="tf"),
    "ss-adamw-amsgrad": lambda ps: stablestep.AdamW(ps, lr=3e-2, amsgrad=True, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_stored_statistics_equal_definitions(tmp_path, kind):
    torch.manual_seed(0)
    model, x, y = tiny_problem()
    opt = OPTIMIZERS[kind](model.parameters())
    eps_mode = "tf" if kind.endswith("adam-tf") else "torch"
    expected = {}
    with Monitor(model, opt, store=tmp_path / "s.db", run=kind, state_every=1) as mon:
        for step in range(12):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad.detach().clone() for p in model.parameters()]
            mon.observe(loss)
            opt.step()
            ref = reference_stats(opt, model, before, grads, eps_mode=eps_mode)
            ref["loss"] = loss.item()
            ref["lr"] = opt.param_groups[0]["lr"]
            ref["grad_norm"] = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            ref["grad_nonfinite"] = 0.0
            expected[step] = ref
    run = open_run(tmp_path / "s.db", kind)
    assert run.config["optimizer"] == type(opt).__name__
    assert run.config["hyper"]["kind"] == ("sgd" if kind.startswith("sgd") else "adam")
    names = set(run.names())
    assert set(expected[0]) <= names
    if kind.startswith("sgd"):
        assert "eff_step_max" not in names
    for name in expected[0]:
        steps, values = run.series(name)
        assert steps.tolist() == list(range(12)), name
        want = [expected[s][name] for s in range(12)]
        assert values.tolist() == pytest.approx(want, rel=2e-4, abs=1e-12), name
    # per-tensor gradient norms for every tensor, and the worst tensors by name
    _, w = run.series("grad_norm/0.weight")
    assert w[0] == pytest.approx(float(torch.linalg.vector_norm(_first_grad(kind))), rel=1e-5)
    if not kind.startswith("sgd"):
        assert sum(n.startswith("eff_step_max/") for n in names) == 3


def _first_grad(kind):
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
