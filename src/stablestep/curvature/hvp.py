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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

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


class HessianOperator:
    r"""The Hessian :math:`H = \nabla^2 L(\theta)` of ``loss_fn()`` at the current ``params``.

    ``loss_fn`` is a closure returning a scalar loss built from ``params`` (it is called once,
    here). Products are taken against that one graph; :attr:`n_hvp` counts them.
    ``matvec`` takes and returns lists of tensors shaped like ``params``;
    ``matvec_flat`` takes and returns one flat float64 vector (what Lanczos uses).

    Example::

        op = HessianOperator(lambda: F.mse_loss(model(x), y), list(model.parameters()))
        hv = op.matvec([torch.randn_like(p) for p in op.params])
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor]) -> None:
        self.params = trainable(params)
        with torch.enable_grad():
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
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.device = self.params[0].device
        self.n_hvp = 0

    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return ``H v`` for ``v`` a list of tensors shaped like :attr:`params`."""
        if self._grads is None:
            raise RuntimeError("HessianOperator was released")
        self.n_hvp += 1
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

    def unflatten(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into tensors shaped (and typed) like :attr:`params`."""
        parts = torch.split(x, self.sizes)
        return [c.view_as(p).to(p.dtype) for c, p in zip(parts, self.params, strict=True)]

    @staticmethod
    def flatten(xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors into one flat float64 vector."""
        return torch.cat([x.reshape(-1).to(torch.float64) for x in xs])

    def matvec_flat(self, x: torch.Tensor) -> torch.Tensor:
        """``H x`` for a flat float64 vector ``x``; returns a flat float64 vector."""
        return self.flatten(self.matvec(self.unflatten(x)))

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
