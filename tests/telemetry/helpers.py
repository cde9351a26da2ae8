"""Small models, data and an independent reference for the telemetry tests."""

from __future__ import annotations

import math

import torch


def tiny_problem(seed: int = 0, width: int = 16):
    """A 2-layer tanh MLP on 64 fixed points (full batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    )
    return model, x, y


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def reference_stats(opt, model, before, grads, *, eps_mode="torch"):
    """Every statistic recomputed from the optimizer state in float64, written from the
    update equations (TensorFlow's form for eps_mode="tf"), independent of stablestep."""
    params = [p for p in model.parameters()]
    out = {}
    upd = [p.detach().double() - b.double() for p, b in zip(params, before, strict=True)]
    g = [x.double() for x in grads]
    u_norm = math.sqrt(sum(float((u * u).sum()) for u in upd))
    p_norm = math.sqrt(sum(float((b.double() ** 2).sum()) for b in before))
    g_norm = math.sqrt(sum(float((x * x).sum()) for x in g))
    out["param_norm"] = p_norm
    out["update_norm"] = u_norm
    out["update_ratio"] = u_norm / p_norm
    if u_norm > 0:
        out["update_cos"] = -sum(float((u * x).sum()) for u, x in zip(upd, g, strict=True)) / (
            u_norm * g_norm
        )
    group = opt.param_groups[0]
    if "betas" not in group:
        return out
    (b1, b2), eps, ams = group["betas"], group["eps"], group["amsgrad"]
    effs, gov, r, gap_num, gap_den = [], 0, [], 0.0, 0.0
    for p, gi in zip(params, g, strict=True):
        st = opt.state[p]
        t = int(st["step"])
        v = (st["max_exp_avg_sq"] if ams else st["exp_avg_sq"]).double()
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        lr = group["lr"] * float(st.get("update_scale", 1.0))  # StableAdamW's clipping
        if eps_mode == "tf":  # lr_t = lr sqrt(bc2)/bc1; step = lr_t m / (sqrt(v) + eps_hat)
            eff = lr * math.sqrt(bc2) / bc1 / (v.sqrt() + eps)
            gov += int((v.sqrt() < eps).sum())
            r.append(gi**2 * bc2 / torch.clamp(v, min=eps**2))
        else:
            eff = lr / bc1 / ((v / bc2).sqrt() + eps)
            gov += int(((v / bc2).sqrt() < eps).sum())
            r.append(gi**2 / torch.clamp(v / bc2, min=eps**2))
        effs.append(eff.reshape(-1))
        if ams:
            gap_num += float((st["max_exp_avg_sq"] - st["exp_avg_sq"]).double().sum())
            gap_den += float(st["max_exp_avg_sq"].double().sum())
    e = torch.cat(effs)
    rr = torch.cat([x.reshape(-1) for x in r])
    for q, k in ((0.5, "eff_step_p50"), (0.9, "eff_step_p90"), (0.99, "eff_step_p99")):
        out[k] = float(torch.quantile(e, q))
    out["eff_step_max"] = float(e.max())
    out["eps_share"] = gov / e.numel()
    out["g2v_rms"] = math.sqrt(float(rr.mean()))
    out["g2v_max"] = float(rr.max())
    if ams:
        out["amsgrad_gap"] = gap_num / gap_den
    return out
