r"""``stablestep.Guard``: skip, roll back and adapt so a long run survives a spike.

Why ``if guard.check(loss): optimizer.step()`` and not a wrapped optimizer: the decision
stays visible in the user's loop, the optimizer stays the user's own object (its class,
``state_dict``, ``isinstance`` checks, Lightning/HF integrations and ``GradScaler`` all see
the real thing), and the guard composes with the Monitor the same way (``observe`` then
``check``). The guard needs one small host sync per step (loss, gradient norm, a non-finite
flag) and, under ``torch.distributed``, one all-reduce of those three numbers, so every
rank takes the same decision from the same inputs.

Learning-rate changes are a multiplier :attr:`Guard.lr_scale` kept by the guard and applied
on top of whatever the user's scheduler wrote: an optimizer step pre-hook sets
``group["lr"] = lr * lr_scale`` and a post-hook puts the scheduler's value back, so
``scheduler.step()`` (chainable or closed-form) never sees, fights or compounds the guard's
factor, and ``optimizer.state_dict()`` holds the user's lr. Create the guard after a
:class:`~stablestep.Monitor` so the Monitor's post-hook sees the lr that was applied.
eps and AMSGrad changes are written into the param groups (schedulers do not touch them),
so they are saved with the optimizer's own ``state_dict``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from stablestep.diagnosis.detectors import DivergenceDetector, SpikeDetector
from stablestep.guard import remedies as R
from stablestep.guard import snapshot as S
from stablestep.guard.policy import GuardError, GuardPolicy, GuardRecord
from stablestep.telemetry import names
from stablestep.telemetry.probes import stack_scalars
from stablestep.telemetry.recorder import is_sharded, local


def _dist() -> Any:
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


class Guard:
    r"""A seatbelt for a training loop: skips bad steps, rolls back divergence, adapts.

    Example::

        guard = stablestep.Guard(model, optimizer, policy=GuardPolicy(snapshot_every=200))
        for x, y in data:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if guard.check(loss):      # False: skip this step (or it was rolled back)
                optimizer.step()
            scheduler.step()           # keep the schedule on the clock either way
        guard.records                  # every action with its numbers

    Each :meth:`check` (call it after ``backward()``, before ``step()``) reads the loss and
    the gradients and decides, in order (thresholds in :class:`GuardPolicy`):

    1. **non-finite** loss or gradients: skip (never let a NaN into Adam's moments);
       ``max_nonfinite_run`` in a row: roll back.
    2. **gradient outlier**: :math:`z_t = (\log\|g_t\| - \mu)/\max(\sigma, \sigma_{\min})`
       against the running statistics of accepted steps; skip, or clip to
       :math:`\exp(\mu + \text{clip\_z}\,\sigma)`.
    3. **loss detectors** (the diagnosis' own :class:`SpikeDetector` and
       :class:`DivergenceDetector`, fed with the losses of accepted steps): divergence, or
       a spike not recovered within ``recover_patience`` steps, restores the newest
       snapshot taken before the incident's onset, then adapts; a recovered spike of
       the adaptive-edge-of-stability kind (Adam family, gradient not an outlier) is
       counted (unless within ``spike.window`` steps of a gradient outlier: its echo), and
       ``adapt_after`` of them within ``adapt_window`` steps adapt.
    4. **snapshot** every ``snapshot_every`` calm steps (CPU copies, ``keep_snapshots``).

    Adaptation walks ``policy.remedies`` (AMSGrad on; eps raised to
    :func:`stablestep.diagnosis.explain.stable_eps`; lr scale times ``lr_backoff`` or
    :math:`0.9\,T/\lambda_{\max}(P^{-1}H)`), see :mod:`stablestep.guard.remedies`. eps and
    the curvature-based lr factor need ``curvature_loss``, a closure returning the loss on
    a fixed batch (only evaluated when a remedy is chosen, never per step).

    Every action is a :class:`GuardRecord` in :attr:`records` (and an event of kind
    ``names.EVENT_GUARD`` when a ``monitor`` is given) and counted in :attr:`counts`.
    Steps are counted by :meth:`check` calls from 0, like the Monitor's :meth:`observe`.
    A rollback does not rewind the step counter, the data or the scheduler: the run goes
    on from the restored weights with the next batches.

    With ``torch.amp.GradScaler``: ``scaler.unscale_(opt)``, then
    ``if guard.check(loss): scaler.step(opt)``, then ``scaler.update()``; the scaler's own
    overflow steps are non-finite skips here, so raise ``max_nonfinite_run`` while it
    calibrates. The loss detectors work on :math:`\log` loss and ignore non-positive
    losses (a negative log-likelihood below 0 is not watched for spikes or divergence).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 policy: GuardPolicy | None = None, monitor: Any = None,
                 curvature_loss: Callable[[], torch.Tensor] | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if policy is not None and not isinstance(policy, GuardPolicy):
            raise TypeError(f"policy must be a GuardPolicy, got {type(policy).__name__}")
        if monitor is not None and not callable(getattr(monitor, "record_event", None)):
            raise TypeError("monitor must have a record_event(step, kind, data) method "
                            "(a stablestep.Monitor)")
        if curvature_loss is not None and not callable(curvature_loss):
            raise TypeError("curvature_loss must be a callable returning the loss tensor")
        self.model, self.optimizer = model, optimizer
        self.policy = policy or GuardPolicy()
        self.monitor, self.curvature_loss = monitor, curvature_loss
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._spike = SpikeDetector(self.policy.spike)
        self._div = DivergenceDetector(self.policy.divergence)
        self.records: list[GuardRecord] = []
        self.counts = {"skip": 0, "clip": 0, "rollback": 0, "adapt": 0, "spike": 0}
        self.lr_scale = 1.0
        self._step = 0
        self._stats = {"n": 0, "mean": 0.0, "var": 0.0, "prev_z": 0.0}
        self._nonfinite_run = 0
        self._episode: tuple[int, int] | None = None  # (first alarm step, onset)
        self._aeos: list[int] = []  # AEoS spike steps since the last adaptation
        self._ladder = 0
        self._last_adapt: int | None = None
        self._last_outlier: int | None = None
        self._snaps: list[S.Snapshot] = []
        self._saved_lr: list[Any] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    # ------------------------------------------------------------------ the loop
    @property
    def step(self) -> int:
        """Index of the next step :meth:`check` will decide."""
        return self._step

    @property
    def snapshots(self) -> list[int]:
        """Steps of the snapshots held, oldest first."""
        return [s.step for s in self._snaps]

    def check(self, loss: torch.Tensor | float) -> bool:
        """Decide step ``self.step``: ``True`` to take ``optimizer.step()``, ``False`` to skip
        it (a non-finite or outlier step, or one that triggered a rollback)."""
        step, p = self._step, self.policy
        self._step += 1
        loss_v, gnorm = self._signals(loss)
        if not (math.isfinite(loss_v) and math.isfinite(gnorm)):
            self._nonfinite_run += 1
            data = {"loss": _num(loss_v), "grad_norm": _num(gnorm), "run": self._nonfinite_run}
            if p.rollback and self._nonfinite_run >= p.max_nonfinite_run:
                self._rollback(step, "repeated-non-finite", onset=step - self._nonfinite_run + 1,
                               data=data)
                return False
            if p.skip_nonfinite:
                self._record(step, "skip", "non-finite", data)
                return False
            return True
        self._nonfinite_run = 0
        if gnorm <= 0.0:  # no gradient (frozen model, check before backward): no statistics
            return self._watch_loss(step, loss_v, gnorm, 0.0)
        st = self._stats
        y = math.log(gnorm)
        sigma = max(math.sqrt(st["var"]), p.sigma_min)
        z = (y - st["mean"]) / sigma if st["n"] else 0.0
        prev_z, st["prev_z"] = st["prev_z"], z
        if (p.outlier_z is not None and st["n"] >= p.stats_warmup and z >= p.outlier_z
                and prev_z < p.outlier_z / 2):
            data = {"loss": loss_v, "grad_norm": gnorm, "z": z,
                    "median": math.exp(st["mean"]), "sigma": sigma}
            self._last_outlier = step
            if p.outlier_action == "skip":
                self._record(step, "skip", "gradient-outlier", data)
                return False
            target = math.exp(st["mean"] + p.clip_z * sigma)
            with torch.no_grad():
                grads = [q.grad for q in self._params if q.grad is not None]
                torch._foreach_mul_(grads, target / gnorm)
            self._record(step, "clip", "gradient-outlier", {**data, "clip_to": target})
            return True
        a = 2.0 / (p.stats_window + 1)
        if st["n"] == 0:
            st["mean"] = y
        else:
            d = y - st["mean"]
            st["mean"] += a * d
            st["var"] = (1 - a) * (st["var"] + a * d * d)
        st["n"] += 1
        return self._watch_loss(step, loss_v, gnorm, z)

    def _watch_loss(self, step: int, loss_v: float, gnorm: float, z: float) -> bool:
        p = self.policy
        was_in = self._spike.in_excursion
        alarm = self._spike.update(step, loss_v)
        div = self._div.update(step, loss_v)
        if alarm is not None:
            if not was_in or self._episode is None:
                self._episode = (step, alarm.onset)
            self._on_spike(step, alarm, gnorm, z)
        if not self._spike.in_excursion:
            self._episode = None
        if p.rollback and div is not None:
            self._rollback(step, "divergence", onset=div.onset,
                           data={"loss": loss_v, "baseline": div.baseline,
                                 "factor": loss_v / div.baseline})
            return False
        if p.rollback and self._episode is not None and \
                step - self._episode[0] >= p.recover_patience:
            self._rollback(step, "unrecovered-spike", onset=self._episode[1],
                           data={"loss": loss_v, "alarm_step": self._episode[0]})
            return False
        last = self._snaps[-1].step if self._snaps else None
        if (last is None or step - last >= p.snapshot_every) and self._episode is None:
            self._snaps.append(S.capture(step, self.model, self.optimizer, self._detectors()))
            del self._snaps[:-p.keep_snapshots]
        return True

    def _on_spike(self, step: int, alarm: Any, gnorm: float, z: float) -> None:
        self.counts["spike"] += 1
        if not R.is_adam(self.optimizer):
            return
        p = self.policy
        if self._last_adapt is not None and step - self._last_adapt < p.adapt_cooldown:
            return
        if self._last_outlier is not None and step - self._last_outlier < p.spike.window:
            return  # the echo of a bad batch (momentum carries it), not Adam's instability
        self._aeos = [s for s in self._aeos if step - s < p.adapt_window] + [step]
        if p.adapt and len(self._aeos) >= p.adapt_after:
            evidence = {"spike_steps": list(self._aeos), "loss": alarm.value,
                        "baseline": alarm.baseline, "grad_norm": gnorm, "grad_norm_z": z}
            g2v = R.g2v_rms(self.optimizer)
            if g2v is not None:
                evidence[names.G2V_RMS] = g2v
            self._aeos = []
            self._adapt(step, "adaptive-edge-of-stability", evidence)

    # --------------------------------------------------------- rollback & adapt
    def _detectors(self) -> dict[str, Any]:
        return {"spike": self._spike.state_dict(), "div": self._div.state_dict(),
                "stats": dict(self._stats)}

    def _load_detectors(self, d: dict[str, Any]) -> None:
        self._spike.load_state_dict(copy.deepcopy(d["spike"]))
        self._div.load_state_dict(copy.deepcopy(d["div"]))
        self._spike.config, self._div.config = self.policy.spike, self.policy.divergence
        self._stats = dict(d["stats"])

    def _rollback(self, step: int, reason: str, *, onset: int, data: dict) -> None:
        p = self.policy
        if p.max_rollbacks is not None and self.counts["rollback"] >= p.max_rollbacks:
            raise GuardError(f"step {step}: {reason} after {self.counts['rollback']} rollbacks "
                             f"(max_rollbacks={p.max_rollbacks}); the run needs a person")
        if not self._snaps:
            raise GuardError(f"step {step}: {reason} and no snapshot to roll back to")
        before = [s for s in self._snaps if s.step < onset]
        snap = before[-1] if before else self._snaps[0]
        del self._snaps[self._snaps.index(snap) + 1:]
        S.restore(snap, self.model, self.optimizer)
        R.ensure_amsgrad_state(self.optimizer)
        self._load_detectors(snap.guard)
        self._nonfinite_run, self._episode, self._aeos = 0, None, []
        self._record(step, "rollback", reason,
                     {**data, "onset": onset, "to_step": snap.step, "lost_steps": step - snap.step})
        if p.adapt:
            self._adapt(step, "after-rollback", {"reason": reason})

    def _adapt(self, step: int, reason: str, evidence: dict) -> None:
        ladder = self.policy.remedies
        while self._ladder < len(ladder):
            name = ladder[self._ladder]
            self._ladder += 1
            change = self._apply(name)
            if change is not None:
                break
        else:
            change = self._apply("lr")
        self._last_adapt = step
        self._record(step, "adapt", reason, {**change, **evidence})

    def _apply(self, name: str) -> dict[str, Any] | None:
        opt = self.optimizer
        if name == "amsgrad":
            if not R.is_adam(opt) or R.enable_amsgrad(opt) == 0:
                return None
            return {"remedy": "amsgrad"}
        if name == "eps":
            if not R.is_adam(opt) or self.curvature_loss is None:
                return None
            m = self._measure()
            changes = R.raise_eps(opt, m["sharpness"], lr_scale=self.lr_scale)
            if not changes or all(new <= old for old, new in changes):
                return None
            return {"remedy": "eps", "eps_old": changes[0][0], "eps_new": changes[0][1],
                    names.SHARPNESS: m["sharpness"]}
        m = self._measure() if self.curvature_loss is not None else {}
        ps = m.get("precond_sharpness")
        f = R.lr_factor(self.policy.lr_backoff, ps, m.get("precond_threshold"))
        self.lr_scale *= f
        out = {"remedy": "lr", "factor": f, "lr_scale": self.lr_scale}
        if ps is not None:
            out[names.PRECOND_SHARPNESS] = ps
        return out

    def _measure(self) -> dict[str, float]:
        m = R.measure(self.curvature_loss, self.optimizer)
        if "precond_sharpness" in m:  # measured at the group lr; the applied lr is scaled
            m["precond_sharpness"] *= self.lr_scale
        d = _dist()
        if d is not None:  # same remedy on every rank: average the per-rank estimates
            keys = sorted(m)
            t = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=self._device())
            d.all_reduce(t)
            m = dict(zip(keys, (t / d.get_world_size()).tolist(), strict=True))
        return m

    def _record(self, step: int, action: str, reason: str, data: dict) -> None:
        rec = GuardRecord(step=step, action=action, reason=reason, data=data)
        self.records.append(rec)
        self.counts[action] += 1
        if self.monitor is not None:
            self.monitor.record_event(step, names.EVENT_GUARD, rec.to_dict())

    # ------------------------------------------------------------------ signals
    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _signals(self, loss: torch.Tensor | float) -> tuple[float, float]:
        """(loss, gradient norm), all-reduced (mean over ranks) under torch.distributed."""
        grads = [q.grad.detach() for q in self._params if q.grad is not None]
        # FSDP2 gradients are DTensor shards: this rank's part, squared norms summed over ranks
        shard = [local(g) for g in grads if is_sharded(g)]
        grads = [local(g) for g in grads if not is_sharded(g)]
        dev = (grads or shard)[0].device if grads or shard else self._device()
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        gn = (stack_scalars([n.to(dev) for n in torch._foreach_norm(grads)]).square().sum()
              .sqrt() if grads else zero)
        gs = (stack_scalars([n.to(dev) for n in torch._foreach_norm(shard)]).square().sum()
              if shard else zero)
        lt = (loss.detach().double().reshape(()).to(dev) if isinstance(loss, torch.Tensor)
              else torch.tensor(float(loss), dtype=torch.float64, device=dev))
        vec = torch.stack([lt, gn, gs])
        d = _dist()
        if d is not None:
            d.all_reduce(vec)  # NaN/Inf on any rank reaches every rank
            vec[:2] /= d.get_world_size()
        loss_v, gnorm, shard_sq = vec.tolist()
        return loss_v, math.sqrt(gnorm * gnorm + shard_sq)

    # ------------------------------------------------------------- lr multiplier
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.lr_scale == 1.0:
            self._saved_lr = []
            return
        self._saved_lr = []
        for g in optimizer.param_groups:
            lr = g["lr"]
            self._saved_lr.append(lr.clone() if isinstance(lr, torch.Tensor) else lr)
            if isinstance(lr, torch.Tensor):
                lr.mul_(self.lr_scale)
            else:
                g["lr"] = lr * self.lr_scale

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved_lr, strict=False):
            if isinstance(lr, torch.Tensor):
                g["lr"].copy_(lr)
            else:
                g["lr"] = lr
        self._saved_lr = []

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: counters, records, lr scale, detector
        statistics and the snapshots (CPU tensors; save with ``torch.save``). eps and
        AMSGrad live in the optimizer's param groups and are saved with its state_dict."""
        return {"step": self._step, "lr_scale": self.lr_scale, "counts": dict(self.counts),
                "records": [r.to_dict() for r in self.records],
                "nonfinite_run": self._nonfinite_run, "episode": self._episode,
                "aeos": list(self._aeos), "ladder": self._ladder, "last_adapt": self._last_adapt,
                "last_outlier": self._last_outlier,
                "detectors": copy.deepcopy(self._detectors()),
                "snapshots": [S.to_state(s) for s in self._snaps],
                "policy": self.policy.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the policy given to the constructor is kept)."""
        self._step, self.lr_scale = int(state["step"]), float(state["lr_scale"])
        self.counts = dict(state["counts"])
        self.records = []
        for r in state["records"]:
            r = dict(r)
            self.records.append(GuardRecord(step=r.pop("step"), action=r.pop("action"),
                                            reason=r.pop("reason"), data=r))
        self._nonfinite_run = int(state["nonfinite_run"])
        ep = state["episode"]
        self._episode = (int(ep[0]), int(ep[1])) if ep is not None else None
        self._aeos, self._ladder = [int(s) for s in state["aeos"]], int(state["ladder"])
        self._last_adapt = state["last_adapt"]
        self._last_outlier = state["last_outlier"]
        self._load_detectors(state["detectors"])
        self._snaps = [S.from_state(s) for s in state["snapshots"]]

    def close(self) -> None:
        """Remove the optimizer hooks (the lr scale stops being applied)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _num(x: float) -> float | str:
    """A JSON-safe number: non-finite values as strings ("nan", "inf")."""
    return x if math.isfinite(x) else str(x)
