"""Trial: resume a plain loop at step 100 with Monitor/Guard start_step=100 (Guard state
loaded), then a NaN batch at step 130: the store's events and diagnose must say step 130."""
import torch

import stablestep

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
X = torch.randn(1024, 6)
Y = X[:, :1] * 2
store = "/tmp/trial/resume.db"


def train(mon, guard, start, stop, nan_at=None):
    for step in range(start, stop):
        i = (step * 16) % 1024
        x, y = X[i:i + 16].clone(), Y[i:i + 16]
        if step == nan_at:
            x[0, 0] = float("nan")
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.observe(loss)
        if guard.check(loss, batch_id=f"b{step}"):
            opt.step()


with stablestep.Monitor(model, opt, store=store, run="r", overwrite=True) as mon:
    guard = stablestep.Guard(model, opt, monitor=mon)
    train(mon, guard, 0, 100)
    ms, gs = mon.state_dict(), guard.state_dict()
    guard.close()
with stablestep.Monitor(model, opt, store=store, run="r", start_step=100) as mon:
    mon.load_state_dict(ms)
    guard = stablestep.Guard(model, opt, monitor=mon, start_step=100)
    guard.load_state_dict(gs)
    train(mon, guard, 100, 160, nan_at=130)
    print("records:", [(r.step, r.action, r.reason) for r in guard.records])
    print("bad batches:", guard.bad_batches, "summary steps:", guard.summary()["steps"])
    guard.close()
run = stablestep.open_run(store, "r")
print("runs steps", run.series("loss")[0][[0, -1]], "events", [(e.step, e.kind) for e in run.events])
