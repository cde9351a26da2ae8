"""Watch Adam with stablestep.Monitor: a one-screen training loop, then read the run back.

    python examples/monitor_quickstart.py            # writes monitor_quickstart.db
    stablestep export monitor_quickstart.db --csv -o run.csv
"""

import torch

import stablestep
from stablestep.telemetry import names

torch.manual_seed(0)
torch.set_num_threads(1)
# 1. data and model: a 2-layer tanh MLP on 256 points, full batch (the periodic-spikes setting)
x = torch.randn(256, 8)
y = torch.sin(x @ torch.randn(8, 1))
model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
# 2. your own optimizer, untouched
opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
# 3. attach the Monitor: cheap statistics every step, Adam's state every 10 steps
store = "monitor_quickstart.db"  # one SQLite file; each run of this script adds a run
with stablestep.Monitor(model, opt, store=store, config={"example": "quickstart"}) as mon:
    for _ in range(1500):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.observe(loss)  # 4. after backward, before step
        opt.step()
# 5. read the run back: numpy arrays, keyed by the shared metric names
r = stablestep.open_run(store, mon.run_name)
steps, loss = r.series(names.LOSS)
s_eff, eff_max = r.series(names.EFF_STEP_MAX)
_, eps_share = r.series(names.EPS_SHARE)
_, g2v = r.series(names.G2V_RMS)
print(f"run {r.name!r}: {len(steps)} steps, final loss {loss[-1]:.2e}, {len(r.events)} events")
for i in (0, len(s_eff) // 2, len(s_eff) - 1):
    print(
        f"step {s_eff[i]:5d}: max effective step {eff_max[i]:.3g}, "
        f"eps governs {eps_share[i]:.1%} of coordinates, RMS(g^2/v_hat) {g2v[i]:.2f}"
    )
