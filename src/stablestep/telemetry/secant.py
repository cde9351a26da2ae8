r"""Free curvature: the secant (Rayleigh) estimate along the update, with no HVP.

Between two consecutive steps, :math:`u = \theta_{t+1} - \theta_t` and
:math:`\Delta g = g_{t+1} - g_t` give (:func:`stablestep.formulas.secant_curvature`)

.. math:: q_t = \frac{u\cdot\Delta g}{u^\top P_t u},

:math:`P_t = \operatorname{diag}(1/d_t)` with :math:`d_t` the optimizer's own effective step
(:func:`stablestep.optim.inspect.effective_step`: :math:`\alpha_t/(\sqrt{\hat v_t}+\epsilon_t)`
for Adam in either epsilon convention, ``lr`` for SGD). :math:`q_t` is compared with the
optimizer's stability bound (:func:`stablestep.formulas.threshold`: 38 for Adam with
:math:`b_1 = 0.9`; 2, heavy ball or Nesterov for SGD).

:class:`SecantTracker` needs no copy of the gradients: at step :math:`t` it keeps the two
scalars :math:`u\cdot g_t` and :math:`u^\top P_t u` and the update :math:`u` (one buffer
the size of the parameters, only while a measurement is open), and at step :math:`t+1`
it forms :math:`u\cdot g_{t+1}`. With minibatches :math:`g_{t+1}` comes from another batch,
so :math:`\Delta g = Hu + (\xi_{t+1} - \xi_t)`: the noise term enters the numerator.
The tracker therefore also reports :math:`|u\cdot\Delta g|/(|u|\,|\Delta g|)` (``cos``),
and the diagnosis trusts :math:`q_t` only where it stands out of the spread it had on
healthy steps (``benchmarks/secant.py`` measures both the cost and the noise).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from stablestep import formulas as F
from stablestep._dtensor import local

log = logging.getLogger("stablestep.telemetry.secant")


def secant(u: Sequence[torch.Tensor], g_prev: Sequence[torch.Tensor],
           g_next: Sequence[torch.Tensor], d: Sequence[Any]) -> float:
    r"""Pure form: :math:`q = u\cdot(g_{t+1}-g_t)/(u^\top P u)` with :math:`P = \mathrm{diag}(1/d)`
    (:func:`stablestep.formulas.secant_curvature`); ``d`` entries are tensors or floats."""
    dg = [b - a for a, b in zip(g_prev, g_next, strict=True)]
    return F.secant_curvature(list(u), dg, list(d))


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the per-tensor dot products, accumulated in float64 across tensors (one BLAS
    dot per tensor in the tensors' own dtype: no float64 copies of the parameters)."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)).double()
                        for x, y in zip(a, b, strict=True)]).sum()


def from_parts(parts: torch.Tensor) -> torch.Tensor:
    r"""``[q, cos]`` (float64, on ``parts``' device, no host read) from the six sums of a
    measurement, :math:`[u^\top P u,\ u\cdot g_t,\ |g_t|^2,\ |u|^2,\ u\cdot g_{t+1},\
    |g_{t+1}|^2]`: :math:`q = (u\cdot g_{t+1} - u\cdot g_t)/(u^\top P u)` (NaN when
    :math:`u^\top P u = 0`: no update, nothing to record) and
    :math:`\cos = |u\cdot\Delta g|/(|u|\,(|g_t| + |g_{t+1}|))`, a lower bound on the cosine
    (:math:`|\Delta g| \le |g_t| + |g_{t+1}|`, so :math:`g_t` need not be kept).

    Each entry is a sum over tensors, so under ``torch.distributed`` the sums of every
    rank's shards (FSDP2) or of the tensors a rank counts (DDP replicas: rank 0) are the
    sums of the whole model: the Monitor reduces them with its other sums, one collective
    per recorded step."""
    den, ug, g2, uu, ug1, g12 = parts.double().unbind()
    num = ug1 - ug
    q = torch.where(den > 0, num / den, torch.full_like(den, math.nan))
    gmag = (g12.sqrt() + g2.sqrt()) * uu.sqrt()
    cos = torch.where(gmag > 0, num.abs() / gmag, torch.zeros_like(gmag))
    return torch.stack([q, cos])


class SecantTracker:
    """Measures :math:`q_t` every ``every`` steps (module docstring).

    Protocol, per step ``t`` (the Monitor's hooks)::

        q = tracker.observe(t, params, grads)   # after backward, before optimizer.step()
        optimizer.step()
        tracker.after_step(optimizer, params)    # optimizer step post-hook

    ``observe`` returns the measurement opened at the previous step (``None`` when there
    is none) as ``{"q": ..., "cos": ...}`` (floats; 0-dim float64 tensors on the parameters'
    device with ``as_tensors=True``, so that nothing waits for the device) and opens a new
    one when ``t % every == 0``. ``every=None`` disables it. No host read in ``after_step``.

    Parameters may be DTensors (FSDP2 ``fully_shard``): the arithmetic runs on the local
    shards (:func:`stablestep._dtensor.local`), the optimizer's state is looked up by the
    parameter itself. Under ``torch.distributed`` use :meth:`observe_parts` on the tensors
    this rank counts and sum the parts over ranks (:func:`from_parts`).
    """

    def __init__(self, every: int | None = 1):
        self.every = every
        self._buf: list[torch.Tensor] | None = None  # theta_t, then -u after the step
        self._s: torch.Tensor | None = None  # [u^T P u, u.g_t, |g_t|^2, |u|^2] (float64)
        self._grads: list[torch.Tensor] | None = None
        self._open_step: int | None = None
        self._ready = False
        self._scheduled: int | None = None  # the last step a measurement was due at

    def observe(self, step: int, params: Sequence[torch.Tensor],
                grads: Sequence[torch.Tensor], *, as_tensors: bool = False) -> dict | None:
        """Close the measurement opened at ``step - 1`` with ``grads`` = :math:`g_{t+1}`,
        and snapshot ``params`` if ``step`` is a recording step."""
        measured = self._ready and self._open_step == step - 1 and len(grads) == len(self._buf)
        parts = self.observe_parts(step, params, grads)
        if parts is None or not measured:
            return None
        with torch.no_grad():
            qc = from_parts(parts)
        if as_tensors:
            return {"q": qc[0], "cos": qc[1]}
        qf, cf = qc.tolist()
        return {"q": qf, "cos": cf}

    def observe_parts(self, step: int, params: Sequence[torch.Tensor],
                      grads: Sequence[torch.Tensor], *,
                      device: torch.device | None = None) -> torch.Tensor | None:
        """:meth:`observe` before the division: the six sums of :func:`from_parts` over
        ``params``/``grads`` (float64, on the device, no host read) when a measurement was
        due at ``step - 1``, else ``None``; zeros when this process measured nothing (no
        tensors, the optimizer step skipped, an optimizer without an effective step), so
        that every rank of a job contributes to the same steps. Opens the next one."""
        out = None
        if self._scheduled is not None and self._scheduled == step - 1:
            if self._ready and self._open_step == step - 1 and len(grads) == len(self._buf):
                with torch.no_grad():
                    g1 = [local(g) for g in grads]
                    # buf holds -u: u . g_{t+1} = -(buf . g_{t+1})
                    out = torch.cat([self._s, torch.stack([-_dot(self._buf, g1),
                                                           _dot(g1, g1)])])
            else:
                dev = device or next((g.device for g in grads), torch.device("cpu"))
                out = torch.zeros(6, dtype=torch.float64, device=dev)
        self._ready = False
        self._open_step = None
        self._scheduled = None
        if self.every is not None and step % self.every == 0:
            self._scheduled = step
            if len(params):
                with torch.no_grad():
                    pl = [local(p.detach()) for p in params]
                    if self._buf is None or [b.shape for b in self._buf] != [p.shape for p in pl]:
                        self._buf = [torch.empty_like(p, memory_format=torch.contiguous_format)
                                     for p in pl]
                    torch._foreach_copy_(self._buf, pl)
                self._grads = [local(g.detach()) for g in grads]
                self._open_step = step
        return out

    def after_step(self, optimizer: torch.optim.Optimizer,
                   params: Sequence[torch.Tensor]) -> None:
        r"""Turn the snapshot into :math:`u` and keep :math:`u\cdot g_t` and :math:`u^\top P u`
        (the optimizer's effective step as of this step, :func:`inspect.effective_step`)."""
        if self._open_step is None or self._grads is None:
            return
        from stablestep.optim import inspect

        grads, self._grads = self._grads, None
        if self._buf is None or len(params) != len(self._buf):
            # the step ran on other tensors than the snapshot (e.g. every p.grad set to
            # None: a step the guard refused in the Lightning/HF callbacks): no update to
            # measure along, so this measurement is dropped
            self._open_step = None
            return
        with torch.no_grad():
            # buf = theta_t - theta_{t+1} = -u: the sign is applied to the dot products
            torch._foreach_sub_(self._buf, [local(p.detach()) for p in params])
            den = []
            for u, p in zip(self._buf, params, strict=True):
                d = inspect.effective_step(optimizer, p)
                if d is None:
                    self._open_step = None
                    return
                d = local(d)
                if d.dim() == 0:  # SGD: one lr for the tensor
                    uu = torch.dot(u.reshape(-1), u.reshape(-1)).double()
                    d = d.double()
                    den.append(torch.where(d > 0, uu / d, torch.zeros_like(uu)))
                else:  # u^T P u over the coordinates that moved (d > 0)
                    q = u.square().div_(d)
                    den.append(q.where(d > 0, q.new_zeros(())).sum(dtype=torch.float64))
            self._s = torch.stack([torch.stack(den).sum(), -_dot(self._buf, grads),
                                   _dot(grads, grads), _dot(self._buf, self._buf)])
        self._ready = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The open measurement (``u`` and its two scalars), so a run saved between the
        two steps of a measurement continues it identically."""
        if not self._ready:
            return {"version": 1, "every": self.every, "open": None,
                    "scheduled": self._scheduled}
        return {"version": 1, "every": self.every, "scheduled": self._scheduled,
                "open": {"step": self._open_step, "u": [b.clone() for b in self._buf],
                         "scalars": self._s.tolist()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported SecantTracker state version: {state.get('version')!r}")
        self.every = state.get("every", self.every)
        o = state.get("open")
        self._ready = o is not None
        self._open_step = None if o is None else int(o["step"])
        sched = state.get("scheduled", self._open_step)
        self._scheduled = None if sched is None else int(sched)
        if o is not None:
            self._buf = [u.clone() for u in o["u"]]
            self._s = torch.tensor(o["scalars"], dtype=torch.float64,
                                   device=self._buf[0].device if self._buf else None)
