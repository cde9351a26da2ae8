"""Shared fixtures for the optimizer tests: one torch thread, Keras on the torch backend."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # must precede any `import keras`

import torch  # noqa: E402


def make_params(seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    """A few tensors of different shapes (a matrix, a vector, a scalar-ish, a 3-d block)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (1,), (3, 4, 2)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def grad_sequence(params, n_steps: int, seed: int = 1, spike_at: int | None = None):
    """Deterministic gradients per step; optionally one step 100x larger (stale-v spike)."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(n_steps):
        k = 100.0 if t == spike_at else 1.0
        seq.append([k * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params])
    return seq


def run(opt, params, grads):
    """Apply the gradient sequence with ``opt``; returns the params (mutated in place)."""
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return params
