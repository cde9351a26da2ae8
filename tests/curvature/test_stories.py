"""The theory on the stories: DESIGN.md's full-batch Adam example and seed 003.

The reference is what training actually does (spikes, NaN), measured here with torch.optim.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stablestep.curvature import CurvatureProbe, ProbeConfig, max_stable_lr
from stablestep.lab.spikes import count_spikes
from stablestep.telemetry import names
from tests.curvature.helpers import dense_hessian


def _count_spikes(losses: np.ndarray) -> int:
    """The one spike definition (the detector stack's alarms, as the lab counts them) of
    spikes that at least double the loss."""
    return count_spikes(losses, factor=2.0, window=50)


def _full_batch_adam(steps=4000, every=100, **adam_kw):
    """DESIGN.md: 2-layer tanh MLP, 256 points, full-batch MSE, Adam lr 1e-3."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **adam_kw)
    probe = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(sharpness=False))

    def loss_fn():
        return F.mse_loss(model(x), y)

    losses, curv = [], []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if t % every == 0 and t > 0:  # where Monitor(curvature_every=every) calls it
            out = probe(loss_fn)
            curv.append((t, out[names.PRECOND_SHARPNESS], out[names.PRECOND_THRESHOLD]))
        losses.append(loss.item())
        opt.step()
    return model, opt, loss_fn, (x, y), np.array(losses), np.array(curv)


def test_full_batch_adam_spikes_at_the_preconditioned_threshold():
    model, opt, loss_fn, (x, y), losses, curv = _full_batch_adam(eps=1e-8)
    assert _count_spikes(losses) >= 30  # 72 with this seed; DESIGN.md: ~70
    assert curv[0, 2] == pytest.approx(38.0)
    late = curv[curv[:, 0] >= 2000, 1]  # spikes begin near step 2400
    assert 0.9 * 38 <= np.median(late) <= 1.05 * 38
    assert late.max() >= 0.97 * 38
    # the warm-started 1% estimate against the dense P^-1 H at the last step
    opt.zero_grad()
    loss_fn().backward()
    H = dense_hessian(model, lambda out: F.mse_loss(out, y), x)
    D = []
    for p in model.parameters():
        st = opt.state[p]
        t = int(st["step"])
        D.append((1e-3 / (1 - 0.9**t) / ((st["exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8))
                 .reshape(-1))
    D = torch.cat(D).to(H.dtype)
    exact = torch.linalg.eigvals(D[:, None] * H).real.max().item()
    probe = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(sharpness=False))
    assert probe(loss_fn)[names.PRECOND_SHARPNESS] == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("fix", [dict(amsgrad=True), dict(eps=1e-3)], ids=["amsgrad", "eps1e-3"])
def test_amsgrad_or_large_eps_keep_it_below_and_remove_the_spikes(fix):
    *_, losses, curv = _full_batch_adam(**fix)
    assert _count_spikes(losses) <= 3
    assert curv[:, 1].max() < 0.8 * 38


def _seed_003(lr):
    """Regression with badly scaled features (1 to ~80): an ill-conditioned Hessian."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g) * torch.logspace(0, 1.9, 8)
    y = torch.sin(x[:, :1] / 100) + 0.1 * torch.randn(128, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    return model, torch.optim.SGD(model.parameters(), lr=lr), lambda: F.mse_loss(model(x), y)


def test_seed_003_max_stable_lr_explains_nan_at_1e3_not_1e4():
    outcome = {}
    for lr in (1e-4, 1e-3):
        model, opt, loss_fn = _seed_003(lr)
        first = loss_fn().item()
        if lr == 1e-3:
            ans = max_stable_lr(loss_fn, opt)
        for _ in range(200):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
        outcome[lr] = loss.item() / first
    assert math.isnan(outcome[1e-3])  # the user's NaN
    assert outcome[1e-4] < 0.1  # and 1e-4 works
    assert 1e-4 < ans.max_lr < 1e-3 and ans.ratio > 1 and not ans.stable
    assert ans.message.startswith(
        f"your lr 1.0e-3 is {ans.ratio:.2g}x above the largest stable lr {ans.max_lr:.1e}"
        .replace("e-0", "e-")
    )
    assert "for this model and batch" in ans.message
