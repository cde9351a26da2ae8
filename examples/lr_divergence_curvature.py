"""lr divergence: "lr 1e-3 drives my loss to NaN, 1e-4 works. Why?" -- answered with curvature.

Run:  .venv/bin/python examples/lr_divergence_curvature.py   (about a second on a CPU)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from stablestep.curvature import CurvatureProbe, max_stable_lr

# 1. Data with badly scaled features (1 to ~80): an ill-conditioned Hessian.
g = torch.Generator().manual_seed(0)
x = torch.randn(128, 8, generator=g) * torch.logspace(0, 1.9, 8)
y = torch.sin(x[:, :1] / 100) + 0.1 * torch.randn(128, 1, generator=g)


def loss_fn():
    return F.mse_loss(model(x), y)


for lr in (1e-3, 1e-4):
    # 2. The user's model and optimizer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    # 3. The answer, before training: is this lr stable for this model and batch?
    print(max_stable_lr(loss_fn, opt).message)
    # 4. Train, tracking lr * lam_max(H) against its bound 2 with a warm-started probe.
    probe = CurvatureProbe(model.parameters(), opt)
    for step in range(200):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step % 50 == 0:
            m = probe(loss_fn)
            print(f"  step {step:3d}  loss {loss.item():10.4g}  lr*lam_max(H) "
                  f"{m['lr_sharpness']:8.3g}  (bound {m['gd_threshold']:g})")
        opt.step()
    print(f"  after 200 steps: loss {loss_fn().item():.4g}")
