"""Trial: an MLP whose 2nd layer takes log of a (eventually) negative number -> NaN.

Usage: python trial_scripts/nan_origin_mlp.py STORE [keep|nokeep] [guard|noguard]
Expected: `stablestep diagnose STORE` names `logger` (the LogLayer) as the birthplace.
"""
import sys

import torch
import torch.nn as nn

import stablestep
from stablestep import MonitorConfig


class LogLayer(nn.Module):
    """log(x + shift): NaN when x + shift < 0."""
    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(5.0))

    def forward(self, x):
        return torch.log(x + self.shift)


store = sys.argv[1]
keep = (sys.argv[2] if len(sys.argv) > 2 else "keep") == "keep"
use_guard = (sys.argv[3] if len(sys.argv) > 3 else "noguard") == "guard"
torch.manual_seed(0)
model = nn.Sequential()
model.add_module("inp", nn.Linear(8, 16))
model.add_module("act", nn.Tanh())
model.add_module("logger", LogLayer())
model.add_module("out", nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()
X = torch.randn(512, 8)
Y = X.sum(1, keepdim=True)
guard = None
with stablestep.Monitor(model, opt, store=store, run="mlp", overwrite=True,
                        config=MonitorConfig(keep_batch=keep)) as mon:
    if use_guard:
        guard = stablestep.Guard(model, opt, monitor=mon)
    for step in range(120):
        i = torch.randint(0, 512, (32,))
        x, y = X[i], Y[i]
        if step == 60:
            with torch.no_grad():
                model.logger.shift.fill_(-0.5)   # sabotage: log of negatives now
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if keep:
            mon.observe(loss, batch=lambda x=x, y=y: loss_fn(model(x), y))
        else:
            mon.observe(loss)
        if guard is None or guard.check(loss):
            opt.step()
if guard is not None:
    print(guard.summary())
