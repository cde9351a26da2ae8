"""Lightning callback: a :class:`stablestep.Monitor` on the LightningModule and its optimizer.

Lightning runs ``training_step`` and ``backward`` inside ``optimizer.step(closure)`` and
calls ``on_before_optimizer_step`` after the closure, once per optimizer step (after
gradient accumulation, after AMP unscaling, before gradient clipping). That is exactly
where :meth:`stablestep.Monitor.observe` belongs; the Monitor's step post-hook then records
the update. Works with ``lightning`` 2.x (``lightning.pytorch``) or ``pytorch_lightning``.

With ``guard=`` a :class:`stablestep.guard.Guard` decides each step right after the
Monitor has seen it; a step the guard refuses (non-finite, outlier, rolled back) is skipped
by dropping the gradients (``p.grad = None``): torch.optim's optimizers leave a parameter
without a gradient untouched, moments and step count included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer

from stablestep.integrations._common import check_every, default_run_name, guard_policy
from stablestep.telemetry.monitor import Monitor
from stablestep.telemetry.store import Run


class StablestepCallback(Callback):
    """Drive a :class:`stablestep.Monitor` from Lightning's hooks (no change to the module).

    ::

        import lightning as L
        from stablestep.integrations.lightning import StablestepCallback

        cb = StablestepCallback(store="runs.db", run="lit-adam")
        trainer = L.Trainer(max_steps=1000, callbacks=[cb])
        trainer.fit(model, train_loader)
        # then: stablestep diagnose runs.db   /   stablestep report runs.db -o r.html

    The seatbelt: ``StablestepCallback(..., guard=GuardPolicy(...))`` (or ``guard=True`` for
    the default policy) adds a :class:`stablestep.guard.Guard`; its actions are events of
    the run and :attr:`guard` ``.records``.

    One record per optimizer step of the watched optimizer (``trainer.optimizers[optimizer]``),
    steps counted from 0. The loss recorded for a step is the loss ``training_step``
    returned, averaged over the micro-batches of an accumulated step (Lightning divides
    each by ``accumulate_grad_batches`` before ``backward``; their sum is recorded). What
    the Monitor records, and how non-finite values become events, is documented in
    :class:`stablestep.Monitor`.

    The callback's :meth:`state_dict` goes into Lightning's checkpoints, so
    ``trainer.fit(model, ckpt_path=...)`` continues the same run with no duplicated or
    missing step; several ``fit`` calls with one callback also continue one run.

    Args:
        store, run, config, every, state_every, top_k, quantile_sample, flush_every,
            flush_seconds, sinks: as for :class:`stablestep.Monitor`.
        curvature_every: probe the curvature every this many steps (needs
            ``curvature_loss``).
        curvature_loss: ``fn(pl_module) -> loss tensor`` on a fixed probe batch (also
            given to the guard, which uses it to compute eps and lr remedies).
        optimizer: index into ``trainer.optimizers`` of the optimizer to watch.
        guard: ``None`` (off), ``True`` (default policy) or a ``GuardPolicy``.
    """

    def __init__(
        self,
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
        curvature_loss: Callable[[LightningModule], torch.Tensor] | None = None,
        sinks: Sequence[Any] = (),
        optimizer: int = 0,
        guard: Any = None,
    ):
        check_every("every", every)
        check_every("state_every", state_every, optional=True)
        check_every("flush_every", flush_every)
        check_every("curvature_every", curvature_every, optional=True)
        if (curvature_every is None) != (curvature_loss is None):
            raise ValueError("curvature_every and curvature_loss must be given together")
        if not isinstance(optimizer, int) or isinstance(optimizer, bool) or optimizer < 0:
            raise ValueError(f"Invalid optimizer: {optimizer!r} (an index into trainer.optimizers)")
        self._policy = guard_policy(guard)
        self.guard: Any = None
        self.store = os.fspath(store)
        self.run_name = run or default_run_name()
        self.optimizer_index = optimizer
        self._curvature_loss = curvature_loss
        self._kwargs: dict[str, Any] = {
            "config": config,
            "every": every,
            "state_every": state_every,
            "top_k": top_k,
            "quantile_sample": quantile_sample,
            "flush_every": flush_every,
            "flush_seconds": flush_seconds,
            "curvature_every": curvature_every,
            "sinks": sinks,
        }
        self.monitor: Monitor | None = None
        self._state: dict[str, Any] | None = None  # to continue at the next fit
        self._loss: torch.Tensor | None = None

    # -------------------------------------------------------------- lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach a Monitor to the watched optimizer (continuing a saved run if any)."""
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"Invalid optimizer: {self.optimizer_index} (the trainer has "
                f"{len(trainer.optimizers)} optimizers)"
            )
        opt = trainer.optimizers[self.optimizer_index]
        opt = getattr(opt, "optimizer", opt)  # a LightningOptimizer wraps the torch one
        fn = self._curvature_loss
        self.monitor = Monitor(
            pl_module,
            opt,
            store=self.store,
            run=self.run_name,
            curvature_loss=None if fn is None else (lambda: fn(pl_module)),
            **self._kwargs,
        )
        if self._state is not None:
            self.monitor.load_state_dict(self._state["monitor"])
        if self._policy is not None:
            from stablestep.guard import Guard

            self.guard = Guard(
                pl_module,
                opt,
                policy=self._policy,
                monitor=self.monitor,
                curvature_loss=None if fn is None else (lambda: fn(pl_module)),
            )
            if self._state is not None and self._state.get("guard") is not None:
                self.guard.load_state_dict(self._state["guard"])
        self._loss = None

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        """Add up the (accumulation-normalised) loss of this optimizer step."""
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        """``monitor.observe(loss)``: gradients are complete, the step is next."""
        if self.monitor is None or getattr(optimizer, "optimizer", optimizer) is not (
            self.monitor.optimizer
        ):
            return
        loss, self._loss = self._loss, None
        self.monitor.observe(loss)
        if self.guard is not None and not self.guard.check(loss if loss is not None else 0.0):
            for group in self.monitor.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # skipped: torch.optim leaves p and its state alone

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Flush and detach; a later ``fit`` continues the same run."""
        self._close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Flush what was recorded before the exception (a NaN stop, an interrupt)."""
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self._state = self.state_dict()
            self.monitor.close()
            self.monitor = None
        if self.guard is not None:
            self.guard.close()

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state (next step, run name, curvature probe) and the guard's
        (counters, detectors, snapshots): saved in Lightning's checkpoints."""
        if self.monitor is not None:
            guard = self.guard.state_dict() if self.guard is not None else None
            return {"version": 1, "monitor": self.monitor.state_dict(), "guard": guard}
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the run saved in a checkpoint (Lightning calls this on ``ckpt_path``)."""
        if not state_dict:
            return
        if self.monitor is not None:
            raise RuntimeError("load_state_dict() must be called before fit() starts recording")
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported callback state version: {state_dict.get('version')!r}")
        self._state = dict(state_dict)
        self.run_name = self._state["monitor"]["run"]

    def read(self) -> Run:
        """Flush and return the run as a :class:`~stablestep.telemetry.store.Run`."""
        if self.monitor is not None:
            return self.monitor.read()
        from stablestep.telemetry.store import open_run

        return open_run(self.store, self.run_name)
