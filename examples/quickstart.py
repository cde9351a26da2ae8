"""Quickstart: train a small MLP with stablestep.Adam (TF/Keras epsilon convention).

Runs in a few seconds on a CPU:  python examples/quickstart.py
"""

import torch

import stablestep

torch.manual_seed(0)
torch.set_num_threads(1)

# 1. Data: y = sin(3x) + noise on 256 points (made here, nothing downloaded).
x = torch.linspace(-1, 1, 256).unsqueeze(1)
y = torch.sin(3 * x) + 0.05 * torch.randn_like(x)

# 2. Model: a 2-layer tanh MLP.
model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

# 3. Optimizer: Adam exactly as TF/Keras write it (eps is "epsilon hat"), with AMSGrad,
#    and an exponential lr decay as a LambdaLR multiplier (Keras' ExponentialDecay).
opt = stablestep.Adam(model.parameters(), lr=1e-2, eps=1e-7, eps_mode="tf", amsgrad=True)
decay = stablestep.schedules.exponential_decay(100, 0.7)
sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)

# 4. The loop: the same five lines as with torch.optim.Adam.
for step in range(500):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0 or step == 499:
        # 5. What Adam is doing: the effective per-coordinate step lr/(1-b1^t)/(sqrt(v_hat)+eps_t)
        eff = stablestep.optim.inspect.effective_step(opt, model[0].weight)
        print(f"step {step:3d}  loss {loss.item():.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
              f"median effective step {eff.median().item():.2e}")
    sched.step()
