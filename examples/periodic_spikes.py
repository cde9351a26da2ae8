"""The periodic-spikes story by hand: full-batch Adam spikes periodically, AMSGrad does not.

The loop a user writes, with stablestep watching it (about 10 s on one CPU core):

    python examples/periodic_spikes.py
    stablestep report runs/periodic_spikes.sqlite -o runs/periodic_spikes.html

`stablestep lab run periodic-spikes` runs the same story with more variants.
"""

import torch

import stablestep
from stablestep.lab.spikes import count_spikes

torch.set_num_threads(1)
STORE = "runs/periodic_spikes.sqlite"


def run(name: str, *, amsgrad: bool) -> list[float]:
    # 1. data: y = sin(3 * sum(x)) on 128 points, a wide tanh MLP
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=gen)
    y = torch.sin(3 * x.sum(1, keepdim=True))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    # 2. the optimizer, and a Monitor that also probes lam_max(P^-1 H) every 25 steps
    opt = stablestep.Adam(model.parameters(), lr=1e-3, eps=1e-8, amsgrad=amsgrad)
    losses = []
    with stablestep.Monitor(model, opt, store=STORE, run=name, curvature_every=25,
                            curvature_loss=lambda: torch.mean((model(x) - y) ** 2)) as monitor:
        for _ in range(4000):
            opt.zero_grad()
            loss = torch.mean((model(x) - y) ** 2)  # 3. forward
            loss.backward()  # 4. backward
            monitor.observe(loss)  # 5. telemetry
            opt.step()  # 6. update
            losses.append(loss.item())
    return losses


if __name__ == "__main__":
    import os

    os.makedirs("runs", exist_ok=True)
    if os.path.exists(STORE):
        os.remove(STORE)
    for name, amsgrad in (("adam", False), ("amsgrad", True)):
        losses = run(name, amsgrad=amsgrad)
        print(f"{name}: {count_spikes(losses)} spikes, final loss {losses[-1]:.3g}")
        for f in stablestep.diagnose(STORE, run=name):
            print(f"  step {f.step}: {f.kind} -> {f.mechanism}")
