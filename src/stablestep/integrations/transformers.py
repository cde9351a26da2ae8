"""Hugging Face ``Trainer`` callback: a :class:`stablestep.Monitor` on the Trainer's model
and optimizer.

The Trainer calls ``on_pre_optimizer_step`` after the last micro-batch's ``backward`` and
after its gradient clipping, right before ``optimizer.step()``: there the callback calls
:meth:`stablestep.Monitor.observe`, and the Monitor's step post-hook records the update.
The Trainer does not hand the loss to callbacks; a forward hook on the model reads the
``loss`` of each training forward pass (HF models return it when given ``labels``).

With ``guard=`` a :class:`stablestep.guard.Guard` decides each step after the Monitor; a
refused step is skipped by dropping the gradients (``p.grad = None``), which torch.optim's
optimizers leave untouched (the Trainer's scheduler still steps).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

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
from stablestep.telemetry.store import Run, open_run

STATE_FILE = "stablestep_callback.pt"
"""The callback's state inside each of the Trainer's ``checkpoint-<step>`` directories."""


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # AcceleratedOptimizer subclasses Optimizer, holds none

    return optimizer


def log_dir(args: Any) -> str:
    """The Trainer's log directory: ``args.logging_dir`` where the Trainer has one
    (transformers 4), else ``args.output_dir`` (transformers 5 dropped ``logging_dir``; its
    TensorBoard callback writes under ``output_dir/runs/``)."""
    return getattr(args, "logging_dir", None) or args.output_dir


class StablestepCallback(TrainerCallback):
    """Record the Trainer's optimizer step by step in a stablestep run store.

    ::

        from transformers import Trainer, TrainingArguments
        from stablestep.integrations.transformers import StablestepCallback
        from stablestep.telemetry.config import MonitorConfig

        cb = StablestepCallback(run="hf-adamw", config=MonitorConfig(state_every=20))
        trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=1000),
                          train_dataset=ds, callbacks=[cb])
        trainer.train()
        # the store: out/stablestep.db; then: stablestep diagnose out/stablestep.db

    Where the store goes: ``store=`` if given (a file, or a directory to hold
    ``stablestep.db``); else ``<log dir>/stablestep.db`` with the Trainer's log directory
    (:func:`log_dir`: ``args.logging_dir`` on transformers 4, ``args.output_dir`` on 5).

    Steps are the Trainer's ``state.global_step`` after the step (1, 2, ...), the step the
    Trainer's own logs and ``trainer_state.json`` show. The loss of a step is the loss the
    Trainer optimised and logs, read from the ``loss`` the model returned on each
    micro-batch: their sum when the model normalised by the step's item count
    (``num_items_in_batch``, scaled by the number of processes as the Trainer does), else
    their mean; under several processes the mean over processes. A model output without
    ``loss`` (custom ``compute_loss``) leaves the loss out. Gradients are
    read *after* the Trainer's clipping (``max_grad_norm``, default 1.0): set
    ``max_grad_norm=0`` to record raw gradient norms; under fp16 ``GradScaler`` the gradients
    are only unscaled when clipping is on. Everything else is :class:`stablestep.Monitor`'s.

    Resuming (``trainer.train(resume_from_checkpoint=...)``) continues the run at the
    checkpoint's step: steps stored after it are replaced. The callback saves its state
    (the run's actual name and store, the guard's counters, detectors and snapshots) as
    ``stablestep_callback.pt`` in each ``checkpoint-<step>`` directory and reads it back
    on resume; without that file it continues the run named ``run``.

    The seatbelt: ``guard=GuardPolicy(...)`` (or ``True``) adds a
    :class:`stablestep.guard.Guard` (:attr:`guard`). Each action is an event of the run, a
    ``logging`` line (the Guard's, or this callback's on ``stablestep.integrations``), and,
    at that step (the callback asks the Trainer to log), the values
    ``stablestep/guard_skip``, ``_clip``, ``_rollback``, ``_adapt``, ``_restore`` (totals)
    and ``stablestep/guard_lr_scale`` in ``logs`` and ``trainer.state.log_history``.
    Callbacks the Trainer calls before this one (its reporting integrations: TensorBoard,
    W&B) have already sent that ``logs``; to have them send these values too, put this
    callback first: ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(cb))``.

    Under ``torch.distributed`` every process builds the Monitor (its statistics are reduced
    over ranks); only rank 0 writes the store (under its run name) and the checkpoint file.

    Args:
        config: a :class:`~stablestep.telemetry.config.MonitorConfig` (or a dict of run
            config extras); ``settings`` (its field names as keywords: ``every=``,
            ``state_every=``, ``sinks=``...) win over its fields.
        store: the run store (default: in the Trainer's log directory, above).
        run: the run's name; a name already in the store starts a new run with a visible
            suffix (:attr:`run_name` says which) unless ``overwrite=True``.
        overwrite: replace a stored run of the same name.
        guard: ``None`` (off), ``True`` (default policy) or a ``GuardPolicy``.
    """

    def __init__(
        self,
        *,
        config: MonitorConfig | dict[str, Any] | None = None,
        store: str | os.PathLike | None = None,
        run: str | None = None,
        overwrite: bool = UNSET,
        guard: Any = None,
        **settings: Any,
    ):
        self.config = monitor_config(config, overwrite=overwrite, **settings)
        self._policy = guard_policy(guard)
        self.guard: Any = None
        self._store_arg = store
        self.store: str | None = None if store is None else resolve_store(store, ".")
        self.run_name = run or default_run_name()
        self.monitor: Monitor | None = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._inputs: list[tuple[Any, Any, dict[str, Any]]] = []  # keep_batch: the calls
        self._replaying = False
        self._normalized = False
        self._report = GuardReport()
        self._pending_log = False

    def _capture(
        self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._replaying or not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # given num_items_in_batch, the model divided its loss sum by the step's item count
            # (all micro-batches; all processes with average_tokens_across_devices): a share
            self._normalized = kwargs.get("num_items_in_batch") is not None
            self._losses.append(loss.detach().reshape(()))
            if self.config.keep_batch:  # a reference only, dropped at the next step
                self._inputs.append((module, args, kwargs))

    def _batch(self) -> Any:
        """keep_batch: a closure re-running this step's micro-batch forwards and returning
        the step's loss as :meth:`_step_loss` forms it (for the NaN-origin replay)."""
        inputs, self._inputs = self._inputs, []
        if not (self.config.keep_batch and inputs):
            return None
        normalized = self._normalized

        def replay() -> torch.Tensor:
            self._replaying = True  # the replay's forwards are not this step's losses
            try:
                outs = [m(*a, **kw) for m, a, kw in inputs]
            finally:
                self._replaying = False
            losses = torch.stack([(o.get("loss") if isinstance(o, Mapping) else o.loss)
                                  .reshape(()) for o in outs])
            return losses.sum() if normalized else losses.mean()

        return replay

    def _step_loss(self, args: Any) -> torch.Tensor | None:
        """This process's loss of the step (the Monitor averages it over processes).

        Micro-batch losses the model normalised by ``num_items_in_batch`` (transformers >=
        4.46 passes it to models that accept it) are shares of the step's item mean: their
        sum, times the number of processes when the count was taken over all of them
        (``average_tokens_across_devices``), as the Trainer itself scales it. Otherwise each
        is a micro-batch mean, and the step's loss is their mean."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        stacked = torch.stack(losses).double()
        if not self._normalized:
            return stacked.mean()
        scale = getattr(args, "world_size", 1) if getattr(
            args, "average_tokens_across_devices", False
        ) else 1
        return stacked.sum() * scale

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach a Monitor to the Trainer's optimizer (at the checkpoint's step on resume)."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("StablestepCallback needs the Trainer's model and optimizer")
        saved = self._saved_state(args, state) if state.global_step > 0 else None
        if saved is not None:
            self.run_name = saved["monitor"]["run"]
            if self._store_arg is None:
                self.store = saved["monitor"].get("store") or self.store
        if self.store is None:
            self.store = resolve_store(None, log_dir(args))
        if state.is_world_process_zero:
            make_parent(self.store)
        config = self.config
        if state.global_step > 0:  # resuming continues the run: nothing to overwrite
            config = config.replace(overwrite=False)
        next_step = int(state.global_step) + 1  # the step the Trainer's logs will show
        self.monitor = Monitor(
            model, _unwrap(optimizer), store=self.store, run=self.run_name, config=config,
            start_step=next_step,
        )
        if state.global_step > 0:
            mstate = saved["monitor"] if saved is not None else {
                "version": 1, "run": self.run_name, "store": self.store, "curvature": None}
            self.monitor.load_state_dict({**mstate, "step": next_step})
        if self._policy is not None:
            from stablestep.guard import Guard

            self.guard = Guard(
                model,
                self.monitor.optimizer,
                policy=self._policy,
                monitor=self.monitor,
                curvature_loss=self.config.curvature_loss,
                start_step=next_step,
            )
            if saved is not None and saved.get("guard") is not None:
                self.guard.load_state_dict(saved["guard"])
            self._report.attach(self.guard)
        self._hook = model.register_forward_hook(self._capture, with_kwargs=True)
        self._losses = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``monitor.observe(loss)``: the gradients of this step are complete."""
        if self.monitor is None:
            return
        batch = self._batch()
        loss = self._step_loss(args)
        self.monitor.observe(loss, batch=batch)
        self.run_name = self.monitor.run_name  # the store may have suffixed a taken name
        if self.guard is not None:
            if not self.guard.check(loss if loss is not None else 0.0):
                for group in self.monitor.optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None  # skipped: torch.optim leaves p and its state alone
            if self._report.new(self.guard):
                self._pending_log = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Ask the Trainer to log at a step where the guard acted (``on_log`` adds the values).
        Every rank asks alike (the guard decides alike): the Trainer's logging is a collective."""
        if self._pending_log:
            control.should_log = True
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        """Add the guard's totals and lr scale to the Trainer's ``logs`` and log history."""
        if self.guard is None or logs is None:
            return
        values = self._report.values(self.guard)
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)
        self._pending_log = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save the callback's state into the checkpoint the Trainer just wrote (rank 0)."""
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.state_dict(), os.path.join(folder, STATE_FILE))

    def _saved_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.exists(path):
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("version") != 1:
            raise ValueError(f"unsupported callback state version in {path}")
        return saved

    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state (next step, run name, store) and the guard's (flushes first)."""
        if self.monitor is None:
            raise RuntimeError("state_dict() while no training is running")
        guard = self.guard.state_dict() if self.guard is not None else None
        return {"version": 1, "monitor": self.monitor.state_dict(), "guard": guard}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush and detach the Monitor and the forward hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()
            self.run_name = self.monitor.run_name
            self.monitor = None
        if self.guard is not None:
            self._report.detach()
            self.guard.close()

    def read(self) -> Run:
        """Flush and return the run as a :class:`~stablestep.telemetry.store.Run`."""
        if self.monitor is not None:
            return self.monitor.read()
        if self.store is None:
            raise RuntimeError("nothing recorded yet: the store is chosen when training starts")
        return open_run(self.store, self.run_name)
