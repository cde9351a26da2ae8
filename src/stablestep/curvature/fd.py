r"""Hessian-vector products from gradients only: central finite differences.

When double backward is missing (flash / memory-efficient SDPA kernels, fused CUDA ops,
FSDP2's sharded parameters), the product is the directional derivative of the gradient
taken numerically,

.. math::

    H v \approx \frac{g(\theta + h\hat v) - g(\theta - h\hat v)}{2h}\,\|v\|,
    \qquad \hat v = v/\|v\|,

two gradient evaluations (forward + backward) per product. The error has two parts:
truncation :math:`\tfrac{h^2}{6}\,\nabla^3 g[\hat v,\hat v,\hat v]` (the gradient is not
linear over the step) and rounding :math:`\approx \epsilon\,\|g\| / h` (two nearly equal
gradients subtracted), so :math:`h` is chosen per dtype, near :math:`\epsilon^{1/3}`
scaled to where both parts are small on real models (:data:`FD_STEP`, lengths in parameter
space: :math:`\hat v` has unit norm over all parameters). Measured against exact
double-backward products (error of :math:`H\hat v` relative to :math:`\lambda_{\max}`):
a 2-layer GPT-2 in float32 at :math:`h = 5\cdot10^{-4}`: about :math:`10^{-4}` both along the
top eigenvector and a random direction; a small CNN in float32: :math:`2\cdot10^{-4}`; in
float64 at :math:`h=10^{-4}`: :math:`2\cdot10^{-5}` (GPT-2, whose attention keeps float32
parts) and :math:`10^{-8}` (CNN). ``tests/curvature/test_backends.py`` checks the products
and the resulting eigenvalues against double backward. bfloat16/float16 give about
:math:`\epsilon^{2/3}`, i.e. 1-3% -- compute the probe in float32 for 1% answers.

Every gradient evaluation runs the closure under a forked RNG reseeded identically, so a
dropout mask is the same at :math:`\theta \pm h\hat v` (the global RNG is untouched). The
parameters are perturbed in place (through ``.data``, so the autograd version counters do
not move and a graph the user holds stays usable) and restored by copy (bit-exact).
Gradients come from :func:`torch.autograd.grad` (``.grad`` untouched), or, for FSDP2's
sharded ``DTensor`` parameters, from ``loss.backward()`` -- whose reduce-scatter averages
over ranks -- with the user's ``.grad`` saved and restored. A BatchNorm in train mode
updates its running statistics on every evaluation (eval mode for the probe avoids it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from stablestep.curvature.distributed import Comm, local
from stablestep.curvature.hvp import LossFn, Operator, _check_loss

#: Step length ``h`` (parameter-space norm) of the central difference, per dtype.
FD_STEP: dict[torch.dtype, float] = {
    torch.float64: 1e-4,
    torch.float32: 5e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


def fd_step(dtype: torch.dtype) -> float:
    """:data:`FD_STEP` for ``dtype`` (float32's for any other dtype)."""
    return FD_STEP.get(dtype, FD_STEP[torch.float32])


@contextlib.contextmanager
def same_rng(seed: int, device: torch.device):
    """Run the block with the global RNG forked and seeded with ``seed`` (restored after)."""
    if device.type == "cuda":
        fork = torch.random.fork_rng(devices=[device.index or 0], device_type="cuda")
    else:
        fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        yield


class Evaluator:
    """Loss and gradient of ``loss_fn`` at ``theta + shift``, the parameters restored after.

    ``sharded``: take gradients with ``loss.backward()`` (FSDP2), saving and restoring the
    user's ``.grad``; else :func:`torch.autograd.grad`. ``seed``: every evaluation sees the
    same RNG draws. :attr:`n_forward` and :attr:`n_backward` count the passes.
    """

    def __init__(
        self, loss_fn: LossFn, params: Sequence[torch.Tensor], *, sharded: bool = False,
        seed: int = 0, comm: Comm | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.params = list(params)
        self.local = [local(p) for p in self.params]
        self.sharded = sharded
        self.seed = seed
        self.comm = comm
        self.loss_dtype = torch.float32
        self.n_forward = 0
        self.n_backward = 0

    @contextlib.contextmanager
    def shifted(self, shift: Sequence[torch.Tensor] | None):
        """Parameters moved by ``shift`` (local tensors) inside the block, copied back after."""
        if shift is None:
            yield
            return
        # through .data: the version counters stay, so a graph the user still holds on these
        # parameters stays valid (the values are bit-exactly back before it can run)
        raw = [p.data for p in self.local]
        saved = [p.clone() for p in raw]
        for p, s in zip(raw, shift, strict=True):
            p.add_(s.to(p.dtype))
        try:
            yield
        finally:
            for p, s in zip(raw, saved, strict=True):
                p.copy_(s)

    def loss(self, shift: Sequence[torch.Tensor] | None = None) -> float:
        """``loss_fn()`` at ``theta + shift``, forward only (no graph); averaged over ranks
        when ``comm`` is given."""
        self.n_forward += 1
        with self.shifted(shift), torch.no_grad(), same_rng(self.seed, self.local[0].device):
            out = self.loss_fn()
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"loss_fn must return a torch.Tensor, got {type(out).__name__}")
            self.loss_dtype = out.dtype
            val = out.detach().reshape(()).to(torch.float64)
        if self.comm is not None:
            val = self.comm.mean(val)
        return float(val)

    def gradient(
        self, shift: Sequence[torch.Tensor] | None = None
    ) -> tuple[float, list[torch.Tensor]]:
        """(loss, local gradients) at ``theta + shift``."""
        self.n_forward += 1
        self.n_backward += 1
        with self.shifted(shift), torch.enable_grad(), same_rng(
            self.seed, self.local[0].device
        ):
            loss = _check_loss(self.loss_fn())
            if not self.sharded:
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                out = [torch.zeros_like(p) if g is None else g.detach()
                       for p, g in zip(self.local, grads, strict=True)]
                return float(loss.detach()), out
            saved = [p.grad for p in self.params]
            try:
                for p in self.params:
                    p.grad = None
                loss.backward()
                out = [torch.zeros_like(q) if p.grad is None else local(p.grad).detach().clone()
                       for p, q in zip(self.params, self.local, strict=True)]
            finally:
                for p, g in zip(self.params, saved, strict=True):
                    p.grad = g
            return float(loss.detach()), out


class FiniteDifferenceOperator(Operator):
    r"""Hessian-vector products by central differences of gradients (module docstring).

    ``h``: step length in parameter space (default :func:`fd_step` of the parameters'
    dtype). The gradient at :math:`\theta` is taken once here (the loss and :attr:`grad`);
    each product costs two more gradient evaluations. Works wherever a plain backward
    works: flash attention, FSDP2 (``comm`` sharded), DDP (``comm`` replicated).
    """

    backend = "fd"

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[torch.Tensor],
        *,
        h: float | None = None,
        comm: Comm | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(params, comm)
        sharded = comm is not None and comm.kind == "sharded"
        self.h = float(h) if h is not None else fd_step(self.local[0].dtype)
        if not self.h > 0:
            raise ValueError(f"Invalid h: {h} (expected > 0)")
        self.eval = Evaluator(loss_fn, self.params, sharded=sharded, seed=seed, comm=comm)
        self.loss, self.grad = self.eval.gradient()
        self._average_loss_and_grad()

    def _hvp(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        flat = self.flatten(v)
        norm = self.dot(flat, flat) ** 0.5
        if norm == 0.0:
            return [torch.zeros_like(p) for p in self.local]
        step = self.unflatten(flat * (self.h / norm))
        _, g_plus = self.eval.gradient(step)
        _, g_minus = self.eval.gradient([-s for s in step])
        scale = norm / (2.0 * self.h)
        return [((a.double() - b.double()) * scale).to(a.dtype)
                for a, b in zip(g_plus, g_minus, strict=True)]
