"""Trial: 2-rank gloo DDP, keep_batch + Guard; at step 40 rank 1's model gets a log of a
negative number in `logger` (only on rank 1's batch: x[0,0] = -100 -> log(<0)).
    torchrun --nproc_per_node 2 trial_scripts/ddp_keep_batch_guard.py
Expected: a nan-origin event naming module.logger (DDP wraps the model), no hang."""
import torch
import torch.distributed as dist

import stablestep
from stablestep import MonitorConfig


class LogLayer(torch.nn.Module):
    def forward(self, x):
        return torch.log(x + 10.0)


dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential()
model.add_module("inp", torch.nn.Identity())
model.add_module("logger", LogLayer())
model.add_module("fc", torch.nn.Linear(8, 1))
model = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(rank)
store = "/tmp/trial/ddp_keep.db"
with stablestep.Monitor(model, opt, store=store, run="d", overwrite=True,
                        config=MonitorConfig(keep_batch=True)) as mon:
    guard = stablestep.Guard(model, opt, monitor=mon)
    for step in range(60):
        x = torch.randn(16, 8, generator=gen)
        y = x.sum(1, keepdim=True)
        if step == 40 and rank == 1:
            x[0, 0] = -100.0
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.observe(loss, batch=lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        if guard.check(loss):
            opt.step()
    guard.close()
if rank == 0:
    run = stablestep.open_run(store, mon.run_name)
    print("events:", [(e.step, e.kind, e.data.get("forward_module") or e.data.get("text"))
                      for e in run.events])
dist.destroy_process_group()
