r"""Hessian-vector products by double backward, without the ``create_graph`` leak.

For a scalar loss :math:`L(\theta)` the Hessian-vector product is the directional
derivative of the gradient,

.. math::

    H v = \nabla_\theta \big(\nabla_\theta L(\theta)^\top v\big),

so one backward pass with ``create_graph=True`` gives a differentiable gradient
:math:`g(\theta)` and every further product costs one more backward pass through that
graph. :class:`HessianOperator` runs the user's closure **once** per estimate (so a
dropout mask or a data-augmentation draw is the same for every product) and then answers
``matvec`` calls against that single graph.

The well-known leak of ``loss.backward(create_graph=True)`` comes from storing the
differentiable gradient in ``p.grad``: the gradient's graph ends in ``p``'s
``AccumulateGrad`` node, which holds ``p``, which holds ``p.grad`` -- a reference cycle
through C++ that Python's garbage collector cannot see. Here the gradient is obtained with
:func:`torch.autograd.grad`, which never writes ``p.grad``; the graph lives only as long as
the operator object and is freed with it (or explicitly by :meth:`HessianOperator.release`).
The user's ``.grad`` fields, parameters, optimizer state and the model's train/eval mode are
never touched.

:class:`Operator` is the interface every backend offers (flat float64 vectors for Lanczos,
the loss and gradient at the point, a product count, averaging over ranks):
:class:`HessianOperator` here (double backward, optionally under :func:`math_attention`),
:class:`~stablestep.curvature.fd.FiniteDifferenceOperator` (gradients only); the choice and
the automatic fallback are in :mod:`stablestep.curvature.backends`. A product that raises is
re-raised as :class:`BackendError`, so a failing backend is told apart from a failing closure.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from stablestep.curvature.distributed import Comm, local

LossFn = Callable[[], torch.Tensor]


def _check_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn returned a loss that does not require grad (called under no_grad?)"
        )
    return loss.reshape(())


def trainable(params: Sequence[torch.Tensor] | object) -> list[torch.Tensor]:
    """The parameters that require grad, as a list (accepts any iterable of tensors)."""
    out = [p for p in params if p.requires_grad]  # type: ignore[union-attr]
    if not out:
        raise ValueError("no parameter requires grad")
    return out


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` with the math kernel inside this block.

    The math kernel is plain differentiable torch ops, so its double backward exists;
    the flash and memory-efficient kernels have none (pytorch#116350). Models that do not
    call SDPA are unaffected. Costs the attention matrix in memory (sequence length squared).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class BackendError(RuntimeError):
    """A Hessian-vector product raised (the backend cannot take products here, e.g. no
    double backward for an op); the original error is the ``__cause__``."""


class Operator:
    r"""What every Hessian-vector-product backend offers (base class).

    ``params``: the trainable tensors; ``loss`` (float) and ``grad`` (list of tensors
    shaped like this rank's part of ``params``) at the current point; ``n``: length of the
    flat vectors (this rank's part: the local shards under FSDP2); ``n_hvp``: products
    taken. ``matvec`` takes and returns lists of tensors shaped like the local parameters;
    ``matvec_flat`` one flat float64 vector. ``comm``
    (:class:`~stablestep.curvature.distributed.Comm` or None) makes products the average
    over ranks (replicated) or the vectors sharded.
    """

    backend = "base"

    def __init__(self, params: Sequence[torch.Tensor], comm: Comm | None = None) -> None:
        self.params = trainable(params)
        self.comm = comm
        self.local = [local(p) for p in self.params]
        self.sizes = [p.numel() for p in self.local]
        self.n = sum(self.sizes)
        self.device = self.local[0].device
        self.n_hvp = 0
        self.loss = math.nan
        self.grad: list[torch.Tensor] = []

    def _hvp(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return ``H v`` for ``v`` a list of tensors shaped like the local parameters."""
        self.n_hvp += 1
        try:
            out = self._hvp(v)
        except (RuntimeError, NotImplementedError) as err:
            if isinstance(err, BackendError):
                raise
            raise BackendError(" ".join(str(err).split())) from err
        if self.comm is not None and self.comm.kind == "replicated":
            out = self.unflatten(self.comm.mean(self.flatten(out)))
        return out

    def _average_loss_and_grad(self) -> None:
        """Replicated: average the loss and gradient over ranks; sharded: the loss."""
        if self.comm is None:
            return
        self.loss = float(self.comm.mean(torch.tensor([self.loss], dtype=torch.float64,
                                                       device=self.device)))
        if self.comm.kind == "replicated":
            self.grad = self.unflatten(self.comm.mean(self.flatten(self.grad)))

    def unflatten(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into tensors shaped (and typed) like the local parameters."""
        parts = torch.split(x, self.sizes)
        return [c.view_as(p).to(p.dtype) for c, p in zip(parts, self.local, strict=True)]

    @staticmethod
    def flatten(xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (local shards of DTensors) into one flat float64 vector."""
        return torch.cat([local(x).reshape(-1).to(torch.float64) for x in xs])

    def matvec_flat(self, x: torch.Tensor) -> torch.Tensor:
        """``H x`` for a flat float64 ``x``; returns a flat float64 vector."""
        return self.flatten(self.matvec(self.unflatten(x)))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Inner product of two flat vectors over all ranks (sharded: partial sums reduced)."""
        d = a @ b
        return float(self.comm.sum(d) if self.comm is not None else d)

    def release(self) -> None:
        """Free what the operator holds (graphs, buffers)."""


class HessianOperator(Operator):
    r"""The Hessian :math:`H = \nabla^2 L(\theta)` of ``loss_fn()`` at the current ``params``,
    by double backward.

    ``loss_fn`` is a closure returning a scalar loss built from ``params`` (it is called once,
    here; under :func:`math_attention` when ``math=True``). Products are taken against that
    one graph; :attr:`n_hvp` counts them. See :class:`Operator` for the interface.

    Example::

        op = HessianOperator(lambda: F.mse_loss(model(x), y), list(model.parameters()))
        hv = op.matvec([torch.randn_like(p) for p in op.params])
    """

    backend = "exact"

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[torch.Tensor],
        *,
        math: bool = False,
        comm: Comm | None = None,
    ) -> None:
        super().__init__(params, comm)
        if comm is not None and comm.kind == "sharded":
            raise ValueError(
                "double backward does not run through FSDP2's sharded parameters: "
                "use backend='fd' (finite differences of FSDP2's own gradients)"
            )
        if math:
            self.backend = "math"
        ctx = math_attention() if math else contextlib.nullcontext()
        with torch.enable_grad(), ctx:
            loss = _check_loss(loss_fn())
            grads = torch.autograd.grad(
                loss, self.params, create_graph=True, allow_unused=True
            )
        self.loss = float(loss.detach())
        # Parameters whose gradient does not depend on any parameter (unused, or the loss
        # is linear in them) have a zero Hessian block.
        self._grads = [g for g in grads if g is not None and g.requires_grad]
        self._idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grad = [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(self.params, grads, strict=True)
        ]
        self._average_loss_and_grad()

    def _hvp(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._grads is None:
            raise RuntimeError("HessianOperator was released")
        out = [torch.zeros_like(p) for p in self.params]
        if not self._grads:
            return out
        hv = torch.autograd.grad(
            self._grads,
            self.params,
            grad_outputs=[v[i].to(self.params[i].dtype) for i in self._idx],
            retain_graph=True,
            allow_unused=True,
        )
        for i, h in enumerate(hv):
            if h is not None:
                out[i] = h.detach()
        return out

    def release(self) -> None:
        """Drop the double-backward graph now (it is also dropped with the object)."""
        self._grads = None


def hvp(
    loss_fn: LossFn, params: Sequence[torch.Tensor], v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    r"""One Hessian-vector product :math:`\nabla^2 L(\theta)\, v` of ``loss_fn()`` at ``params``.

    Convenience wrapper around :class:`HessianOperator`; for several products on the same
    loss build the operator once. ``v`` is aligned with ``params`` (all must require grad).
    """
    params = list(params)
    if len(v) != len(params):
        raise ValueError(f"v has {len(v)} tensors but params has {len(params)}")
    if not all(p.requires_grad for p in params):
        raise ValueError("hvp: every parameter in params must require grad")
    op = HessianOperator(loss_fn, params)
    try:
        return op.matvec(v)
    finally:
        op.release()
