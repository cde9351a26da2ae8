"""The probes are pure functions of tensors: given a step's tensors (no optimizer object)
they give the statistics the update equations define (tests/telemetry/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from stablestep.optim import inspect
from stablestep.telemetry.probes import AdamTensor, CoordinateSample, StepTensors, step_stats
from tests.optim_table import OPTIMIZERS as OPTIMIZER_TABLE

from .helpers import loss_of, reference_stats, tiny_problem


@pytest.mark.parametrize("info", OPTIMIZER_TABLE, ids=repr)
def test_step_stats_from_plain_tensors_equal_the_definitions(info):
    """For every Adam-family row with an epsilon (tests/optim_table.py), both conventions."""
    info.skip_unless("epsilon")
    model, x, y = tiny_problem()
    opt = info(model.parameters(), lr=3e-2)
    group = opt.param_groups[0]
    amsgrad = bool(group.get("amsgrad"))
    for _ in range(4):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    # copies, detached from the optimizer: what a Keras or JAX caller would hand over
    hyper = inspect.GroupHyper(kind="adam", lr=3e-2, beta1=group["betas"][0],
                               beta2=group["betas"][1], eps=group["eps"],
                               eps_mode=info.eps_mode, amsgrad=amsgrad)
    adam = []
    for p, g in zip(model.parameters(), grads, strict=True):
        st = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        v = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
        # StableAdamW's clipping scale is not a hyperparameter: a caller hands over the
        # optimizer's own effective step then, as the Monitor does
        eff = opt.effective_step(p).clone() if "update_scale" in st else None
        adam.append(AdamTensor(g, v, int(st["step"]), hyper,
                               st["exp_avg_sq"] if amsgrad else None, eff))
    params = list(model.parameters())
    st = StepTensors(
        loss=loss.item(),
        grads=grads,
        param_sq=[b.double().square().sum() for b in before],
        neg_update=[b - p.detach() for b, p in zip(before, params, strict=True)],
        adam=adam,
    )
    names = [n for n, _ in model.named_parameters()]
    sample = CoordinateSample([p.numel() for p in params], 65536)
    got = step_stats(st, names, sample=sample, top_k=2)
    want = reference_stats(opt, model, before, grads, eps_mode=info.eps_mode)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-5, abs=1e-12), k
    assert got["loss"] == pytest.approx(loss.item())
    assert sum(k.startswith("eff_step_max/") for k in got) == 2
    assert ("amsgrad_gap" in got) == amsgrad
