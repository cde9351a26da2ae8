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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from stablestep.integrations._common import check_every, default_run_name, guard_policy
from stablestep.telemetry.monitor import Monitor
from stablestep.telemetry.store import Run, open_run


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # AcceleratedOptimizer subclasses Optimizer, holds none

    return optimizer


class StablestepCallback(TrainerCallback):
    """Record the Trainer's optimizer step by step in a stablestep run store.

    ::

        from transformers import Trainer, TrainingArguments
        from stablestep.integrations.transformers import StablestepCallback

        cb = StablestepCallback(store="runs.db", run="hf-adamw")
        trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=1000),
                          train_dataset=ds, callbacks=[cb])
        trainer.train()
        # then: stablestep diagnose runs.db   /   stablestep report runs.db -o r.html

    Steps are the Trainer's optimizer steps, counted from 0 (``state.global_step`` before
    the step). The loss of a step is the mean of the ``loss`` the model returned on its
    micro-batches (with gradient accumulation this equals the Trainer's logged loss when
    micro-batches hold equal numbers of items); a model output without ``loss`` (custom
    ``compute_loss``) leaves the loss out. Gradients are read *after* the Trainer's
    clipping (``max_grad_norm``, default 1.0): set ``max_grad_norm=0`` to record raw
    gradient norms; under fp16 ``GradScaler`` the gradients are only unscaled when
    clipping is on. Everything else is :class:`stablestep.Monitor`'s.

    Resuming (``trainer.train(resume_from_checkpoint=...)``) continues the run named
    ``run`` at the checkpoint's step: steps stored at or after it are replaced. Give a
    fixed ``run`` name to continue the same run (the default name is new every time).

    The seatbelt: ``guard=GuardPolicy(...)`` (or ``True``) adds a
    :class:`stablestep.guard.Guard` (:attr:`guard`; its actions are events of the run). Its
    state is not part of the Trainer's checkpoints: after a resume it starts afresh.

    Args:
        store, run, config, every, state_every, top_k, quantile_sample, flush_every,
            flush_seconds, sinks: as for :class:`stablestep.Monitor`.
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
        sinks: Sequence[Any] = (),
        guard: Any = None,
    ):
        check_every("every", every)
        check_every("state_every", state_every, optional=True)
        check_every("flush_every", flush_every)
        self._policy = guard_policy(guard)
        self.guard: Any = None
        self.store = os.fspath(store)
        self.run_name = run or default_run_name()
        self._kwargs: dict[str, Any] = {
            "config": config,
            "every": every,
            "state_every": state_every,
            "top_k": top_k,
            "quantile_sample": quantile_sample,
            "flush_every": flush_every,
            "flush_seconds": flush_seconds,
            "sinks": sinks,
        }
        self.monitor: Monitor | None = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []

    def _capture(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach a Monitor to the Trainer's optimizer (at the checkpoint's step on resume)."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("StablestepCallback needs the Trainer's model and optimizer")
        self.monitor = Monitor(
            model, _unwrap(optimizer), store=self.store, run=self.run_name, **self._kwargs
        )
        if state.global_step > 0:
            self.monitor.load_state_dict(
                {"version": 1, "step": int(state.global_step), "run": self.run_name,
                 "store": self.store, "curvature": None}
            )
        if self._policy is not None:
            from stablestep.guard import Guard

            self.guard = Guard(model, self.monitor.optimizer, policy=self._policy,
                               monitor=self.monitor)
        self._hook = model.register_forward_hook(self._capture)
        self._losses = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``monitor.observe(loss)``: the gradients of this step are complete."""
        if self.monitor is None:
            return
        losses, self._losses = self._losses, []
        loss = torch.stack(losses).double().mean() if losses else None
        self.monitor.observe(loss)
        if self.guard is not None and not self.guard.check(loss if loss is not None else 0.0):
            for group in self.monitor.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # skipped: torch.optim leaves p and its state alone

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush and detach the Monitor and the forward hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.guard is not None:
            self.guard.close()

    def read(self) -> Run:
        """Flush and return the run as a :class:`~stablestep.telemetry.store.Run`."""
        if self.monitor is not None:
            return self.monitor.read()
        return open_run(self.store, self.run_name)
