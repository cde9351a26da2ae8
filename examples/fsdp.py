"""Monitor an FSDP2 run (``fully_shard``): each rank holds a shard of the parameters and of
Adam's state; the Monitor's statistics are reduced over all shards, rank 0 writes one run.

    torchrun --nproc_per_node 2 examples/fsdp.py     # CPU: gloo; one GPU per rank: nccl
    stablestep diagnose runs/fsdp.db
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stablestep

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--store", default="runs/fsdp.db")
args = ap.parse_args()
# 1. join the process group and build a 1-D device mesh over all ranks
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
torch.set_num_threads(1)
# 2. shard every layer, then the root: parameters become DTensor shards
torch.manual_seed(0)
layers = [torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
          torch.nn.Linear(64, 1)]
model = torch.nn.Sequential(*layers).to(mesh.device_type)
for layer in model:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
# 3. the optimizer's state is sharded like the parameters
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own batches
w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
os.makedirs(os.path.dirname(args.store) or ".", exist_ok=True)
# 4. the Monitor line, unchanged, on every rank: norms, eps share and quantiles over all shards
with stablestep.Monitor(model, opt, store=args.store, run="fsdp", overwrite=True) as mon:
    for _ in range(args.steps):
        x = torch.randn(32, 8, generator=gen).to(mesh.device_type)
        y = torch.sin(x @ w.to(mesh.device_type))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank keeps its shard
        mon.observe(loss)  # 5. after backward, before step, on every rank
        opt.step()
# 6. one run: the numbers one process holding the whole model would store
if rank == 0:
    run = stablestep.open_run(args.store, mon.run_name)
    _, loss = run.series("loss")
    _, eff = run.series("eff_step_max")
    print(f"{world} ranks -> run {run.name!r}: {len(loss)} steps, final loss {loss[-1]:.3g}, "
          f"max effective step {eff[-1]:.3g}")
dist.destroy_process_group()
