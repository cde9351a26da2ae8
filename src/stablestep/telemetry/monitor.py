"""``stablestep.Monitor``: per-step telemetry of any torch optimizer into a run store."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stablestep.optim import inspect
from stablestep.telemetry import names as N
from stablestep.telemetry._common import check_every, default_run_name, utc_now
from stablestep.telemetry.probes import (
    CoordinateSample,
    Scratch,
    adam_state_stats,
    stack_scalars,
    update_stats,
)
from stablestep.telemetry.store import Run, RunWriter, open_run

_RESERVED = ("optimizer", "hyper", "n_params", "torch_version", "started_at", "monitor")


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

    * every ``every`` steps (default 1, cheap: one fused norm over the gradients and one
      host sync): ``loss``, ``lr`` (group 0), ``grad_norm``, ``grad_nonfinite``;
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
      within noise: ``benchmarks/secant.py``);
    * every ``curvature_every`` steps when ``curvature_loss`` (a closure returning the loss
      on a fixed probe batch) is given: the metrics of
      ``stablestep.curvature.CurvatureProbe(params, optimizer)(curvature_loss)``.

    A NaN/Inf loss, gradient or statistic is never stored as a number: the value is
    missing and an event of kind ``non-finite`` says what was non-finite (``what``:
    ``"loss"``, ``"grad"`` and/or metric names; ``tensors``: non-finite gradient entries
    per tensor). Such an event is flushed to the store at once.

    Writes are buffered and flushed every ``flush_every`` recorded steps, every
    ``flush_seconds`` seconds, on :meth:`state_dict` and on :meth:`close`. Steps are
    counted by :meth:`observe` calls from 0. Resume a run with
    ``monitor.load_state_dict(sd)`` before the first ``observe``: the run continues
    under the same name, and anything stored at or after the checkpoint's step (an
    abandoned continuation) is replaced, so no step is duplicated or missing.

    Args:
        model: the ``torch.nn.Module`` whose parameters give tensor names (or ``None``:
            names ``param<i>``).
        optimizer: the ``torch.optim.Optimizer`` to watch.
        store: path of the SQLite run store (created if needed; several runs per file).
        run: the run's name in the store (default: ``run-<UTC time>-<random>``).
        config: extra JSON-serialisable entries for ``Run.config`` (e.g. ``scenario``).
        sinks: objects with ``write(step, metrics)``, ``event(step, kind, data)``,
            ``close()`` (e.g. :class:`stablestep.telemetry.TensorBoardSink`).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        *,
        store: str | os.PathLike = "stablestep.db",
        run: str | None = None,
        config: dict[str, Any] | None = None,
        every: int = 1,
        state_every: int | None = 10,
        top_k: int = 3,
        quantile_sample: int = 65536,
        flush_every: int = 100,
        flush_seconds: float = 10.0,
        curvature_every: int | None = None,
        curvature_loss: Callable[[], torch.Tensor] | None = None,
        secant_every: int | None = 10,
        sinks: Sequence[Any] = (),
        model_probes: Any = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        check_every("every", every)
        check_every("state_every", state_every, optional=True)
        check_every("flush_every", flush_every)
        check_every("curvature_every", curvature_every, optional=True)
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"Invalid top_k: {top_k!r} (an int >= 0)")
        if not flush_seconds > 0:
            raise ValueError(f"Invalid flush_seconds: {flush_seconds!r} (> 0)")
        if (curvature_every is None) != (curvature_loss is None):
            raise ValueError("curvature_every and curvature_loss must be given together")
        for key in config or {}:
            if key in _RESERVED:
                raise ValueError(f"config key {key!r} is reserved for the Monitor")
        self.model = model
        self.optimizer = optimizer
        self.store = os.fspath(store)
        self.run_name = run or default_run_name()
        self.every, self.state_every, self.top_k = every, state_every, top_k
        self.flush_every, self.flush_seconds = flush_every, float(flush_seconds)
        self.curvature_every, self.curvature_loss = curvature_every, curvature_loss
        self.sinks = list(sinks)
        self._extra = dict(config or {})
        by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._params: list[tuple[str, torch.Tensor, dict]] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = by_id.get(id(p), f"param{len(self._params)}")
                self._params.append((name, p, group))
        self._sample = CoordinateSample([p.numel() for _, p, _ in self._params], quantile_sample)
        self._step = 0
        self._resume_from: int | None = None
        self._writer: RunWriter | None = None
        self._pending: dict | None = None
        self._since_flush = 0
        self._last_flush = time.monotonic()
        self._snaps: dict[int, torch.Tensor] = {}
        self._scratch = Scratch()
        self._probe: Any = None
        self._probe_state: dict | None = None
        self._closed = False
        from stablestep.telemetry.secant import SecantTracker  # free curvature (#11)

        check_every("secant_every", secant_every, optional=True)
        self._secant = SecantTracker(secant_every)
        self._handle = optimizer.register_step_post_hook(self._post_step)
        self.model_probes = None
        if model_probes is not None:
            self.attach_model_probes(model_probes)

    def attach_model_probes(self, probes: Any) -> None:
        """Record ``probes.collect(step)`` (e.g. :class:`~stablestep.telemetry.model_probes.
        ModelProbes`) at every ``observe``; it follows ``state_every`` unless it has a cadence."""
        self.model_probes = probes
        probes.bind(self.state_every or self.every)

    # ----------------------------------------------------------------- the loop
    @property
    def step(self) -> int:
        """Index of the next step :meth:`observe` will record."""
        return self._step

    def observe(self, loss: torch.Tensor | float | None = None) -> None:
        """Record step ``self.step``: call after ``loss.backward()``, before ``optimizer.step()``.

        Reads the loss and the gradients now, snapshots the parameters on detailed
        steps, and completes the record in the optimizer's step post-hook. A step the
        optimizer then skips (e.g. ``GradScaler`` on inf) is recorded without update
        statistics at the next ``observe``. With ``torch.amp.GradScaler``, call
        ``scaler.unscale_(optimizer)`` first so the gradients are in true units.
        """
        if self._closed:
            raise RuntimeError("Monitor.observe() after close()")
        self._finish()
        s = self._step
        self._step += 1
        cheap = s % self.every == 0
        detail = self.state_every is not None and s % self.state_every == 0
        curv = self.curvature_every is not None and s % self.curvature_every == 0
        extra = self.model_probes.collect(s) if self.model_probes is not None else {}
        if not (cheap or detail or curv or extra):
            return
        self._ensure_writer()
        live = [(n, p) for n, p, _ in self._params if p.grad is not None]
        grads = [p.grad.detach() for _, p in live]
        norms = torch._foreach_norm(grads) if grads else []
        total = stack_scalars(norms).square().sum().sqrt() if norms else None
        loss_t = loss.detach().double().reshape(()) if isinstance(loss, torch.Tensor) else None
        if loss_t is not None and total is not None:
            loss_t = loss_t.to(total.device)
        scalars = [x for x in (loss_t, total) if x is not None]
        host = iter(torch.stack(scalars).tolist() if scalars else [])  # the one host sync
        metrics: dict[str, float] = dict(extra)
        if loss_t is not None:
            metrics[N.LOSS] = next(host)
        elif loss is not None:
            metrics[N.LOSS] = float(loss)
        g_norm = next(host) if total is not None else None
        bad: dict[str, int] = {}
        if g_norm is not None and not math.isfinite(g_norm):
            for (name, _), g, nrm in zip(live, grads, norms, strict=True):
                if not math.isfinite(float(nrm)):
                    cnt = g.numel() - int(torch.count_nonzero(torch.isfinite(g)))
                    if cnt:
                        bad[name] = cnt
        if cheap:
            metrics[N.LR] = inspect._as_float(self.optimizer.param_groups[0]["lr"])
            if g_norm is not None:
                metrics[N.GRAD_NORM] = g_norm
                metrics[N.GRAD_NONFINITE] = float(sum(bad.values()))
        sec = self._secant.observe(s, [p.detach() for _, p in live], grads)
        if sec is not None:  # curvature along the previous step's update (telemetry.secant)
            metrics[N.SECANT], metrics[N.SECANT_COS] = sec["q"], sec["cos"]
        pending = {"step": s, "metrics": metrics, "bad": bad, "curv": curv, "detail": None}
        if detail and grads:
            tnames = [n for n, _ in live]
            for name, nrm in zip(tnames, torch.stack(norms).tolist(), strict=True):
                metrics[f"{N.GRAD_NORM}/{name}"] = nrm
            params = [p.detach() for _, p in live]
            snaps = [self._snapshot(p) for _, p in live]
            torch._foreach_copy_(snaps, params)
            pending["detail"] = (tnames, params, snaps, torch._foreach_norm(snaps), norms, grads)
        self._pending = pending

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        """A persistent buffer like ``p`` for the parameters before the step (allocated once:
        the Monitor holds one extra copy of the parameters when ``state_every`` is set)."""
        buf = self._snaps.get(id(p))
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = self._snaps[id(p)] = torch.empty_like(
                p, memory_format=torch.contiguous_format, requires_grad=False
            )
        return buf

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if pending is None:
            return
        self._secant.after_step(optimizer, [p for _, p, _ in self._params if p.grad is not None])
        metrics = pending["metrics"]
        if pending["detail"] is not None:
            tnames, params, snaps, p_norms, g_norms, grads = pending["detail"]
            with torch.no_grad():
                torch._foreach_sub_(snaps, params)  # theta_t - theta_t+1, in place
                metrics.update(
                    update_stats(tnames, snaps, p_norms, g_norms, grads, top_k=self.top_k)
                )
                metrics.update(
                    adam_state_stats(
                        optimizer,
                        self._params,
                        self._sample,
                        top_k=self.top_k,
                        scratch=self._scratch,
                    )
                )
            pending["detail"] = None
        if pending["curv"]:
            metrics.update(self._curvature(pending["step"]))
        self._finish()

    def _curvature(self, step: int) -> dict[str, float]:
        if self._probe is None:
            from stablestep.curvature import CurvatureProbe

            self._probe = CurvatureProbe([p for _, p, _ in self._params], self.optimizer)
            if self._probe_state is not None:
                self._probe.load_state_dict(self._probe_state)
                self._probe_state = None
        res = self._probe(self.curvature_loss)
        if getattr(res, "error", None):  # the probe never raises: a failure is an event
            self.record_event(step, N.EVENT_CURVATURE, {"error": res.error, "backend": res.backend})
        return {k: float(v) for k, v in res.items()}

    def _finish(self) -> None:
        """Emit the pending step (if any) to the store and sinks."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, metrics, bad = pending["step"], pending["metrics"], pending["bad"]
        what = [k for k, v in metrics.items() if not math.isfinite(v)]
        if N.LOSS in what:
            what[what.index(N.LOSS)] = "loss"
        if bad:
            what.insert(0, "grad")
        writer = self._ensure_writer()
        writer.add(step, metrics)
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for sink in self.sinks:
            sink.write(step, finite)
        if what:
            self.record_event(step, N.EVENT_NONFINITE, {"what": what, "tensors": bad})
            self.flush()
        self._since_flush += 1
        if (
            self._since_flush >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def record_event(self, step: int, kind: str, data: dict | None = None) -> None:
        """Record an event (e.g. the guard's ``EVENT_GUARD`` actions) in the run and sinks."""
        self._ensure_writer().event(step, kind, data)
        for sink in self.sinks:
            sink.event(step, kind, data or {})

    # ------------------------------------------------------------ store & state
    def _run_config(self) -> dict[str, Any]:
        groups = self.optimizer.param_groups
        cfg: dict[str, Any] = {
            "optimizer": type(self.optimizer).__name__,
            "hyper": dataclasses.asdict(inspect.group_hyper(self.optimizer, groups[0])),
            "n_params": sum(p.numel() for _, p, _ in self._params),
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for _, p, _ in self._params}),
            "torch_version": torch.__version__,
            "started_at": utc_now(),
            "monitor": {
                "every": self.every,
                "state_every": self.state_every,
                "curvature_every": self.curvature_every,
                "secant_every": self._secant.every,
                "top_k": self.top_k,
                "quantile_sample": None
                if self._sample.exact
                else len(torch.cat([i for i in self._sample.index if i is not None])),
            },
        }
        if len(groups) > 1:
            cfg["group_hypers"] = [
                dataclasses.asdict(inspect.group_hyper(self.optimizer, g)) for g in groups
            ]
        cfg.update(self._extra)
        return cfg

    def _ensure_writer(self) -> RunWriter:
        if self._writer is None:
            self._writer = RunWriter(
                self.store, self.run_name, config=self._run_config(), resume_from=self._resume_from
            )
        return self._writer

    def flush(self) -> None:
        """Write buffered metrics and events to the store now."""
        if self._writer is not None:
            self._writer.flush()
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()
        self._since_flush = 0
        self._last_flush = time.monotonic()

    def read(self) -> Run:
        """Flush and return this run as a :class:`~stablestep.telemetry.store.Run`."""
        self._finish()
        self._ensure_writer()
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` (call before the first ``observe``)."""
        if self._writer is not None or self._step != 0:
            raise RuntimeError(
                "Monitor.load_state_dict() must be called before the first observe()"
            )
        if state.get("version") != 1:
            raise ValueError(f"unsupported Monitor state version: {state.get('version')!r}")
        self._step = int(state["step"])
        self._resume_from = self._step
        self.run_name = state["run"]
        self._probe_state = state.get("curvature")
        if state.get("secant") is not None:
            self._secant.load_state_dict(state["secant"])

    def close(self) -> None:
        """Record any pending step, flush, detach from the optimizer and close sinks."""
        if self._closed:
            return
        self._finish()
        self._handle.remove()
        if self.model_probes is not None:
            self.model_probes.remove()
        if self._writer is not None:
            self._writer.close()
        for sink in self.sinks:
            sink.close()
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
