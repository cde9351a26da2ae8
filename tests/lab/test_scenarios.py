"""Each seed story reproduces its phenomenon and its fix, and the diagnosis of each
failing variant names the expected mechanism."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from stablestep import open_run
from stablestep.lab import problems, scenarios
from stablestep.lab.train import train


def _finding_mechanisms(outcome, variant):
    v = outcome.variant(variant)
    assert v.findings is not None, "diagnosis unavailable"
    return {f["mechanism"] for f in v.findings}


# --- seed 000: late explosion -------------------------------------------------------------

def test_late_explosion_explodes_after_long_good_training(late_explosion):
    v = late_explosion.variant("eps1e-8")
    _, loss = open_run(late_explosion.store, run="eps1e-8").series("loss")
    first = v.spikes[0]
    assert len(v.spikes) >= 2, v.spikes
    assert first > 1000  # a long good run first ...
    assert loss[first - 200 : first - 20].max() < 1e-10  # ... that had converged ...
    assert loss[first : first + 100].max() > 1e-4  # ... then explodes by orders of magnitude
    assert v.diverged_at is None


def test_late_explosion_fixed_by_larger_eps_or_lower_lr(late_explosion):
    bad = late_explosion.variant("eps1e-8")
    for name in ("eps1e-3", "lr1e-4"):
        v = late_explosion.variant(name)
        # invariants, not exact counts: at most one stray spike, far fewer than without it
        assert len(v.spikes) <= min(1, len(bad.spikes) // 2), (name, v.spikes)
        assert v.diverged_at is None
    assert late_explosion.variant("eps1e-3").final_loss < 1e-9


def test_late_explosion_diagnosed_as_adaptive_edge_of_stability(late_explosion):
    assert "adaptive-edge-of-stability" in _finding_mechanisms(late_explosion, "eps1e-8")
    _, ps = open_run(late_explosion.store, run="eps1e-8").series("precond_sharpness")
    assert ps.max() > 38  # the measured preconditioned sharpness crosses Adam's bound


# --- seed 001: periodic spikes ------------------------------------------------------------

def test_periodic_spikes_with_adam_not_with_amsgrad(periodic_spikes):
    adam, ams = periodic_spikes.variant("adam"), periodic_spikes.variant("amsgrad")
    assert len(adam.spikes) >= 15, adam.spikes
    gaps = np.diff(adam.spikes)
    assert np.median(gaps) < 200  # recurring, not a one-off
    assert len(ams.spikes) <= len(adam.spikes) // 10, ams.spikes
    assert ams.final_loss < adam.final_loss


def test_periodic_spikes_diagnosed_as_adaptive_edge_of_stability(periodic_spikes):
    v = periodic_spikes.variant("adam")
    assert "adaptive-edge-of-stability" in _finding_mechanisms(periodic_spikes, "adam")
    assert "periodic-spikes" in {f["kind"] for f in v.findings}
    # every finding names a mechanism of the story (nothing blamed on batches or overflow)
    assert _finding_mechanisms(periodic_spikes, "adam") <= {
        "adaptive-edge-of-stability", "unknown"}


# --- seed 003: lr divergence ---------------------------------------------------------------

def test_lr_divergence_nan_at_1e3_not_at_1e4(lr_divergence):
    bad, good = lr_divergence.variant("gd-lr1e-3"), lr_divergence.variant("gd-lr1e-4")
    assert bad.diverged_at is not None and bad.diverged_at < 100
    assert math.isnan(bad.final_loss)
    assert good.diverged_at is None and math.isfinite(good.final_loss)
    fast = lr_divergence.variant("gd-lr-max")
    assert fast.final_loss < good.final_loss  # the computed lr is stable and faster


def test_lr_divergence_diagnosed_as_lr_too_high_with_stable_lr(lr_divergence):
    v = lr_divergence.variant("gd-lr1e-3")
    assert "lr-too-high" in _finding_mechanisms(lr_divergence, "gd-lr1e-3")
    lam = problems.exact_sharpness(problems.build(scenarios.get("lr-divergence").base()))
    lrs = [r["value"] for f in v.findings for r in f["remedies"]
           if isinstance(r.get("value"), float) and "lr" in r["action"]]
    assert lrs and all(x < 2.0 / lam for x in lrs)


def test_largest_stable_lr_matches_dense_hessian_and_the_boundary():
    base = scenarios.get("lr-divergence").base()
    prob = problems.build(base)
    w = prob.model.weight
    flat = w.detach().clone().double().reshape(-1)

    def loss_of(v):
        return torch.mean((prob.x.double() @ v.reshape(-1, 1) - prob.y.double()) ** 2)

    dense = torch.autograd.functional.hessian(loss_of, flat)
    lam_ref = float(torch.linalg.eigvalsh(dense)[-1])
    lam = problems.exact_sharpness(prob)
    assert math.isclose(lam, lam_ref, rel_tol=1e-9)
    lr_max = 2.0 / lam
    # gradient descent is stable iff lr * lam_max < 2: just above diverges, just below not
    assert train(replace(base, lr=1.1 * lr_max, steps=400)).diverged
    assert not train(replace(base, lr=0.9 * lr_max, steps=400)).diverged


# --- seed 002: Adam with decay -------------------------------------------------------------

def test_decay_beats_constant_lr_and_bias_correction_is_no_decay():
    sc = scenarios.get("adam-decay")
    base = sc.base()
    const = train(base).final_loss
    floor = problems.NOISE**2
    for kind in ("exponential", "inverse-sqrt", "warmup-cosine"):
        decayed = train(replace(base, schedule=kind)).final_loss
        # decay removes most of the optimizer's excess over the noise floor
        assert decayed - floor < 0.5 * (const - floor), (kind, decayed, const)
    # the factor the thread calls a decay tends to 1, while a real decay goes to 0.1
    from stablestep.optim.schedules import bias_correction

    assert bias_correction(1) < 0.35 and abs(bias_correction(5000) - 1.0) < 1e-2
    from stablestep.lab.train import lr_factor

    assert math.isclose(lr_factor(replace(base, schedule="exponential"))(base.steps), 0.1)


def test_runs_are_deterministic():
    cfg = replace(scenarios.get("periodic-spikes").base(), steps=200, curvature_every=0)
    a, b = train(cfg), train(cfg)
    np.testing.assert_array_equal(a.losses, b.losses)
