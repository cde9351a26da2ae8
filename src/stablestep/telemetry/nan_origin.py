r"""Where a NaN was born: replay one step with hooks and name the first module (forward)
and the first gradient (backward) that turned non-finite.

``torch.autograd.detect_anomaly`` sees only the backward pass and slows every step
(10-50%). Here nothing runs during training: when a non-finite value has appeared,
restore the state from before the step (the Guard's snapshot, a checkpoint) and replay
that step's batch once under :func:`nan_origin`::

    origin = nan_origin(model, lambda: loss_fn(model(x), y), state=snapshot)
    print(origin.summary())  # "forward: blocks.1.attn produced a non-finite output ..."

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

Automatically, once per incident (:class:`OriginWatch`): with
``MonitorConfig(keep_batch=True)`` and ``monitor.observe(loss, batch=closure)`` (``closure``
re-runs this step's forward on its batch and returns the loss, e.g.
``lambda: loss_fn(model(x), y)``; only a reference is kept), the Monitor reads one
finiteness flag per step, and on the first non-finite loss or gradient of an incident it
replays that step (the weights are still those that produced it: ``observe`` runs before
``optimizer.step()``) and records an event of kind ``"nan-origin"`` in the store;
``stablestep diagnose`` and the report put it in the NaN finding's sentence. A
:class:`stablestep.Guard` that skips a non-finite step asks the same watch (the step is
skipped, so the live weights are exactly the pre-step state its snapshot would give);
without a kept batch the event says ``origin unknown: batch not kept; pass
keep_batch=True``. Nothing is hooked and nothing is replayed while the values are finite.

Works with plain modules and, for the forward origin, under FSDP2 (``fully_shard``,
checked with 2 gloo CPU processes): each rank checks its local tensors (DTensors through
``to_local()``) and names the module where *its* batch went bad (module names are the
same on every rank). Under FSDP2 the backward side is not located: gradient hooks on
the sharded parameters do not see the unsharded gradients. Replaying costs one forward
and backward with a finiteness check per module output (a reduction each); nothing is
hooked outside :func:`nan_origin`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stablestep.telemetry import names as N

log = logging.getLogger("stablestep.nan_origin")

#: why no origin could be named when the step's batch was not kept
NOT_KEPT = ("batch not kept; pass keep_batch=True (MonitorConfig(keep_batch=True) and "
            "monitor.observe(loss, batch=lambda: loss_fn(model(x), y)))")


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

    def text(self) -> str:
        """The origin in one clause for the diagnosis' sentence: "the first non-finite value
        came out of `blocks.1.attn` in the forward pass; ..."."""
        def q(name: str | None) -> str:
            return f"`{name}`" if name else "the model's own forward (outside its submodules)"

        if self.forward_module is not None:
            if self.forward_how == "parameter":
                text = (f"the parameter `{self.parameter}` was already non-finite (an earlier "
                        f"update broke it) when {q(self.forward_module)} used it in the forward "
                        "pass")
            else:
                text = f"the first non-finite value came out of {q(self.forward_module)} in the " \
                       "forward pass"
                if self.forward_how == "between-modules" and self.forward_module:
                    text += " (in its own code, e.g. a softmax or matmul, not a submodule)"
            if self.backward_parameter is not None:
                text += f"; the first non-finite gradient was that of `{self.backward_parameter}`"
            return text
        if not self.loss_finite:
            return ("the model's outputs were finite: the loss computation made the first "
                    "non-finite value")
        if self.backward_module is not None or self.backward_parameter is not None:
            where = (f"came out of `{self.backward_module}`" if self.backward_module is not None
                     else "was that of a parameter")
            text = f"the forward pass was finite; the first non-finite gradient {where} in the " \
                   "backward pass"
            if self.backward_parameter is not None:
                text += f" (first parameter gradient: `{self.backward_parameter}`)"
            return text
        return ("replaying the step gave finite values (the non-finite value did not reproduce: "
                "a non-deterministic kernel, or the batch changed)")


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
    grads = {p: p.grad for p in model.parameters()}  # put back as they were (no copy:
    # the replay's backward starts from grad None and makes new tensors)

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
                # modules returning a dict or a Hugging Face ModelOutput: torch calls no
                # backward hook for them, and says so on every replay; the parameter
                # hooks and the other modules still locate the gradient
                warnings.filterwarnings("ignore", message="For backward hooks to be called")
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


