r"""Which way to take Hessian-vector products, and the automatic fallback.

==========  =========================================================  ======================
backend     how                                                        cost per product
==========  =========================================================  ======================
``exact``   double backward (:class:`~stablestep.curvature.HessianOperator`)  1 backward of the
                                                                       backward graph
``math``    the same, with the closure run under
            ``sdpa_kernel(SDPBackend.MATH)``: SDPA's flash and memory-efficient kernels
            have no double backward (pytorch#116350), the math kernel does.
            Memory: the attention matrix.                              as ``exact``
``fd``      central difference of two gradients
            (:class:`~stablestep.curvature.fd.FiniteDifferenceOperator`): runs wherever
            a plain backward runs (any attention kernel, fused ops, FSDP2).  2 forward +
                                                                       2 backward
``forward`` no product at all: the probe measures only the critical sharpness
            (one gradient, a line search of forward passes).              0
==========  =========================================================  ======================

``auto`` tries ``exact``, then ``math``, then ``fd``: when a product raises (``RuntimeError``
or ``NotImplementedError``, e.g. "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented", or running out
of memory) it logs one line and uses the next from then on. Under FSDP2 (sharded
``DTensor`` parameters) ``auto`` starts at ``fd``: double backward does not pass through
FSDP2's all-gather.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from stablestep.curvature.distributed import Comm
from stablestep.curvature.hvp import BackendError, HessianOperator, LossFn, Operator

logger = logging.getLogger("stablestep.curvature")

BACKENDS = ("auto", "exact", "math", "fd", "forward")
_CHAIN = ("exact", "math", "fd")


def build_operator(
    backend: str,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    *,
    comm: Comm | None = None,
    fd_step: float | None = None,
    seed: int = 0,
) -> Operator:
    """The Hessian operator of ``loss_fn()`` for ``backend`` in ``exact``, ``math``, ``fd``.

    Running out of memory while building it (double backward keeps the graph; the math
    kernel the attention matrix) raises :class:`~stablestep.curvature.hvp.BackendError`, so
    ``auto`` moves on to the next backend.
    """
    try:
        return _build(backend, loss_fn, params, comm=comm, fd_step=fd_step, seed=seed)
    except torch.OutOfMemoryError as err:
        raise BackendError(" ".join(str(err).split())[:200]) from err


def _build(backend, loss_fn, params, *, comm, fd_step, seed) -> Operator:
    if backend == "exact":
        return HessianOperator(loss_fn, params, comm=comm)
    if backend == "math":
        return HessianOperator(loss_fn, params, math=True, comm=comm)
    if backend == "fd":
        from stablestep.curvature.fd import FiniteDifferenceOperator

        return FiniteDifferenceOperator(loss_fn, params, h=fd_step, comm=comm, seed=seed)
    raise ValueError(f"Invalid backend: {backend!r} (expected 'exact', 'math' or 'fd')")


class BackendChooser:
    """The backend in use, and the fallback of ``auto`` (module docstring).

    ``requested``: a name of :data:`BACKENDS`. ``current``: the one to use now.
    """

    def __init__(self, requested: str, *, sharded: bool = False,
                 current: str | None = None) -> None:
        if requested not in BACKENDS:
            raise ValueError(f"Invalid backend: {requested!r} (expected one of {BACKENDS})")
        self.requested = requested
        self.sharded = sharded
        first = "fd" if sharded else "exact"
        if requested == "auto":
            self.current = current if current in _CHAIN else first
        else:
            self.current = requested

    def demote(self, err: BaseException) -> bool:
        """Move to the next backend after ``err``; False when there is none (re-raise)."""
        if self.requested != "auto":
            return False
        now = self.current
        if now not in _CHAIN or now == _CHAIN[-1]:
            return False
        nxt = _CHAIN[_CHAIN.index(now) + 1]
        text = " ".join(str(err).split())[:200]
        logger.warning("curvature: %s Hessian-vector products failed (%s: %s); using %s "
                       "from now on", now, type(err).__name__, text,
                       "the math attention kernel" if nxt == "math" else "finite differences")
        self.current = nxt
        return True
