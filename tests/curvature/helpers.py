"""Small models, data and the exact dense Hessian used as the reference in the curvature tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


class TinyAttention(nn.Module):
    """One single-head self-attention block with a residual and a linear read-out."""

    def __init__(self, d: int = 12, n_out: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = (self.q(x) @ self.k(x).transpose(1, 2)) / x.shape[-1] ** 0.5
        h = x + att.softmax(-1) @ self.v(x)
        return self.out(torch.tanh(h).mean(1))


def make_problem(kind: str, *, seed: int = 0, dtype=torch.float64):
    """(model, loss_fn) for kind in {"mlp", "cnn", "attention"}: a few hundred to ~1.5k params."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                              nn.Linear(24, 3))
        x = torch.randn(64, 10, generator=g)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 6, 3), nn.Tanh(),
                              nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
        x = torch.randn(32, 1, 8, 8, generator=g)
    elif kind == "attention":
        model = TinyAttention()
        x = torch.randn(32, 5, 12, generator=g)
    else:
        raise ValueError(kind)
    model = model.to(dtype)
    x = x.to(dtype)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)

    def loss_fn():
        return F.cross_entropy(model(x), y)

    return model, loss_fn, (x, y)


def dense_hessian(model: nn.Module, loss_of_output, x) -> torch.Tensor:
    """Exact Hessian of ``loss_of_output(model(x))`` w.r.t. all parameters, flattened in
    ``model.parameters()`` order, with ``torch.autograd.functional.hessian``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts = torch.split(flat, sizes)
        ps = {n: c.view(s) for n, c, s in zip(names, parts, shapes, strict=True)}
        return loss_of_output(functional_call(model, ps, (x,)))

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def dense_for(kind: str, model, xy) -> torch.Tensor:
    """Dense Hessian for the cross-entropy problems of :func:`make_problem`."""
    x, y = xy
    return dense_hessian(model, lambda out: F.cross_entropy(out, y), x)


def textbook_threshold(info, group: dict) -> float:
    """The bound on lr * lam(P^-1 H) for a row of tests/optim_table.py, written from the
    literature for its kind: GD 2, heavy ball 2 + 2 mu (Polyak 1964), Nesterov
    (2 + 2 mu) / (1 + 2 mu), Adam (2 + 2 b1) / (1 - b1) for a frozen preconditioner
    (Cohen et al. 2022). No dampening in the rows."""
    if info.kind == "adam":
        b1 = group["betas"][0]
        return (2 + 2 * b1) / (1 - b1)
    mu = group["momentum"]
    assert group["dampening"] == 0
    if mu == 0:
        return 2.0
    return (2 + 2 * mu) / (1 + 2 * mu) if group["nesterov"] else 2 + 2 * mu
