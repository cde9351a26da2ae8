"""Monitor a DDP run: the README's Monitor line on every rank; rank 0 writes one run.

    torchrun --nproc_per_node 2 examples/ddp.py      # CPU: gloo; one GPU per rank: nccl
    stablestep diagnose runs/ddp.db
"""

import argparse
import os

import torch
import torch.distributed as dist

import stablestep

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--store", default="runs/ddp.db")
args = ap.parse_args()
# 1. join the process group torchrun set up (nccl with one GPU per rank, gloo on CPUs)
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
torch.set_num_threads(1)
# 2. the same model on every rank, wrapped in DDP (which averages the gradients)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
model = torch.nn.parallel.DistributedDataParallel(model.to(device))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
# 3. each rank draws its own batches
gen = torch.Generator().manual_seed(1000 + rank)
w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
os.makedirs(os.path.dirname(args.store) or ".", exist_ok=True)
# 4. the Monitor line, unchanged, on every rank: global loss/norms/quantiles, rank 0 writes
with stablestep.Monitor(model, opt, store=args.store, run="ddp", overwrite=True) as mon:
    for _ in range(args.steps):
        x = torch.randn(32, 8, generator=gen).to(device)
        y = torch.sin(x @ w.to(device))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        mon.observe(loss)  # 5. after backward, before step, on every rank
        opt.step()
# 6. one run in the store: loss averaged over ranks, loss_spread = range of per-rank losses
if rank == 0:
    run = stablestep.open_run(args.store, mon.run_name)
    _, loss = run.series("loss")
    _, spread = run.series("loss_spread")
    print(f"{world} ranks -> run {run.name!r}: {len(loss)} steps, final loss {loss[-1]:.3g}, "
          f"median per-rank loss range {sorted(spread)[len(spread) // 2]:.3g}")
dist.destroy_process_group()
