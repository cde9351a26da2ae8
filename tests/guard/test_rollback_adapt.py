"""Rollback to the last good snapshot, and the remedies: AMSGrad, eps, lr scale."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from stablestep.curvature import stability_threshold
from stablestep.diagnosis.explain import stable_eps
from stablestep.guard import Guard, GuardError, GuardPolicy, enable_amsgrad, raise_eps
from stablestep.lab import problems, scenarios
from stablestep.lab.spikes import count_spikes
from stablestep.lab.train import make_optimizer
from tests.guard.conftest import mlp, regression_data


def _full_batch(config, *, guard: bool, policy=None):
    pr = problems.build(config)
    opt = make_optimizer(config, pr.model.parameters())
    gd = Guard(pr.model, opt, policy=policy) if guard else None
    losses = []
    for _ in range(config.steps):
        opt.zero_grad()
        loss = pr.loss()
        loss.backward()
        losses.append(float(loss.detach()))
        if gd is None:
            if not math.isfinite(losses[-1]):
                break
            opt.step()
        elif gd.check(loss):
            opt.step()
    return pr, gd, losses


def test_divergence_is_rolled_back_and_the_run_ends_below_where_it_diverged():
    # seed 003: gradient descent at lr 1e-3 = 2.5x the stable 2/lam_max(H)
    config = replace(scenarios.get("lr-divergence").base(), steps=300)
    pr, _, plain = _full_batch(config, guard=False)
    assert not math.isfinite(plain[-1])  # without the guard: NaN
    pr, guard, losses = _full_batch(config, guard=True)
    rollbacks = [r for r in guard.records if r.action == "rollback"]
    assert rollbacks and all(r.reason == "divergence" for r in rollbacks)
    diverged_at = min(r.data["loss"] for r in rollbacks)
    final = pr.full_loss()
    assert math.isfinite(final) and final < diverged_at and final < losses[0]
    # each rollback halves the guard's lr scale until lr * lam_max(H) < 2 (exact Hessian)
    lam = problems.exact_sharpness(pr)
    assert config.lr * lam > 2 and config.lr * guard.lr_scale * lam < 2
    assert guard.lr_scale == 0.5 ** len(rollbacks)
    adapts = [r for r in guard.records if r.action == "adapt"]
    assert [r.data["remedy"] for r in adapts] == ["lr"] * len(rollbacks)  # SGD: lr only
    assert all(r.data["to_step"] < r.data["onset"] or r.data["to_step"] == 0 for r in rollbacks)


def test_periodic_spikes_of_seed_001_are_removed_by_adaptation():
    config = replace(scenarios.get("periodic-spikes").base(), width=128, lr=3e-3, steps=2000)
    _, _, plain = _full_batch(config, guard=False)
    _, guard, guarded = _full_batch(config, guard=True)
    n_plain, n_guard = count_spikes(plain), count_spikes(guarded)
    assert n_plain >= 10 and n_guard <= n_plain // 5, (n_plain, n_guard)
    adapts = [r for r in guard.records if r.action == "adapt"]
    assert adapts[0].reason == "adaptive-edge-of-stability"
    assert adapts[0].data["remedy"] == "amsgrad" and len(adapts[0].data["spike_steps"]) == 3
    assert math.isfinite(guarded[-1]) and guarded[-1] < 1e-3 * guarded[0]


def _adam_state_after(steps: int, **kw):
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **kw)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, opt, x, y


def test_amsgrad_switched_on_mid_run_is_torch_amsgrad_with_the_max_at_v():
    model, opt, x, y = _adam_state_after(20)
    sd = copy.deepcopy(opt.state_dict())  # load_state_dict would share the tensors
    assert enable_amsgrad(opt) == 1 and opt.param_groups[0]["amsgrad"]
    # torch's own AMSGrad, loaded with max_exp_avg_sq = exp_avg_sq
    ref_model = mlp()
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, amsgrad=True)
    for s in sd["state"].values():
        s["max_exp_avg_sq"] = s["exp_avg_sq"].clone()
    sd["param_groups"][0]["amsgrad"] = True
    ref.load_state_dict(sd)
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(5):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(opt.state[p]["max_exp_avg_sq"], ref.state[q]["max_exp_avg_sq"])


def test_raised_eps_puts_the_dense_preconditioned_sharpness_under_the_threshold():
    model, opt, x, y = _adam_state_after(300)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def flat_loss(w):
        ps = [t.reshape(s) for t, s in zip(w.split(sizes), shapes, strict=True)]
        h = torch.tanh(x.double() @ ps[0].T + ps[1])
        return (((h @ ps[2].T + ps[3]) - y.double()) ** 2).mean()

    w0 = torch.cat([p.detach().flatten() for p in params]).double()
    hess = torch.autograd.functional.hessian(flat_loss, w0)
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    t = int(opt.state[params[0]]["step"])
    (old, new), = raise_eps(opt, lam)
    assert new >= stable_eps(1e-2, lam, beta1=0.9, beta2=0.999, step=t)
    assert new <= 1.1 * stable_eps(1e-2, lam, beta1=0.9, beta2=0.999, step=t)
    assert new > old == 1e-8 and opt.param_groups[0]["eps"] == new
    # the dense lam_max(P^-1 H) with the new eps is below (2 + 2 b1)/(1 - b1) = 38
    d = torch.cat([(1e-2 / (1 - 0.9**t)) / ((opt.state[p]["exp_avg_sq"] / (1 - 0.999**t)).sqrt()
                                             + new).flatten() for p in params]).double()
    s = d.sqrt()
    lam_p = float(torch.linalg.eigvalsh(s[:, None] * hess * s[None, :])[-1])
    assert lam_p < stability_threshold(opt) == pytest.approx(38.0)


def test_lr_scale_is_applied_on_top_of_the_scheduler_and_never_fights_it():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    guard = Guard(model, opt, policy=GuardPolicy(lr_backoff=0.5))
    guard.lr_scale = 0.25  # as after two lr adaptations
    for t in range(4):
        opt.zero_grad()
        before = w.detach().clone()
        (w.sum()).backward()  # gradient 1 everywhere
        assert guard.check(w.sum())
        opt.step()
        applied = float((before - w.detach())[0])
        assert applied == pytest.approx(0.1 / (t + 1) * 0.25, rel=1e-6)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / (t + 1))  # user's value kept
        sched.step()
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.1 / 5)


def test_rollback_restores_weights_and_moments_but_keeps_adapted_hyperparameters():
    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=10, max_nonfinite_run=2,
                                                 remedies=("amsgrad",)))
    saved = {}
    for t in range(25):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if t == 20:  # the snapshot the rollback must return to
            saved = {"w": [p.detach().clone() for p in model.parameters()],
                     "v": [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]}
        assert guard.check(loss)
        opt.step()
    assert guard.snapshots == [10, 20]
    opt.param_groups[0]["eps"] = 1e-3  # changed after the snapshot: must survive
    for _ in range(2):  # parameters gone bad: skipped, then the state check rolls back
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        assert not guard.check(loss)
    assert [(r.action, r.reason) for r in guard.records] == [
        ("skip", "non-finite"), ("rollback", "non-finite-state"), ("adapt", "after-rollback")]
    assert guard.records[1].data["to_step"] == 20
    for p, w, v in zip(model.parameters(), saved["w"], saved["v"], strict=True):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["exp_avg_sq"], v)
        assert torch.equal(opt.state[p]["max_exp_avg_sq"], v)  # AMSGrad on, max at v
    assert opt.param_groups[0]["eps"] == 1e-3 and opt.param_groups[0]["amsgrad"]


def test_max_rollbacks_raises_with_the_reason():
    config = replace(scenarios.get("lr-divergence").base(), steps=100)
    with pytest.raises(GuardError, match=r"divergence after 1 rollbacks \(max_rollbacks=1\)"):
        _full_batch(config, guard=True, policy=GuardPolicy(max_rollbacks=1))


def test_guard_eps_remedy_uses_the_measured_sharpness_of_the_dense_hessian():
    config = replace(scenarios.get("periodic-spikes").base(), n=64, width=64, lr=1e-2,
                     steps=600)
    pr = problems.build(config)
    opt = make_optimizer(config, pr.model.parameters())
    guard = Guard(pr.model, opt, curvature_loss=pr.probe_loss(),
                  policy=GuardPolicy(adapt_after=1, remedies=("eps",), rollback=False))
    for _ in range(config.steps):
        opt.zero_grad()
        loss = pr.loss()
        loss.backward()
        ok = guard.check(loss)
        if guard.counts["adapt"]:
            break  # stop where the guard measured
        if ok:
            opt.step()
    (rec,) = guard.records
    assert (rec.action, rec.reason, rec.data["remedy"]) == (
        "adapt", "adaptive-edge-of-stability", "eps")
    params = list(pr.model.parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def flat_loss(w):
        ps = [t.reshape(s) for t, s in zip(w.split(sizes), shapes, strict=True)]
        h = torch.tanh(pr.x.double() @ ps[0].T + ps[1])
        return (((h @ ps[2].T + ps[3]) - pr.y.double()) ** 2).mean()

    w0 = torch.cat([p.detach().flatten() for p in params]).double()
    hess = torch.autograd.functional.hessian(flat_loss, w0, vectorize=True)
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    assert rec.data["sharpness"] == pytest.approx(lam, rel=2e-2)
    t = int(opt.state[params[0]]["step"])
    want = stable_eps(config.lr, rec.data["sharpness"], beta1=0.9, beta2=0.999, step=t)
    assert want <= rec.data["eps_new"] <= 1.1 * want
    assert opt.param_groups[0]["eps"] == rec.data["eps_new"]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_guard_g2v_evidence_is_the_number_the_monitor_records(tmp_path, amsgrad):
    """One definition (stablestep.formulas): the guard's g^2/v_hat RMS before the step is
    the Monitor's g2v_rms of the same step, recorded after it."""
    from stablestep.guard.remedies import g2v_rms
    from stablestep.telemetry import Monitor, names, open_run

    x, y = regression_data(n=64)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    seen = []
    with Monitor(model, opt, store=tmp_path / "r.db", run="g", state_every=1) as mon:
        for _ in range(6):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            mon.observe(loss)
            seen.append(g2v_rms(opt))
            opt.step()
    steps, rec = open_run(tmp_path / "r.db", "g").series(names.G2V_RMS)
    assert seen[0] is None  # before the first step there is no v
    for s, v in zip(steps.tolist(), rec.tolist(), strict=True):
        if s >= 1:
            assert seen[s] == pytest.approx(v, rel=1e-5)
