"""``stablestep.Monitor``: per-step telemetry of any torch optimizer into a run store."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablestep.optim import inspect
from stablestep.telemetry import names as N
from stablestep.telemetry._common import default_run_name, utc_now
from stablestep.telemetry.config import UNSET, MonitorConfig, resolve_config
from stablestep.telemetry.nan_origin import OriginWatch
from stablestep.telemetry.probes import (
    AdamTensor,
    StepTensors,
    adam_partials,
    host_steps,
    partials,
    update_partials,
)
from stablestep.telemetry.recorder import Recorder, is_sharded, local
from stablestep.telemetry.store import Run, open_run


class Monitor:
    r"""Watch what an optimizer does, step by step, and record it in a run store.

    Attaches to the user's own optimizer (``torch.optim.Adam``/``AdamW`` with or without
    AMSGrad, ``SGD`` with or without momentum, ``stablestep.Adam``/``AdamW`` in either
    epsilon convention) without replacing it::

        monitor = stablestep.Monitor(model, opt, store="runs.db", run="baseline")
        for x, y in data:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            monitor.observe(loss)   # loss, gradients, parameters before the step
            opt.step()              # a removable step post-hook records the update
        monitor.close()             # or use ``with Monitor(...) as monitor:``

    What is recorded (names from :mod:`stablestep.telemetry.names`; the math is in
    :mod:`stablestep.telemetry.probes`):

    * every ``every`` steps (default 1, cheap: one fused norm over the gradients, no host
      sync): ``loss``, ``lr`` (group 0), ``grad_norm``, ``grad_nonfinite``;
    * every ``state_every`` steps (default 10; ``None`` turns it off): ``param_norm``,
      ``update_norm``, ``update_ratio``, ``update_cos``, ``grad_norm/<tensor>`` for every
      tensor and, for the Adam family, ``eff_step_p50/p90/p99/max``, ``eps_share``,
      ``g2v_rms``, ``g2v_max``, ``amsgrad_gap``; plus ``eff_step_max``, ``eps_share``,
      ``g2v_rms`` and ``update_ratio`` per tensor for the ``top_k`` worst tensors.
      These passes read every parameter and Adam state twice or thrice; once every 10
      steps keeps the overhead near 1% on a CPU (``benchmarks/monitor_overhead.py``);
    * every ``secant_every`` steps (default 10; ``None`` turns it off), at the step after:
      ``secant_curvature``, the free curvature along the update
      (:mod:`stablestep.telemetry.secant`, no Hessian-vector product; one extra copy of the
      parameters; every step costs ~1.7x on an optimizer-bound toy MLP, every 10 steps is
      within noise: ``benchmarks/secant.py``); under ``torch.distributed`` its dot
      products are summed over ranks with the step's other sums (FSDP2 shards included);
    * every ``curvature_every`` steps when ``curvature_loss`` (a closure returning the loss
      on a fixed probe batch) is given: the metrics of
      ``stablestep.curvature.CurvatureProbe(params, optimizer)(curvature_loss)``.

    A NaN/Inf loss, gradient or statistic (also one caused by a NaN optimizer step count)
    is never stored as a number: the value is missing and an event of kind ``non-finite``
    says what was non-finite (``what``: ``"loss"``, ``"grad"`` and/or metric names;
    ``tensors``: non-finite gradient entries per tensor; ``ranks`` under
    ``torch.distributed``: the ranks whose own loss was non-finite). Such an event is
    written as soon as the step is read back (see below).

    Where a NaN was born (opt-in): with ``MonitorConfig(keep_batch=True)`` and
    ``monitor.observe(loss, batch=lambda: loss_fn(model(x), y))`` the Monitor keeps a
    reference to that closure until the next step and reads one finiteness flag per
    recorded step; at the first non-finite loss or gradient of an incident it replays the
    step once with hooks (:mod:`stablestep.telemetry.nan_origin`) and records an event of
    kind ``"nan-origin"`` naming the first module (forward) and parameter gradient
    (backward) that went non-finite. Nothing else happens while the values are finite.

    Statistics stay on the device between writes (:mod:`stablestep.telemetry.recorder`):
    no host sync on a step, one device-to-host transfer per write (plus, on detailed steps
    of a ``fused=True``/``capturable=True`` optimizer, which keeps its step counts on the
    device, one read of those counts). Writes happen every
    ``flush_every`` recorded steps, every ``flush_seconds`` seconds, on :meth:`read`,
    :meth:`state_dict` and :meth:`close`.

    Under ``torch.distributed`` (DDP, FSDP2 ``fully_shard``) run the same Monitor line on
    every rank: the stored numbers are global (loss averaged over ranks, norms and counts
    over all shards, maxima over ranks, quantiles from every rank's sample) and only rank
    0 writes; ``loss_spread`` is the range of the per-rank losses. Under DDP each rank reads
    about ``1/world`` of the replicated tensors (:func:`~stablestep.telemetry.recorder.owners`),
    so the Monitor's cost per rank shrinks as ranks are added. Hyperparameters are read
    from ``optimizer.param_groups`` at every step, so ``optimizer.load_state_dict()``
    (which replaces the group dicts) is followed. Every rank must build the Monitor and
    call :meth:`observe` for every step (a recorded step is one collective); to watch a
    single process of a distributed job, pass ``MonitorConfig(distributed=False)``. Steps are
    counted by :meth:`observe` calls from ``start_step`` (0 unless given). Resume a run with
    ``monitor.load_state_dict(sd)`` before the first ``observe``: the run continues
    under the same name, and anything stored at or after the checkpoint's step (an
    abandoned continuation) is replaced, so no step is duplicated or missing.

    Args:
        model: the ``torch.nn.Module`` whose parameters give tensor names (or ``None``:
            names ``param<i>``).
        optimizer: the ``torch.optim.Optimizer`` to watch.
        store: path of the SQLite run store (created if needed; several runs per file).
        run: the run's name in the store (default: ``run-<UTC time>-<random>``).
        config: a :class:`~stablestep.telemetry.config.MonitorConfig` (cadence, sinks,
            ``overwrite``, run config extras, ...); a plain dict is still accepted and means
            ``MonitorConfig(extra=config)``: extra JSON-serialisable entries for
            ``Run.config`` (e.g. ``scenario``).
        every, state_every, top_k, quantile_sample, flush_every, flush_seconds,
        curvature_every, curvature_loss, sinks, overwrite: the fields of
            :class:`~stablestep.telemetry.config.MonitorConfig`, as keywords; a keyword given
            here wins over the same field of ``config``.
        start_step: the step number of the first :meth:`observe` (default 0), e.g. 1 to
            number steps as a framework's 1-based global step does (the Hugging Face
            callback). Kept as :attr:`start_step`.

    When ``run`` already exists in the store (and the Monitor is not resuming it), the run
    is recorded under a new name with a visible suffix, logged at INFO and kept in
    :attr:`run_name`; ``overwrite=True`` replaces the old run instead.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        *,
        store: str | os.PathLike = "stablestep.db",
        run: str | None = None,
        config: MonitorConfig | dict[str, Any] | None = None,
        every: int = UNSET,
        state_every: int | None = UNSET,
        top_k: int = UNSET,
        quantile_sample: int = UNSET,
        flush_every: int = UNSET,
        flush_seconds: float = UNSET,
        curvature_every: int | None = UNSET,
        curvature_loss: Callable[[], torch.Tensor] | None = UNSET,
        sinks: Sequence[Any] = UNSET,
        overwrite: bool = UNSET,
        model_probes: Any = None,
        secant_every: int | None = UNSET,
        start_step: int = 0,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        cfg = resolve_config(
            config,
            every=every,
            state_every=state_every,
            top_k=top_k,
            quantile_sample=quantile_sample,
            flush_every=flush_every,
            flush_seconds=flush_seconds,
            curvature_every=curvature_every,
            curvature_loss=curvature_loss,
            sinks=sinks,
            overwrite=overwrite,
            secant_every=secant_every,
        )
        self.config = cfg
        self.model = model
        self.optimizer = optimizer
        self.store = os.fspath(store)
        self.every, self.state_every, self.top_k = cfg.every, cfg.state_every, cfg.top_k
        self.flush_every, self.flush_seconds = cfg.flush_every, float(cfg.flush_seconds)
        self.curvature_every, self.curvature_loss = cfg.curvature_every, cfg.curvature_loss
        named = model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            named = model.module  # names without DDP's "module." prefix
        by_id = {id(p): n for n, p in named.named_parameters()} if named is not None else {}
        # the parameters (and their names) are fixed; their param groups are read live
        self._params: list[tuple[str, torch.Tensor]] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._params.append((by_id.get(id(p), f"param{len(self._params)}"), p))
        self._index = {id(p): i for i, (_, p) in enumerate(self._params)}
        self._rec = Recorder(
            self.store,
            run or default_run_name(),
            cfg,
            [n for n, _ in self._params],
            [local(p).numel() for _, p in self._params],
            self._run_config,
            sharded=[is_sharded(p) for _, p in self._params],
            global_numels=[p.numel() for _, p in self._params],
        )
        self.sinks = self._rec.sinks
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"Invalid start_step: {start_step!r} (need an int >= 0)")
        self.start_step = start_step
        self._step = start_step
        self._pending: dict | None = None
        self._snaps: dict[int, torch.Tensor] = {}
        self._probe: Any = None
        self._probe_state: dict | None = None
        self._closed = False
        from stablestep.telemetry.secant import SecantTracker  # free curvature (#11)

        # the dot products of the tensors this rank counts, summed over ranks with the
        # other sums of a recorded step (telemetry.secant.from_parts)
        self._secant = SecantTracker(cfg.secant_every)
        self._handle = optimizer.register_step_post_hook(self._post_step)
        #: where a NaN was born: the kept replay closure and the incidents replayed
        self.nan_watch = OriginWatch(model, keep_batch=cfg.keep_batch)
        self.model_probes = None
        if model_probes is not None:
            self.attach_model_probes(model_probes)

    def attach_model_probes(self, probes: Any) -> None:
        """Record ``probes.collect(step)`` (e.g. :class:`~stablestep.telemetry.model_probes.
        ModelProbes`) at every ``observe``; it follows ``state_every`` unless it has a cadence."""
        self.model_probes = probes
        probes.bind(self.state_every or self.every)
        self.nan_watch.probes = probes  # paused while a non-finite step is replayed

    @property
    def run_name(self) -> str:
        """The run's name in the store (the store may have added a suffix; see ``overwrite``)."""
        return self._rec.run_name

    @property
    def rank(self) -> int:
        """This process's rank in the reduction (0 when not distributed); rank 0 writes."""
        return self._rec.rank

    # ----------------------------------------------------------------- the loop
    @property
    def step(self) -> int:
        """Index of the next step :meth:`observe` will record."""
        return self._step

    def observe(self, loss: torch.Tensor | float | None = None, *,
                batch: Callable[[], torch.Tensor] | None = None) -> None:
        """Record step ``self.step``: call after ``loss.backward()``, before ``optimizer.step()``.

        ``batch``: with ``MonitorConfig(keep_batch=True)``, a closure that re-runs this
        step's forward on its batch and returns the loss (``lambda: loss_fn(model(x), y)``);
        it is called only if the step turns out non-finite, to find where the NaN was born
        (ignored without ``keep_batch``).

        Reads the loss and the gradients now (on the device, no host sync), snapshots the
        parameters on detailed steps, and completes the record in the optimizer's step
        post-hook. A step the optimizer then skips (e.g. ``GradScaler`` on inf) is recorded
        without update statistics at the next ``observe``. With ``torch.amp.GradScaler``,
        call ``scaler.unscale_(optimizer)`` first so the gradients are in true units. Under
        ``torch.distributed`` every rank calls it (a recorded step is one collective).
        """
        if self._closed:
            raise RuntimeError("Monitor.observe() after close()")
        self._finish()
        s = self._step
        self._step += 1
        self.nan_watch.keep(s, batch)
        cheap = s % self.every == 0
        detail = self.state_every is not None and s % self.state_every == 0
        curv = self.curvature_every is not None and s % self.curvature_every == 0
        extra = self.model_probes.collect(s) if self.model_probes is not None else {}
        if not (cheap or detail or curv or extra):
            return
        grads = [local(p.grad.detach()) if p.grad is not None else None for _, p in self._params]
        dev = next((g.device for g in grads if g is not None), None)
        if dev is None:
            dev = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
        if loss is not None and not isinstance(loss, torch.Tensor):
            loss = float(loss)
        part = partials(StepTensors(loss, grads), self._rec.weights, dev)
        if self.nan_watch.keep_batch and self._rec.world == 1:  # opt-in: one flag read
            self._nan_check(s, part)
        host = {N.LR: inspect._as_float(self.optimizer.param_groups[0]["lr"])} if cheap else {}
        host.update(extra)
        w = self._rec.weights
        live = [i for i, g in enumerate(grads) if g is not None and w[i]]
        sec = self._secant.observe_parts(s, [self._params[i][1] for i in live],
                                         [grads[i] for i in live], device=dev)
        if sec is not None:  # curvature along the previous step's update (telemetry.secant)
            part.sums["secant"] = sec
        pending = {"step": s, "part": part, "dev": dev, "host": host, "grads": grads,
                   "curv": curv, "detail": None}
        if detail:  # a replica another rank counts (DDP) is not copied here
            w = self._rec.weights
            live = [i for i, (_, p) in enumerate(self._params) if w[i]]
            params = [local(self._params[i][1].detach()) for i in live]
            snaps = [self._snapshot(p) for p in params]
            if snaps:
                torch._foreach_copy_(snaps, params)
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            param_sq: list = [zero] * len(w)
            neg: list = [None] * len(w)
            for j, (i, n) in enumerate(zip(live, torch._foreach_norm(snaps) if snaps else [],
                                           strict=True)):
                param_sq[i], neg[i] = n.double().square(), snaps[j]
            pending["detail"] = (params, snaps, param_sq, neg)
        self._pending = pending

    def _nan_check(self, step: int, part: Any) -> None:
        """Replay a non-finite step once (keep_batch): the weights are still this step's."""
        flags = [torch.isfinite(part.sums["grad_sq"]).all()]
        if "loss" in part.ranks:
            flags.append(torch.isfinite(part.ranks["loss"]))
        self.nan_watch.check(step, torch.stack(flags), self.record_event)

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        """A persistent buffer like ``p`` for the parameters before the step (allocated once:
        the Monitor holds one extra copy of the parameters when ``state_every`` is set)."""
        buf = self._snaps.get(id(p))
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = self._snaps[id(p)] = torch.empty_like(
                p, memory_format=torch.contiguous_format, requires_grad=False
            )
        return buf

    def _adam_tensors(self, grads: list) -> list[AdamTensor | None]:
        """Adam's state per tensor, with the hyperparameters of the param groups as they are
        *now* (``load_state_dict`` replaces the group dicts)."""
        opt = self.optimizer
        own = callable(getattr(opt, "effective_step", None))
        out: list[AdamTensor | None] = [None] * len(self._params)
        for group in opt.param_groups:
            h = inspect.group_hyper(opt, group)
            if h.kind != "adam":
                continue
            for p in group["params"]:
                i = self._index.get(id(p))
                if i is None or grads[i] is None:
                    continue
                state = opt.state.get(p, {})
                v = inspect.second_moment(opt, p, h.amsgrad)
                if v is None or "step" not in state:
                    continue
                raw = state.get("exp_avg_sq") if h.amsgrad and "max_exp_avg_sq" in state else None
                eff = None
                if own:
                    try:
                        eff = local(inspect.effective_step(opt, p, group))
                    except (ValueError, OverflowError):  # e.g. a NaN step count: the
                        eff = None  # formula below turns it into NaN statistics, an event
                out[i] = AdamTensor(
                    grad=grads[i],
                    v=local(v),
                    step=state["step"],
                    hyper=h,
                    exp_avg_sq=local(raw) if raw is not None else None,
                    eff=eff,
                )
        host_steps(out)  # fused/capturable optimizers: one read for all step counters
        return out

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if pending is None:
            return
        self._secant.after_step(optimizer, [p for (_, p), w in zip(self._params,
                                                                    self._rec.weights,
                                                                    strict=True)
                                            if p.grad is not None and w])
        if pending["detail"] is not None:
            params, snaps, param_sq, neg = pending["detail"]
            part, dev, grads = pending["part"], pending["dev"], pending["grads"]
            with torch.no_grad():
                if snaps:
                    torch._foreach_sub_(snaps, params)  # theta_t - theta_t+1, in place
                update_partials(part, param_sq, neg, grads, self._rec.weights, dev)
                adam_partials(
                    part, self._adam_tensors(grads), self._rec.weights, self._rec.sample, dev,
                    self._rec.scratch,
                )
            pending["per_tensor"] = True
            pending["detail"] = None
        if pending["curv"]:
            pending["host"].update(self._curvature(pending["step"]))
            pending["curv"] = False
        self._finish()

    def _curvature(self, step: int) -> dict[str, float]:
        if self._probe is None:
            from stablestep.curvature import CurvatureProbe

            self._probe = CurvatureProbe([p for _, p in self._params], self.optimizer)
            if self._probe_state is not None:
                self._probe.load_state_dict(self._probe_state)
                self._probe_state = None
        res = self._probe(self.curvature_loss)
        if getattr(res, "error", None):  # the probe never raises: a failure is an event
            self.record_event(step, N.EVENT_CURVATURE, {"error": res.error, "backend": res.backend})
        return {k: float(v) for k, v in res.items()}

    def _finish(self) -> None:
        """Hand the pending step (if any) to the recorder."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending["detail"] is not None:  # the optimizer skipped the step: no update stats
            _, _, param_sq, _ = pending["detail"]
            pending["part"].sums["param_sq"] = torch.stack(
                [x * w for x, w in zip(param_sq, self._rec.weights, strict=True)]
            )
        self._rec.record_partials(
            pending["step"], pending["part"], pending["dev"], host=pending["host"],
            per_tensor=pending.get("per_tensor", False) or pending["detail"] is not None,
        )

    def device_partials(self) -> dict[str, torch.Tensor] | None:
        """What the latest :meth:`observe` read for the step about to be taken, still on
        the device (no host read): ``grad_sq`` (squared gradient norm per tensor, 1-d),
        ``loss`` (0-d, when ``observe`` was given one) and, on detailed steps, ``param_sq``
        (squared parameter norm per tensor, 1-d). ``None`` when that ``observe`` recorded
        nothing (``every`` > 1) or its step has been written already. The Guard reads its
        norms here instead of computing them a second time. Under torch.distributed these
        are this rank's own partial sums."""
        pending = self._pending
        if pending is None or pending.get("step") != self.step - 1:
            return None
        part = pending["part"]
        grad_sq = part.sums.get("grad_sq")
        if not isinstance(grad_sq, torch.Tensor):
            return None
        out = {"grad_sq": grad_sq}
        loss = part.ranks.get("loss")
        if isinstance(loss, torch.Tensor):
            out["loss"] = loss
        detail = pending["detail"]
        if detail is not None and detail[2]:
            out["param_sq"] = torch.stack(list(detail[2]))
        return out

    def record_event(self, step: int, kind: str, data: dict | None = None) -> None:
        """Record an event (e.g. the guard's ``EVENT_GUARD`` actions) in the run and sinks
        (on rank 0; a no-op on other ranks)."""
        self._rec.event(step, kind, data)

    # ------------------------------------------------------------ store & state
    def _run_config(self) -> dict[str, Any]:
        groups = self.optimizer.param_groups
        cfg: dict[str, Any] = {
            "optimizer": type(self.optimizer).__name__,
            "hyper": dataclasses.asdict(inspect.group_hyper(self.optimizer, groups[0])),
            "n_params": sum(p.numel() for _, p in self._params),
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for _, p in self._params}),
            "torch_version": torch.__version__,
            "started_at": utc_now(),
            "monitor": {
                **self.config.summary(),
                "quantile_sample": None if self._rec.sample.exact else self.config.quantile_sample,
                "secant_every": self._secant.every,
            },
        }
        if self._rec.world > 1:
            cfg["world_size"] = self._rec.world
        if len(groups) > 1:
            cfg["group_hypers"] = [
                dataclasses.asdict(inspect.group_hyper(self.optimizer, g)) for g in groups
            ]
        cfg.update(self.config.extra)
        return cfg

    def flush(self) -> None:
        """Read the buffered steps back (one host transfer) and write them to the store."""
        self._rec.flush()

    def read(self) -> Run:
        """Flush and return this run as a :class:`~stablestep.telemetry.store.Run` (rank 0)."""
        self._finish()
        self._rec.ensure_writer()
        self.flush()
        return open_run(self.store, self.run_name)

    def state_dict(self) -> dict[str, Any]:
        """State to resume this run: next step, run name, store, curvature probe state.

        Flushes the store first, so every step before the checkpoint is on disk.
        """
        self._finish()
        self.flush()
        probe = self._probe.state_dict() if self._probe is not None else self._probe_state
        return {
            "version": 1,
            "step": self._step,
            "run": self.run_name,
            "store": self.store,
            "curvature": probe,
            "secant": self._secant.state_dict(),
            "nan_origin": self.nan_watch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` (call before the first ``observe``)."""
        if self._rec.writer is not None or self._step != self.start_step:
            raise RuntimeError(
                "Monitor.load_state_dict() must be called before the first observe()"
            )
        if state.get("version") != 1:
            raise ValueError(f"unsupported Monitor state version: {state.get('version')!r}")
        self._step = int(state["step"])
        self._rec.resume_from = self._step
        self._rec.run_name = state["run"]
        self._probe_state = state.get("curvature")
        if state.get("secant") is not None:
            self._secant.load_state_dict(state["secant"])
        if state.get("nan_origin") is not None:
            self.nan_watch.load_state_dict(state["nan_origin"])

    def close(self) -> None:
        """Record any pending step, flush, detach from the optimizer and close sinks."""
        if self._closed:
            return
        self._finish()
        self._handle.remove()
        if self.model_probes is not None:
            self.model_probes.remove()
        self._rec.close()
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