def _from_ranks(data: dict[str, Any]) -> dict[str, Any]:
    """The replay result of the rank that reproduced the NaN: the first rank whose forward
    went non-finite, else the first whose replayed loss or gradients did, else this
    rank's own; with its ``rank`` (one ``all_gather_object``; every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return data
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, {**data, "rank": dist.get_rank()})
    found = [d for d in every if d and d.get("origin") == "found"]
    for pick in ([d for d in found if d.get("forward_module") is not None],
                 [d for d in found if not d.get("loss_finite", True)
                  or d.get("backward_parameter") is not None]):
        if pick:
            return {**pick[0], "text": f"{pick[0]['text']} (on rank {pick[0]['rank']}'s batch)"}
    return every[dist.get_rank()]


class OriginWatch:
    r"""Replays the first non-finite step of each incident once, with :func:`nan_origin`,
    and records where the NaN was born as an event of kind ``"nan-origin"``.

    Owned by a :class:`stablestep.Monitor` (``monitor.nan_watch``). :meth:`keep` holds a
    reference to the step's replay closure (no copy, no compute) when ``keep_batch``;
    :meth:`check` is the Monitor's per-step test (one host read of a finiteness flag, only
    with ``keep_batch``); :meth:`nonfinite` replays and records. An *incident* is a run of
    consecutive non-finite steps: it is replayed at its first step only. The Guard calls
    :meth:`nonfinite` at the first non-finite step it skips (``new_incident=True``): the
    same step is never replayed twice.

    Event data: ``origin`` (``"found"`` or ``"unknown"``), ``text`` (the sentence the
    diagnosis shows), ``by`` (``"monitor"`` or ``"guard"``), and for a found origin
    :meth:`NanOrigin.to_dict`'s fields; for an unknown one ``reason``.
    """

    def __init__(self, model: nn.Module | None, *, keep_batch: bool = False) -> None:
        self.model, self.keep_batch = model, bool(keep_batch)
        self._batch: Callable[[], torch.Tensor] | None = None
        self._batch_step: int | None = None
        self.in_incident = False
        self.last_step: int | None = None  # the step last replayed (or found unknown)
        self.incidents = 0
        #: model probes (anything with ``paused()``) whose hooks must not see the replay
        self.probes: Any = None

    def keep(self, step: int, batch: Callable[[], torch.Tensor] | None) -> None:
        """Keep ``batch`` (a closure returning step ``step``'s loss) until the next step."""
        if batch is not None and not callable(batch):
            raise TypeError("batch must be a callable returning this step's loss, e.g. "
                            "batch=lambda: loss_fn(model(x), y)")
        if self.keep_batch:
            self._batch, self._batch_step = batch, step
        else:
            self._batch = self._batch_step = None

    def check(self, step: int, flags: torch.Tensor,
              record: Callable[[int, str, dict], None]) -> dict[str, Any] | None:
        """``flags``: a boolean tensor, all true when the step is finite (read here: one
        host read). Replays and records at the first non-finite step of an incident."""
        if bool(flags.all()):
            self.in_incident = False
            return None
        return self.nonfinite(step, record, by="monitor")

    def nonfinite(self, step: int, record: Callable[[int, str, dict], None], *,
                  by: str, new_incident: bool = False,
                  gather: bool = False) -> dict[str, Any] | None:
        """Step ``step`` is non-finite: at the first step of an incident, replay the kept
        batch under :func:`nan_origin` and ``record(step, "nan-origin", data)``; returns
        ``data`` (``None`` when this incident was already replayed).

        ``gather``: every rank of ``torch.distributed`` calls this alike (the Guard's
        decision): each replays its own batch, and the ranks' results are gathered so the
        recorded one is the rank whose batch made the NaN (under DDP a NaN on one rank's
        batch reaches every rank through the gradient all-reduce, but only that rank's
        replay reproduces it); ``data["rank"]`` names it."""
        if self.last_step == step or (self.in_incident and not new_incident):
            return None
        self.in_incident, self.last_step = True, step
        self.incidents += 1
        if self.model is None:
            data = {"origin": "unknown", "reason": "the Monitor was given no model"}
        elif self._batch is None or self._batch_step != step:
            data = {"origin": "unknown", "reason": NOT_KEPT}
        else:
            pause = getattr(self.probes, "paused", None)
            try:
                with pause() if callable(pause) else contextlib.nullcontext():
                    o = nan_origin(self.model, self._batch)
            except Exception as err:  # never break the user's loop over a diagnosis
                log.warning("step %d: replaying the non-finite step failed: %s", step, err)
                data = {"origin": "unknown", "reason": f"the replay failed: {err}"}
            else:
                data = {"origin": "found", **o.to_dict(), "text": o.text()}
        if data["origin"] == "unknown":
            data["text"] = f"origin unknown: {data['reason']}"
        data["by"] = by
        if gather:
            data = _from_ranks(data)
        log.warning("step %d: where the NaN was born: %s", step, data["text"])
        record(step, N.EVENT_NAN_ORIGIN, data)
        return data

    def state_dict(self) -> dict[str, Any]:
        """Incident bookkeeping (the kept closure is not state: it holds the live batch)."""
        return {"in_incident": self.in_incident, "last_step": self.last_step,
                "incidents": self.incidents}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.in_incident = bool(state.get("in_incident", False))
        ls = state.get("last_step")
        self.last_step = None if ls is None else int(ls)
        self.incidents = int(state.get("incidents", 0))
