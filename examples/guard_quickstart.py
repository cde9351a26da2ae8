"""Keep a run alive with stablestep's Guard: a one-screen loop, then what the guard did.

    python examples/guard_quickstart.py

Full-batch Adam in the periodic-spikes setting (a tanh MLP on 128 points, eps 1e-8) spikes again
and again once the loss flattens (Adam's adaptive edge of stability); we also feed it one
batch with a NaN and one with labels off by 1e4. The guard skips the two bad batches and,
after three spikes, turns AMSGrad on (then raises eps, then lowers lr, if spikes go on).
"""

import torch

from stablestep.guard import Guard, GuardPolicy

torch.manual_seed(0)
torch.set_num_threads(1)
# 1. data and model
x = torch.randn(128, 4)
y = torch.sin(3.0 * x.sum(1, keepdim=True))
model = torch.nn.Sequential(torch.nn.Linear(4, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
# 2. your own optimizer and schedule, untouched
opt = torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-8)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 100))  # warmup
# 3. the guard: snapshots every 100 calm steps; curvature_loss lets it compute eps and lr
guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=100),
              curvature_loss=lambda: torch.nn.functional.mse_loss(model(x), y))
for step in range(2000):
    xb, yb = x.clone(), y
    if step == 300:
        xb[5, 2] = float("nan")  # a corrupt sample
    if step == 600:
        yb = y * 1e4  # a batch with wrong units
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(xb), yb)  # 4. forward
    loss.backward()  # 5. backward
    if guard.check(loss):  # 6. the guard decides: take the step, or skip it
        opt.step()
    sched.step()  # 7. the schedule stays on the clock either way
# 8. what happened, in numbers
print(f"final loss {torch.nn.functional.mse_loss(model(x), y).item():.2e}; "
      f"actions {guard.counts}; lr scale {guard.lr_scale:g}")
for r in guard.records:
    numbers = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.data.items()}
    print(f"step {r.step:5d}  {r.action:8s} {r.reason:28s} {numbers}")
group = opt.param_groups[0]
print(f"optimizer now: amsgrad={group['amsgrad']}, eps={group['eps']:g}, lr={group['lr']:g}")
