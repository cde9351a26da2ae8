"""The NaN origin names the module (forward) and the gradient (backward) where a
non-finite value was born, by replaying one step under hooks."""

from __future__ import annotations

import torch
from torch import nn

from stablestep.diagnosis.nan_origin import nan_origin
from stablestep.lab.text import TextConfig, TinyGPT


def test_names_the_attention_layer_made_to_overflow():
    torch.manual_seed(0)
    model = TinyGPT(TextConfig(n_layer=3, d=32, n_head=2, ctx=16))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.mul_(1e22)  # q.k beyond 3e38: the logits overflow
    idx = torch.randint(256, (2, 16))

    def step():
        return model(idx).logsumexp(-1).mean()

    assert not torch.isfinite(step())
    o = nan_origin(model, step)
    # the softmax inside blocks.1.attn's forward (not a submodule) made the NaN that its
    # output projection then received
    assert o.forward_module == "blocks.1.attn" and o.forward_how == "between-modules"
    assert not o.loss_finite
    assert o.backward_parameter is not None
    assert "blocks.1.attn" in o.summary()
    # replayed from the snapshot before the overflow: finite, and the model is put back
    o2 = nan_origin(model, step, state=good)
    assert o2.forward_module is None and o2.loss_finite and o2.backward_parameter is None
    from stablestep.guard.snapshot import capture

    snap = capture(0, model, torch.optim.SGD(model.parameters(), lr=0.1), {})  # as the Guard
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.div_(1e22)
    o3 = nan_origin(model, step, state=snap)  # replay from the Guard's (broken) snapshot
    assert o3.forward_module == "blocks.1.attn"
    assert torch.isfinite(step())  # the live model was put back


def test_a_non_finite_parameter_and_functional_code_between_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    with torch.no_grad():
        model[2].weight[0, 1] = float("nan")
    o = nan_origin(model, lambda: model(x).sum())
    assert (o.forward_module, o.forward_how, o.parameter) == ("2", "parameter", "2.weight")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(torch.log(self.a(x) - 1e3))  # log of negatives: NaN between a and b

    net = Net()
    o = nan_origin(net, lambda: net(x).sum())
    assert (o.forward_module, o.forward_how) == ("", "between-modules")


def test_backward_origin_when_the_forward_is_finite():
    class Sqrt(nn.Module):
        def forward(self, x):
            return torch.sqrt(x)  # finite at 0, infinite derivative there

    model = nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    x = torch.ones(2, 4)
    o = nan_origin(model, lambda: model(x).sum())
    assert o.forward_module is None and o.loss_finite
    assert o.backward_module == "1"  # d sqrt(x)/dx at x = 0
    assert o.backward_parameter in ("0.weight", "0.bias")
    assert model[0].weight.grad is None  # gradients put back as they were


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyGPT(TextConfig(n_layer=3, d=32, n_head=2, ctx=16))
        with torch.no_grad():
            model.blocks[1].attn.qkv.weight.mul_(1e22)
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        idx = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(rank))
        o = nan_origin(model, lambda: model(idx).logsumexp(-1).mean())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(o.to_dict(), f)
    finally:
        dist.destroy_process_group()


def test_forward_origin_under_fsdp2_on_every_rank(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported torch (spawn would re-import it)
    mp.start_processes(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for rank in (0, 1):
        o = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert o["forward_module"] == "blocks.1.attn", o
