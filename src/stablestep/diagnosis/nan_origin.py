r"""Where a NaN was born: replay one step with hooks and name the first module (forward)
and the first gradient (backward) that turned non-finite.

``torch.autograd.detect_anomaly`` sees only the backward pass and slows every step
(10-50%). Here nothing runs during training: when a non-finite value has appeared,
restore the state from before the step (the Guard's snapshot, a checkpoint) and replay
that step's batch once under :func:`nan_origin`::

    origin = nan_origin(model, lambda: loss_fn(model(x), y), state=snapshot)
    print(origin.summary())  # "forward: blocks.1.attn produced inf from finite inputs ..."

Forward: a pre-hook and a hook on every module record, in execution order, whether its
inputs, its own parameters and its outputs are finite. The *origin* is the first module
whose output is non-finite:

* inputs, parameters finite → that module produced it (``how="produced"``);
* a parameter non-finite → the previous update broke it (``how="parameter"``, the name);
* inputs already non-finite → it was made between modules, by functional code (e.g.
  ``scaled_dot_product_attention``) in the forward of the innermost enclosing module
  still running, which is named (``how="between-modules"``).

Backward: each parameter's gradient hook and each module's full backward hook fire in
the order autograd computes them; the first non-finite gradient of a module's input
(whose output gradient was finite) and the first non-finite parameter gradient are named.

Works with plain modules and, for the forward origin, under FSDP2 (``fully_shard``,
checked with 2 gloo CPU processes): each rank checks its local tensors (DTensors through
``to_local()``) and names the module where *its* batch went bad (module names are the
same on every rank). Under FSDP2 the backward side is not located: gradient hooks on
the sharded parameters do not see the unsharded gradients. Replaying costs one forward
and backward with a finiteness check per module output (a reduction each); nothing is
hooked outside :func:`nan_origin`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger("stablestep.diagnosis.nan_origin")


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)
    elif hasattr(x, "to_tuple"):  # Hugging Face ModelOutput
        yield from _tensors(x.to_tuple())


def _finite(x: Any) -> bool:
    """Whether every floating tensor in ``x`` is finite (DTensors: the local shard)."""
    for t in _tensors(x):
        if hasattr(t, "to_local"):
            t = t.to_local()
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t.detach()).all()):
                return False
    return True


@dataclass
class NanOrigin:
    """What :func:`nan_origin` found.

    ``forward_module``: name of the first module whose output was non-finite (``None``:
    the forward stayed finite); ``forward_how``: ``"produced"``, ``"parameter"`` or
    ``"between-modules"``; ``parameter``: the non-finite parameter when
    ``forward_how == "parameter"``; ``loss_finite``; ``backward_module``: the first
    module whose input gradient turned non-finite from a finite output gradient;
    ``backward_parameter``: the first parameter whose gradient was non-finite;
    ``trail``: the first few non-finite events in order (for the log)."""

    forward_module: str | None = None
    forward_how: str | None = None
    parameter: str | None = None
    loss_finite: bool = True
    backward_module: str | None = None
    backward_parameter: str | None = None
    trail: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line a person reads."""
        parts = []
        if self.forward_module is not None:
            how = {"produced": "produced a non-finite output from finite inputs and weights",
                   "parameter": f"has a non-finite parameter ({self.parameter})",
                   "between-modules": "made it in its own forward code, outside its "
                                      "submodules"}[self.forward_how or "produced"]
            parts.append(f"forward: {self.forward_module or '<model>'} {how}")
        else:
            parts.append("forward: finite")
        if self.backward_module is not None:
            parts.append(f"backward: first non-finite input gradient at {self.backward_module}")
        if self.backward_parameter is not None:
            parts.append(f"first non-finite parameter gradient: {self.backward_parameter}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for a finding's evidence)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def nan_origin(model: nn.Module, step: Callable[[], torch.Tensor], *,
               state: Any = None, backward: bool = True,
               trail: int = 8) -> NanOrigin:
    """Replay one step under finiteness hooks and say where the first NaN/Inf was born.

    Args:
        model: the module (any wrapper: names are those of ``model.named_modules()``).
        step: a closure running the forward on the kept batch and returning the loss.
        state: the model's state from before the step to replay from: a
            ``model.state_dict()`` or a Guard :class:`~stablestep.guard.snapshot.Snapshot`
            (its ``.model``); the model's current state is put back afterwards. A Guard
            snapshot may be several steps old: replay those steps in ``step`` if the
            breakage built up over them.
        backward: also run ``loss.backward()`` (gradients are restored afterwards) and
            locate the first non-finite gradient.
        trail: how many non-finite events to keep in ``NanOrigin.trail``.
    """
    out = NanOrigin()
    names = {m: n for n, m in model.named_modules()}
    pnames = {p: n for n, p in model.named_parameters()}
    running: list[str] = []
    handles: list[Any] = []
    order = {"fwd": False}

    def note(msg: str) -> None:
        if len(out.trail) < trail:
            out.trail.append(msg)

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        running.append(names[mod])

    def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = running.pop() if running else names[mod]
        if order["fwd"] or _finite(output):
            return
        order["fwd"] = True
        bad = [n for n, p in mod.named_parameters(recurse=True) if not _finite(p)]
        if bad:
            how, param = "parameter", f"{name}.{bad[0]}" if name else bad[0]
        elif _finite((args, kwargs)):
            how, param = "produced", None
        else:
            how, param = "between-modules", None
            name = running[-1] if running else name
        out.forward_module, out.forward_how, out.parameter = name, how, param
        note(f"forward {how}: {name}")

    def bwd(mod: nn.Module, grad_in: tuple, grad_out: tuple) -> None:
        if out.backward_module is None and _finite(grad_out) and not _finite(grad_in):
            out.backward_module = names[mod]
            note(f"backward input gradient: {names[mod]}")

    def phook(p: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            if out.backward_parameter is None and not _finite(g):
                out.backward_parameter = pnames[p]
                note(f"backward parameter gradient: {pnames[p]}")
        return hook

    saved = None
    if state is not None and not isinstance(state, dict):
        state = state.model  # a Guard snapshot
    if state is not None:
        saved = copy.deepcopy(model.state_dict())
        model.load_state_dict(state)
    grads = {p: (None if p.grad is None else p.grad.detach().clone())
             for p in model.parameters()}

    def replay(module_backward: bool) -> None:
        for mod in names:
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
            if module_backward and mod is not model:
                handles.append(mod.register_full_backward_hook(bwd))
        if backward:
            for p in pnames:
                if p.requires_grad:
                    handles.append(p.register_hook(phook(p)))
        loss = step()
        out.loss_finite = _finite(loss)
        if backward and isinstance(loss, torch.Tensor) and loss.requires_grad:
            for p in pnames:
                p.grad = None
            loss.backward()

    try:
        try:
            with warnings.catch_warnings():  # modules whose inputs need no grad: expected
                warnings.filterwarnings("ignore", message="Full backward hook")
                replay(backward)
        except RuntimeError as err:  # a module whose output is modified in place cannot
            if "inplace" not in str(err).lower() and "BackwardHook" not in str(err):
                raise  # carry a full backward hook: replay with parameter hooks only
            log.info("module backward hooks refused (%s); parameter gradients only", err)
            for h in handles:
                h.remove()
            handles.clear()
            running.clear()
            order["fwd"] = False
            fresh = NanOrigin()
            out.__dict__.update(fresh.__dict__)
            replay(False)
    finally:
        for h in handles:
            h.remove()
        for p, g in grads.items():
            p.grad = g
        if saved is not None:
            model.load_state_dict(saved)
    log.info("nan origin: %s", out.summary())
    return out
