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
from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer

from stablestep.integrations._common import (
    GuardReport,
    default_run_name,
    guard_policy,
    make_parent,
    monitor_config,
    resolve_store,
)
from stablestep.telemetry.config import UNSET, MonitorConfig
from stablestep.telemetry.monitor import Monitor
from stablestep.telemetry.store import Run


class StablestepCallback(Callback):
    """Drive a :class:`stablestep.Monitor` from Lightning's hooks (no change to the module).

    ::

        import lightning as L
        from stablestep.integrations.lightning import StablestepCallback
        from stablestep.telemetry.config import MonitorConfig

        cb = StablestepCallback(run="lit-adam", config=MonitorConfig(state_every=20))
        trainer = L.Trainer(max_steps=1000, callbacks=[cb])
        trainer.fit(model, train_loader)
        # the store: <trainer.log_dir>/stablestep.db, e.g. lightning_logs/version_0/
        # then: stablestep diagnose lightning_logs/version_0/stablestep.db

    Where the store goes: ``store=`` if given (a file, or a directory to hold
    ``stablestep.db``); else ``<trainer.log_dir>/stablestep.db``, Lightning's own directory
    for the run (the logger's versioned directory, or ``default_root_dir`` without a
    logger); a run resumed from a checkpoint keeps the store it started in.

    The seatbelt: ``guard=GuardPolicy(...)`` (or ``guard=True`` for the default policy) adds
    a :class:`stablestep.guard.Guard`. Each action is an event of the run, a ``logging``
    line (the Guard's, or this callback's on ``stablestep.integrations``), and values
    logged through Lightning (``pl_module.log``: ``stablestep/guard_skip``, ``_clip``,
    ``_rollback``, ``_adapt``, ``_restore`` (totals) and ``stablestep/guard_lr_scale``) at
    the first step and whenever they change, so TensorBoard/CSV loggers show them next to
    the loss.

    One record per optimizer step of the watched optimizer (``trainer.optimizers[optimizer]``),
    steps counted from 0 (``trainer.global_step`` before the step). The loss recorded for a
    step is the loss ``training_step`` returned, averaged over the micro-batches of an
    accumulated step (Lightning divides each by ``accumulate_grad_batches`` before
    ``backward``; their sum is recorded). What the Monitor records, and how non-finite
    values become events, is documented in :class:`stablestep.Monitor`.

    Under DDP/FSDP (several processes) every rank builds the Monitor (its statistics are
    reduced over ranks, collectives included); only rank 0 writes the store (its run name
    and store path are the ones used, and it saves the checkpoints), and the Lightning
    logging of guard actions is rank 0's (the guard's decisions are the same on every rank).

    The callback's :meth:`state_dict` goes into Lightning's checkpoints, so
    ``trainer.fit(model, ckpt_path=...)`` continues the same run with no duplicated or
    missing step; several ``fit`` calls with one callback also continue one run.

    Args:
        config: a :class:`~stablestep.telemetry.config.MonitorConfig` (or a dict of run
            config extras); ``settings`` (its field names as keywords: ``every=``,
            ``state_every=``, ``sinks=``...) win over its fields.
        store: the run store (default: in ``trainer.log_dir``, above).
        run: the run's name; a name already in the store starts a new run with a visible
            suffix (:attr:`run_name` says which) unless ``overwrite=True``.
        overwrite: replace a stored run of the same name.
        curvature_loss: ``fn(pl_module) -> loss tensor`` on a fixed probe batch, with
            ``curvature_every=`` given as a keyword next to it (a ``MonitorConfig`` with
            ``curvature_every`` needs its own zero-argument ``curvature_loss``); also given
            to the guard, which uses it to compute eps and lr remedies.
        optimizer: index into ``trainer.optimizers`` of the optimizer to watch.
        guard: ``None`` (off), ``True`` (default policy) or a ``GuardPolicy``.
    """

    def __init__(
        self,
        *,
        config: MonitorConfig | dict[str, Any] | None = None,
        store: str | os.PathLike | None = None,
        run: str | None = None,
        overwrite: bool = UNSET,
        curvature_loss: Callable[[LightningModule], torch.Tensor] | None = None,
        optimizer: int = 0,
        guard: Any = None,
        **settings: Any,
    ):
        if curvature_loss is not None and not callable(curvature_loss):
            raise ValueError("Invalid curvature_loss: not callable (fn(pl_module) -> loss)")
        self._module: LightningModule | None = None
        fn = curvature_loss
        probe = None if fn is None else (lambda: fn(self._module))
        if probe is not None:
            settings["curvature_loss"] = probe
        self.config = monitor_config(config, overwrite=overwrite, **settings)
        if not isinstance(optimizer, int) or isinstance(optimizer, bool) or optimizer < 0:
            raise ValueError(f"Invalid optimizer: {optimizer!r} (an index into trainer.optimizers)")
        self._policy = guard_policy(guard)
        self.guard: Any = None
        self._store_arg = store
        self.store: str | None = None if store is None else resolve_store(store, ".")
        self.run_name = run or default_run_name()
        self.optimizer_index = optimizer
        self.monitor: Monitor | None = None
        self._state: dict[str, Any] | None = None  # to continue at the next fit
        self._loss: torch.Tensor | None = None
        self._batches: list[tuple[Any, int]] = []  # keep_batch: this step's micro-batches
        self._report = GuardReport()
        self._logged: dict[str, float] | None = None

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
        self._module = pl_module
        # log_dir is a collective (rank 0's answer on every rank); only rank 0 writes
        if self._state is not None and self._store_arg is None:
            self.store = self._state["monitor"].get("store") or self.store
        if self.store is None:
            self.store = resolve_store(None, trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            make_parent(self.store)
        config = self.config
        if self._state is not None:  # resuming continues the run: nothing to overwrite
            config = config.replace(overwrite=False)
        self.monitor = Monitor(pl_module, opt, store=self.store, run=self.run_name, config=config)
        if self._state is not None:
            self.monitor.load_state_dict(self._state["monitor"])
        if self._policy is not None:
            from stablestep.guard import Guard

            self.guard = Guard(
                pl_module,
                opt,
                policy=self._policy,
                monitor=self.monitor,
                curvature_loss=self.config.curvature_loss,
            )
            if self._state is not None and self._state.get("guard") is not None:
                self.guard.load_state_dict(self._state["guard"])
            self._report.attach(self.guard)
        self._loss = None
        self._batches = []
        self._logged = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """keep_batch: keep a reference to the batch (on its device) until the step is taken;
        at most ``accumulate_grad_batches`` of them."""
        if self.config.keep_batch:
            self._batches.append((batch, batch_idx))
            del self._batches[:-max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))]

    def _batch(self, pl_module: LightningModule) -> Callable[[], torch.Tensor] | None:
        """keep_batch: a closure re-running ``training_step`` on this step's micro-batches
        and returning their summed loss (for the NaN-origin replay)."""
        kept, self._batches = self._batches, []
        if not kept:
            return None

        def replay() -> torch.Tensor:
            losses = []
            for batch, idx in kept:
                out = pl_module.training_step(batch, idx)
                losses.append(out["loss"] if isinstance(out, dict) else out)
            return torch.stack([x.reshape(()) for x in losses]).sum()

        return replay

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
        self.monitor.observe(loss, batch=self._batch(pl_module))
        if self.monitor.run_name != self.run_name:  # the store suffixed a taken name
            self.run_name = self.monitor.run_name
        if self.guard is None:
            return
        if not self.guard.check(loss if loss is not None else 0.0):
            for group in self.monitor.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # skipped: torch.optim leaves p and its state alone
        self._report.new(self.guard)
        values = self._report.values(self.guard)
        if values != self._logged:  # first step and every change: a step plot per action
            self._logged = values
            for key, value in values.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True)

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
            self.run_name = self.monitor.run_name
            self.monitor = None
        if self.guard is not None:
            self._report.detach()
            self.guard.close()

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state (next step, run name, store, curvature probe) and the guard's
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
        if self.store is None:
            raise RuntimeError("nothing recorded yet: the store is chosen when fit() starts")
        from stablestep.telemetry.store import open_run

        return open_run(self.store, self.run_name)
