r"""Curvature under ``torch.distributed``: replicated (DDP) and sharded (FSDP2) parameters.

Both modes give the numbers one process would give on the concatenated batch, provided every
rank's loss is a mean over a batch of the same size (as DDP and FSDP2 assume for gradients):

.. math::

    L = \frac1R \sum_{r=1}^R L_r \quad\Rightarrow\quad
    H v = \frac1R \sum_{r=1}^R H_r v .

- **Replicated** (DDP, or any data-parallel run with identical parameters on every rank):
  each rank takes the product :math:`H_r v` on its own batch with the same vector ``v``,
  then the products (and the loss and gradient) are averaged with one ``all_reduce`` --
  what DDP does to gradients. Lanczos then runs identically on every rank.
- **Sharded** (FSDP2 ``fully_shard``: parameters are ``DTensor`` sharded on dim 0): every
  vector lives as this rank's shards (:func:`local` of each parameter, concatenated). The
  product comes from FSDP2's own backward (finite differences of gradients, see
  :mod:`stablestep.curvature.fd`), whose reduce-scatter already averages over ranks; the
  dot products and norms of Lanczos are partial sums ``all_reduce``-d across ranks.

Every rank must call the probe at the same step (the Monitor does): the reductions are
collective operations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stablestep._dtensor import is_dtensor, local  # noqa: F401  (re-exported)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """True when any parameter is a ``DTensor`` (FSDP2 ``fully_shard``)."""
    return any(is_dtensor(p) for p in params)


def _world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class Comm:
    """The reductions the curvature code needs, for one of two layouts.

    ``kind`` is ``"replicated"`` (each rank holds all parameters; products are averaged)
    or ``"sharded"`` (each rank holds its shards; dot products are summed). ``n_global``:
    the parameter count over all ranks.
    """

    def __init__(self, kind: str, params: Sequence[torch.Tensor], group=None) -> None:
        if kind not in ("replicated", "sharded"):
            raise ValueError(f"Invalid kind: {kind!r} (expected 'replicated' or 'sharded')")
        self.kind = kind
        self.group = group
        self.params = list(params)
        self.world = _world()
        self.n_global = sum(p.numel() for p in self.params)  # DTensor numel is global

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=op, group=self.group)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over ranks (returns a new tensor)."""
        import torch.distributed as dist

        out = t.detach().clone()
        return self._all_reduce(out, dist.ReduceOp.SUM) / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum partial dot products over ranks when sharded; identity when replicated."""
        if self.kind != "sharded":
            return t
        import torch.distributed as dist

        out = t.detach().clone()
        return self._all_reduce(out, dist.ReduceOp.SUM)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a flat vector laid out like one process's parameters."""
        if self.kind != "sharded":
            return full
        from torch.distributed.tensor import distribute_tensor

        parts = []
        offset = 0
        for p in self.params:
            chunk = full[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            if hasattr(p, "placements"):
                chunk = distribute_tensor(
                    chunk.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                ).to_local()
            parts.append(chunk.reshape(-1))
        return torch.cat(parts)


def detect(params: Sequence[torch.Tensor], mode: str = "auto") -> Comm | None:
    """The :class:`Comm` for ``params``: sharded for ``DTensor`` parameters, replicated when
    ``torch.distributed`` runs with more than one rank, else ``None`` (one process).

    ``mode``: ``"auto"`` (as described), ``"off"`` (never reduce: each rank measures its own
    batch), ``"replicated"`` or ``"sharded"`` (forced).
    """
    if mode == "off":
        return None
    if mode in ("replicated", "sharded"):
        return Comm(mode, params)
    if mode != "auto":
        raise ValueError(
            f"Invalid distributed mode: {mode!r} (expected 'auto', 'off', 'replicated' or "
            "'sharded')"
        )
    if is_sharded(params):
        return Comm("sharded", params)
    if _world() > 1:
        return Comm("replicated", params)
    return None
