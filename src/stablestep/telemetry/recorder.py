r"""``Recorder``: from per-step tensors to stored metrics, on one process or many.

The part of :class:`stablestep.Monitor` that does not know about optimizers: it takes a
step's tensors (:class:`~stablestep.telemetry.probes.StepTensors`: loss, gradients,
update, Adam state; torch tensors, local shards under FSDP2), computes the partial
statistics on the device (:func:`~stablestep.telemetry.probes.partials`), reduces them
over ``torch.distributed`` ranks, and writes them to the run store and the sinks. The
Keras callback feeds it Keras variables converted to torch tensors.

Host syncs: none on a step that records nothing; none either on a recorded step that does
not flush: the packed statistics stay on the device (under ``torch.distributed`` one
``all_gather`` per recorded step, a collective, not a host sync). The store is written
every ``flush_every`` recorded steps or ``flush_seconds`` seconds, with one device-to-host
transfer for all the steps buffered since the last write. A non-finite value is found
then, recorded as an event and flushed at once.

Under ``torch.distributed`` (initialised, ``MonitorConfig.distributed`` not ``False``):

* the loss is the mean of the per-rank losses (DDP averages gradients the same way) and
  ``loss_spread`` their range; a non-finite loss names its ranks in the event;
* sums (squared norms, counts) are summed over ranks: for sharded tensors (FSDP2 DTensor
  shards) each rank adds its shard's; a replicated tensor (DDP) is read by one rank only,
  its owner (:func:`owners` deals the replicas out so that each rank reads about
  ``1/world`` of the elements: the Monitor's work per rank shrinks with the number of
  ranks instead of all of it landing on rank 0), and the other ranks add zeros. Maxima
  are maxima over ranks. The quantiles come from every rank's sample of its own shards,
  or, with replicas only, from one process's sample split among the owners (the union
  is the sample a single process draws);
* only rank 0 writes to the store and the sinks. Every rank must call :meth:`record` for
  the same steps (they do when the same training loop runs on each).

Collectives (where a distributed job could hang): exactly one, an asynchronous
``all_gather``, issued by :meth:`record_partials` for each recorded step, at the same
steps on every rank, with the same packed layout. Nothing else issues one: :meth:`flush`
and :meth:`close` only wait for gathers already issued by every rank, so a flush by rank
0 alone (its ``flush_seconds`` timer, ``Monitor.read()`` or ``Monitor.state_dict()`` on
rank 0 only) neither hangs nor loses a step. Measured on 2 gloo ranks (CPU): a small
gather costs well under a millisecond of a step, so gathers are not batched
(``benchmarks/monitor_overhead.py --case ddp``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablestep._dtensor import is_sharded, local  # noqa: F401  (re-exported)
from stablestep.telemetry import names as N
from stablestep.telemetry._common import open_writer
from stablestep.telemetry.config import MonitorConfig
from stablestep.telemetry.probes import (
    CoordinateSample,
    Partials,
    Scratch,
    StepTensors,
    finish,
    partials,
    to_host,
    unpack,
)
from stablestep.telemetry.store import RunWriter

log = logging.getLogger("stablestep.telemetry")


def dist_context(config: MonitorConfig) -> tuple[int, int]:
    """``(rank, world_size)`` the recorder reduces over (``(0, 1)`` when not distributed)."""
    d = torch.distributed
    on = d.is_available() and d.is_initialized()
    if config.distributed is True and not on:
        raise ValueError("MonitorConfig(distributed=True) but torch.distributed is not initialised")
    if config.distributed is False or not on or d.get_world_size() == 1:
        return 0, 1
    return d.get_rank(), d.get_world_size()


class Recorder:
    """Turn per-step tensors into stored metrics (module docstring).

    Args:
        store: the SQLite run store's path.
        run: the run name asked for (the store may add a visible suffix; see
            :attr:`run_name`).
        config: the :class:`~stablestep.telemetry.config.MonitorConfig` (cadence of flushes,
            ``top_k``, ``quantile_sample``, sinks, ``overwrite``, ``distributed``).
        names: one name per tensor, in the order of ``StepTensors.grads``.
        numels: the local number of elements of each tensor (the coordinate sample).
        sharded: per tensor, whether each rank holds a different shard (FSDP2) rather
            than a replica (DDP, single process); default all replicated.
        global_numels: the whole tensors' numbers of elements (default ``numels``).
        run_config: called once, on rank 0, to give ``Run.config`` when the run is created.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        run: str,
        config: MonitorConfig,
        names: Sequence[str],
        numels: Sequence[int],
        run_config: Callable[[], dict[str, Any]],
        *,
        sharded: Sequence[bool] | None = None,
        global_numels: Sequence[int] | None = None,
    ):
        self.store = os.fspath(store)
        self.config = config
        self.names = list(names)
        self.rank, self.world = dist_context(config)
        sharded = list(sharded) if sharded is not None else [False] * len(self.names)
        #: per tensor, the rank that computes its statistics (``None``: a shard, every rank)
        self.owners = owners(numels, sharded, self.world)
        #: per tensor, 1.0 where this rank counts it (its shard, or a replica it owns)
        self.weights = [1.0 if o is None or o == self.rank else 0.0 for o in self.owners]
        if any(sharded):  # each rank samples its own shards (and rank 0 the replicas)
            self.sample = CoordinateSample(
                [n if w else 0 for n, w in zip(numels, self.weights, strict=True)],
                config.quantile_sample,
                seed=self.rank,
            )
        else:  # one process's sample of the whole model, split by owner: the union over
            # ranks is the very sample a single process draws (each rank takes its tensors')
            self.sample = CoordinateSample(numels, config.quantile_sample, seed=0)
        # the sample's slot in the packed vector: the same on every rank without talking to
        # them (``global_numel``: the whole model's size, at most ``quantile_sample``)
        total = sum(global_numels) if global_numels is not None else sum(numels)
        cap = min(config.quantile_sample, int(total))
        self.run_name = run  # rank 0's name is the one stored (only rank 0 writes)
        self.sample_cap = cap
        self.scratch = Scratch()
        self._run_config = run_config
        self.sinks = list(config.sinks) if self.rank == 0 else []
        self.resume_from: int | None = None
        self._writer: RunWriter | None = None
        self._pending: list[tuple[int, tuple, torch.Tensor, dict[str, Any]]] = []
        self._inflight: list[Any] = []  # other ranks: gathers not yet known complete
        self._since_flush = 0
        self._last_flush = time.monotonic()

    def _comm_device(self) -> torch.device:
        d = torch.distributed
        if d.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def writer(self) -> RunWriter | None:
        """The store writer (rank 0, once the first step is flushed), else ``None``."""
        return self._writer

    def ensure_writer(self) -> RunWriter | None:
        """Open the run in the store on rank 0 (``None`` on other ranks)."""
        if self._writer is None and self.rank == 0:
            self._writer = open_writer(
                self.store,
                self.run_name,
                config=self._run_config(),
                resume_from=self.resume_from,
                overwrite=self.config.overwrite,
            )
            self.run_name = self._writer.run if hasattr(self._writer, "run") else self.run_name
        return self._writer

    # ------------------------------------------------------------------ steps
    def record(
        self,
        step: int,
        st: StepTensors,
        *,
        host: dict[str, float] | None = None,
        per_tensor: bool = False,
    ) -> None:
        """Record step ``step``: ``st`` gives the tensors, ``host`` metrics already on the
        host (``lr``, curvature); ``per_tensor`` adds per-tensor statistics (detail steps).
        No host sync unless the store is due a write."""
        dev = _device(st)
        part = partials(st, self.weights, dev, sample=self.sample, scratch=self.scratch)
        self.record_partials(step, part, dev, host=host, per_tensor=per_tensor)

    def record_partials(
        self,
        step: int,
        part: Partials,
        device: torch.device,
        *,
        host: dict[str, float] | None = None,
        per_tensor: bool = False,
    ) -> None:
        """:meth:`record` for partial statistics already computed (the Monitor computes
        the gradient part before ``optimizer.step()`` and the rest after it)."""
        layout, vec = part.pack(self.sample_cap if part.sample is not None else 0, device)
        meta: dict[str, Any] = {"host": dict(host or {}), "per_tensor": per_tensor}
        if self.world > 1:
            # asynchronous: the step does not wait for the other ranks; the rows are read
            # when the store is written (rank 0) or dropped once complete (other ranks)
            d = torch.distributed
            vec = vec.to(self._comm_device())
            rows = [torch.empty_like(vec) for _ in range(self.world)]
            meta["work"] = d.all_gather(rows, vec, async_op=True)
            meta["rows"] = rows
            mat = vec  # placeholder until the gather completes
        else:
            mat = vec.reshape(1, -1)
        if self.rank != 0:
            self._inflight.append(meta["work"])
            if len(self._inflight) >= self.config.flush_every:
                self._drain()
            return
        self._pending.append((step, layout, mat, meta))
        self._since_flush += 1
        if (
            self._since_flush >= self.config.flush_every
            or time.monotonic() - self._last_flush >= self.config.flush_seconds
        ):
            self.flush()

    def _resolve(self) -> None:
        """Read every buffered step to the host in one transfer and emit it."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        mats = []
        for _, _, m, meta in pending:
            if "work" in meta:
                meta.pop("work").wait()
                m = torch.stack(meta.pop("rows"))
            mats.append(m)
        sizes = [m.numel() for m in mats]
        dev = mats[0].device
        flat = to_host(torch.cat([m.reshape(-1).to(dev) for m in mats]))
        pos = 0
        for (step, layout, _, meta), mat, size in zip(pending, mats, sizes, strict=True):
            rows = flat[pos : pos + size].reshape(mat.shape)
            pos += size
            red, sample = unpack(layout, rows)
            metrics, bad, ranks = finish(
                red, sample, self.names, top_k=self.config.top_k, per_tensor=meta["per_tensor"]
            )
            metrics.update(meta["host"])
            self.emit(step, metrics, bad, ranks)

    def emit(
        self,
        step: int,
        metrics: dict[str, float],
        bad: dict[str, int] | None = None,
        ranks: Sequence[int] = (),
    ) -> None:
        """Write one step's host metrics (rank 0); a non-finite value becomes an event of
        kind ``non-finite`` (``what``, ``tensors`` and, when known, ``ranks``)."""
        if self.rank != 0:
            return
        bad = bad or {}
        what = [k for k, v in metrics.items() if not math.isfinite(v)]
        if N.LOSS in what:
            what[what.index(N.LOSS)] = "loss"
        if bad:
            what.insert(0, "grad")
        writer = self.ensure_writer()
        writer.add(step, metrics)
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for sink in self.sinks:
            sink.write(step, finite)
        if what:
            data: dict[str, Any] = {"what": what, "tensors": bad}
            if self.world > 1:
                data["ranks"] = list(ranks)
                if ranks:
                    log.warning("step %d: non-finite loss on rank(s) %s", step, list(ranks))
            self.event(step, N.EVENT_NONFINITE, data)
            self._write()

    def event(self, step: int, kind: str, data: dict | None = None) -> None:
        """Record an event in the run and the sinks (rank 0; a no-op on other ranks)."""
        if self.rank != 0:
            return
        self.ensure_writer().event(step, kind, data)
        for sink in self.sinks:
            sink.event(step, kind, data or {})

    # ------------------------------------------------------------------ store
    def _write(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        for sink in self.sinks:
            fl = getattr(sink, "flush", None)
            if callable(fl):
                fl()
        self._since_flush = 0
        self._last_flush = time.monotonic()

    def _drain(self) -> None:
        """Other ranks: wait for the gathers issued so far (they completed long ago unless
        rank 0 is behind) and drop them."""
        for work in self._inflight:
            work.wait()
        self._inflight.clear()

    def flush(self) -> None:
        """Resolve the buffered steps (one host transfer) and write them (rank 0)."""
        if self.rank != 0:
            self._drain()
            return
        self._resolve()
        self._write()

    def close(self) -> None:
        """Flush, close the writer and the sinks."""
        self.flush()
        if self._writer is not None:
            self._writer.close()
        for sink in self.sinks:
            sink.close()


def owners(numels: Sequence[int], sharded: Sequence[bool], world: int) -> list[int | None]:
    """The rank that computes each tensor's statistics: ``None`` (every rank, its own shard)
    for a sharded tensor; for replicas, rank 0 when any tensor is sharded (FSDP2), else
    (DDP) the replicas are dealt out so that each rank reads about ``1/world`` of the
    elements: largest first, to the rank with the fewest so far (ties: lowest index, lowest
    rank). The same on every rank from the sizes alone, with no communication."""
    if world <= 1:
        return [0] * len(numels)
    if any(sharded):
        return [None if s else 0 for s in sharded]
    load = [0] * world
    out: list[int | None] = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-int(numels[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += int(numels[i])
    return out


def _device(st: StepTensors) -> torch.device:
    for g in st.grads:
        if g is not None:
            return g.device
    if isinstance(st.loss, torch.Tensor):
        return st.loss.device
    return torch.device("cpu")


__all__ = ["Recorder", "dist_context", "is_sharded", "local", "owners"]
