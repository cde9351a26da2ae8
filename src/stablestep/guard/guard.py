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

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from stablestep.diagnosis.infer import RESTART_WINDOW, lr_restart, progress_lost
from stablestep.diagnosis.stack import DetectorStack
from stablestep.guard import remedies as R
from stablestep.guard import snapshot as S
from stablestep.guard.policy import GuardError, GuardPolicy, GuardRecord
from stablestep.telemetry import names
from stablestep.telemetry.probes import stack_scalars
from stablestep.telemetry.recorder import is_sharded, local

log = logging.getLogger("stablestep.guard")


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
        guard.summary()                # skipped steps and why, rollbacks, the lr scale now

    Each :meth:`check` (call it after ``backward()``, before ``step()``) feeds the loss and
    the gradient norm to the one detector stack
    (:class:`~stablestep.diagnosis.stack.DetectorStack`, the one ``diagnose`` replays on the
    stored run, so both see the same incidents) and acts on its incidents as
    :class:`GuardPolicy` says: a non-finite step or an outlier batch is skipped; rollback
    and adaptation need evidence of instability (the loss not coming back, non-finite
    values that persist or sit in the parameters or optimizer state, Adam's spikes
    recurring); the lr cut is bounded and restored once the run is healthy.

    Every action is a :class:`GuardRecord` in :attr:`records`, a ``logging`` line (logger
    ``stablestep.guard``: skips at INFO, the rest at WARNING), an event of kind
    ``names.EVENT_GUARD`` in the store when a ``monitor`` is given (``diagnose`` shows it),
    and a call of each hook of :meth:`register_action_hook` (how the Lightning, HF and Keras
    callbacks put it in the framework's own log). Skipped batches are listed in
    :attr:`bad_batches` (the ``batch_id`` given to :meth:`check`, else the step), saved in
    :meth:`state_dict`; :func:`stablestep.guard.skip_batches` drops them on resume.

    Steps are counted by :meth:`check` calls from ``start_step`` (default 0; give the
    Monitor's ``start_step`` too so both number a step alike), like the Monitor's
    :meth:`observe`.
    A rollback does not rewind the step counter, the data or the scheduler: the run goes
    on from the restored weights with the next batches. With a ``monitor`` (and not under
    ``torch.distributed``) the loss and gradient norm the Monitor just read are reused:
    no second norm, no second host sync.

    With ``torch.amp.GradScaler``: ``scaler.unscale_(opt)``, then
    ``if guard.check(loss): scaler.step(opt)``, then ``scaler.update()``; the scaler's own
    overflow steps are non-finite skips here, so raise ``max_nonfinite_run`` while it
    calibrates. The loss detectors work on :math:`\log` loss and ignore non-positive
    losses (a negative log-likelihood below 0 is not watched for spikes or divergence).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 policy: GuardPolicy | None = None, monitor: Any = None,
                 curvature_loss: Callable[[], torch.Tensor] | None = None,
                 start_step: int = 0) -> None:
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
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"Invalid start_step: {start_step!r} (need an int >= 0)")
        self.start_step = start_step
        self.model, self.optimizer = model, optimizer
        self.policy = policy or GuardPolicy()
        self.monitor, self.curvature_loss = monitor, curvature_loss
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.stack = DetectorStack(self.policy.stack)
        self.records: list[GuardRecord] = []
        self.counts = {"skip": 0, "clip": 0, "rollback": 0, "adapt": 0, "restore": 0,
                       "spike": 0}
        self.bad_batches: list[Any] = []
        self.lr_scale = 1.0
        self._step = start_step
        self._checks = 0  # check() calls so far (summary's "steps": not the step number)
        self._nonfinite_run = 0
        self._aeos: list[int] = []  # Adam spike steps since the last adaptation
        self._ladder = 0
        self._last_adapt: int | None = None
        self._last_outlier: int | None = None
        self._last_trouble = -1  # last step with a spike, divergence or rollback
        self._snaps: list[S.Snapshot] = []
        self._lrs: list[tuple[int, float]] = []  # (step, user's lr of group 0), recent
        self._lr_peaks: list[tuple[int, float]] = []  # (step, highest lr so far), on change
        self._first: list[float] = []  # the first 5 finite losses (the starting level)
        self._recent: deque[float] = deque(maxlen=10)  # the last finite losses
        self._saved_lr: list[Any] = []
        self._rolled_onsets: list[int] = []  # onsets of level regimes rolled back (recent)
        self._hooks: dict[int, Callable[[GuardRecord], None]] = {}
        self._d: Any = None  # torch.distributed when initialised (read once per check)
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

    @property
    def incidents(self) -> list[Any]:
        """Every incident of the detector stack so far (``StackIncident`` records)."""
        return self.stack.incidents

    def check(self, loss: torch.Tensor | float, *, batch_id: Any = None) -> bool:
        """Decide step ``self.step``: ``True`` to take ``optimizer.step()``, ``False`` to skip
        it (a non-finite or outlier step, or one that triggered a rollback). ``batch_id``
        (any JSON-able value) names the batch in :attr:`bad_batches` if it is skipped."""
        step, p = self._step, self.policy
        self._step += 1
        self._checks += 1
        last = self._snaps[-1].step if self._snaps else None
        snap_due = ((last is None or step - last >= p.snapshot_every)
                    and not self.stack.in_excursion)
        # what the state read covers: the parameters every state_check_every steps; the
        # optimizer state too before a snapshot (so no snapshot holds a NaN or Inf) and
        # while steps are non-finite. NaN/Inf in Adam's moments reaches the parameters at
        # the next step (m / (sqrt(v) + eps) is NaN/Inf), all but v = +Inf with m finite,
        # which freezes its coordinate: the read before the next snapshot finds that one.
        state = None
        if p.state_check_every is not None:
            if snap_due or self._nonfinite_run > 0:
                state = "full"
            elif step % p.state_check_every == 0:
                state = "params"
        self._d = _dist()  # once per check: torch.distributed's query is not free
        loss_v, gnorm, state_v = self._signals(loss, state)
        bad = not (math.isfinite(loss_v) and math.isfinite(gnorm))
        state_bad = not math.isfinite(state_v)
        if math.isfinite(loss_v):
            if len(self._first) < 5:
                self._first.append(loss_v)
            self._recent.append(loss_v)
        incs = self.stack.update(step, loss_v, grad_norm=gnorm, nonfinite=bad or state_bad)
        self._note_lr(step)
        kinds = {i.kind: i for i in incs}
        bid = step if batch_id is None else batch_id
        if bad and self._nonfinite_run == 0:  # before any skip or rollback changes the model
            self._nan_origin(step)
        if state_bad and p.rollback:
            self._rollback(step, "non-finite-state", onset=step,
                           data={"loss": _num(loss_v), "grad_norm": _num(gnorm),
                                 "state_norm": _num(state_v),
                                 "checked": ("parameters and optimizer state"
                                             if state == "full" else "parameters")})
            return False
        if bad:
            self._nonfinite_run += 1
            data = {"loss": _num(loss_v), "grad_norm": _num(gnorm), "run": self._nonfinite_run}
            if p.rollback and self._nonfinite_run >= p.max_nonfinite_run:
                self._rollback(step, "repeated-non-finite", onset=step - self._nonfinite_run + 1,
                               data=data)
                return False
            if p.skip_nonfinite:
                self._skip(step, "non-finite", data, bid)
                return False
            return True
        self._nonfinite_run = 0
        out = kinds.get("gradient-outlier")
        if out is not None:
            self._last_outlier = step
        if out is not None and p.outlier_action is not None:
            mean, sigma = self.stack.grad_stats
            data = {"loss": loss_v, "grad_norm": gnorm, "z": out.score,
                    "median": math.exp(mean), "sigma": sigma}
            if p.outlier_action == "skip":
                self._skip(step, "gradient-outlier", data, bid)
                return False
            target = math.exp(mean + p.clip_z * sigma)
            with torch.no_grad():
                grads = [q.grad for q in self._params if q.grad is not None]
                torch._foreach_mul_(grads, target / gnorm)
            self._record(step, "clip", "gradient-outlier", {**data, "clip_to": target})
            return True
        if "spike" in kinds:
            self._last_trouble = step
            self._on_spike(step, kinds["spike"], gnorm)
        div = kinds.get("divergence")
        if div is not None:
            self._last_trouble = step
            data = {"loss": loss_v, "baseline": div.baseline, "factor": loss_v / div.baseline}
            probe = self._probe_loss()
            if probe is not None and self._snaps and "probe_loss" in self._snaps[-1].guard:
                # the fixed batch says whether the model diverged or the batches changed
                ref = self._snaps[-1].guard["probe_loss"]
                data.update(probe_loss=_num(probe), probe_loss_at_snapshot=ref)
                if math.isfinite(probe) and probe < 2.0 * ref:
                    self._record(step, "hold", "divergence-not-on-probe-batch", data)
                    div = None
            if div is not None and p.rollback and p.restart_tolerance is not None:
                restart = lr_restart([st for st, _ in self._lrs], [lr for _, lr in self._lrs],
                                     self._highest_lr_before)
                lost = progress_lost(self._first, self._recent, div.baseline)
                if restart is not None and lost < p.restart_tolerance:
                    # the user's schedule brought the lr back to where this run trained
                    # before (a warm restart, a cyclic lr): the loss rises and comes back
                    # as the lr anneals; held while it gives back under restart_tolerance
                    # of the run's progress
                    data.update(cause="lr-restart", lr_jump=restart, progress_lost=lost)
                    self._record(step, "hold", "lr-schedule-restart", data)
                    div = None
            if div is not None and p.rollback:
                if getattr(div, "rule", "") in ("jump", "stays-high"):
                    self._level_divergence(step, div, data)
                else:
                    self._rollback(step, "divergence", onset=div.onset, data=data)
                return False
        self._maybe_restore(step)
        if (snap_due and not self.stack.in_excursion
                and (state == "full" or p.state_check_every is None)):
            # taken only after a full state read found everything finite (above): a
            # rollback target never holds the NaN it is meant to undo
            probe = self._probe_loss()
            extra = {} if probe is None or not math.isfinite(probe) else {"probe_loss": probe}
            # the oldest snapshot's CPU buffers are reused (no allocation every snapshot)
            old = self._snaps.pop(0) if len(self._snaps) >= p.keep_snapshots else None
            self._snaps.append(S.capture(step, self.model, self.optimizer, extra, into=old))
        return True

    def _nan_origin(self, step: int) -> None:
        """Where the NaN was born (:class:`stablestep.telemetry.nan_origin.OriginWatch`): at
        the first non-finite step of an incident, replay the step the Monitor kept
        (``MonitorConfig(keep_batch=True)``) on the weights that produced it (the step is
        not taken, so they are the pre-step snapshot) and record a ``nan-origin`` event;
        without a kept batch the event says so. Every rank decides alike, so every rank
        replays (the collectives of DDP/FSDP2 match)."""
        watch = getattr(self.monitor, "nan_watch", None)
        if watch is None:
            from stablestep.telemetry.nan_origin import NOT_KEPT

            log.info("guard step %d: where the NaN was born is unknown: %s", step, NOT_KEPT)
            return
        # under torch.distributed the Monitor leaves the replay to the guard (every rank
        # calls alike), so the ranks' replays can be gathered: the rank whose batch made it
        distributed = self._d is not None and getattr(
            getattr(self.monitor, "_rec", None), "world", 1) > 1
        watch.nonfinite(step, self.monitor.record_event, by="guard", new_incident=True,
                        gather=distributed)

    def _probe_loss(self) -> float | None:
        """The loss on the user's fixed batch (``curvature_loss``), or ``None`` without one;
        evaluated only at snapshots and divergence incidents, never per step."""
        if self.curvature_loss is None:
            return None
        with torch.no_grad():
            v = self.curvature_loss()
        v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        d = _dist()
        if d is not None:  # same decision on every rank
            tt = torch.tensor([v], dtype=torch.float64, device=self._device())
            d.all_reduce(tt)
            v = float(tt.item()) / d.get_world_size()
        return v

    def _level_divergence(self, step: int, div: Any, data: dict) -> None:
        """The policy for the stack's level rules (``rule`` ``"jump"``: the loss jumped
        ``jump.factor`` x over its best and stays; ``"stays-high"``: it rose ``jump.rearm`` x
        over its level and stays, or is still that high ``jump.hold`` records after a jump
        or a rollback): roll back to the snapshot before the onset and lower the lr, divided
        by the lr jump seen at the onset (the cause), else times ``lr_backoff``, and to
        ``min_lr_scale`` at once for an onset in the first ``jump.warmup`` steps (a blow-up
        from the start). A regime the guard already rolled back that stays high is cut by
        ``lr_backoff`` again; with the lr already at ``min_lr_scale``: :class:`GuardError`
        (the run needs a person)."""
        p = self.policy
        again = div.onset in self._rolled_onsets  # this regime was rolled back already
        if div.rule == "stays-high" and self.lr_scale <= p.min_lr_scale:
            raise GuardError(
                f"step {step}: the loss stays {div.value / div.baseline:.3g}x above its level "
                f"({div.baseline:.4g}) with the lr cut to {self.lr_scale:.4g}x "
                "(min_lr_scale); the run needs a person")
        lrj = None if again else self._lr_jump(div.onset, step)
        factor = (1.0 / lrj["factor"]) if lrj else p.lr_backoff
        if again:
            data["cause"] = "stays-high-after-rollback"
        elif lrj:
            data["cause"], data["lr_jump"] = "lr-jump", lrj
        else:
            data["cause"] = "loss-jump" if div.rule == "jump" else "stays-high"
        if div.rule == "stays-high":
            data["window_q20" if again else "level_q20"] = div.value
        if not lrj and div.onset < p.stack.jump.warmup:
            # blew up from the first updates: the lr is far past the edge, not near it;
            # cut to the bound at once (restored after calm steps)
            data["cause"] = ("stays-high-after-rollback, blow-up-from-start" if again
                             else "blow-up-from-start")
            factor = p.min_lr_scale / self.lr_scale
        self._rolled_onsets = (self._rolled_onsets + [int(div.onset)])[-8:]
        self._rollback(step, "divergence", onset=div.onset, data=data, lr_factor=factor)

    def _note_lr(self, step: int) -> None:
        """Keep the user's lr of the first param group for the last 256 checks (a float
        read; a tensor lr is not synced, so no lr jump is named with one)."""
        lr = self.optimizer.param_groups[0].get("lr")
        if isinstance(lr, (int, float)):
            self._lrs.append((step, float(lr)))
            del self._lrs[:-RESTART_WINDOW]
            if not self._lr_peaks or lr > self._lr_peaks[-1][1]:
                self._lr_peaks.append((step, float(lr)))
                del self._lr_peaks[:-256]

    def _lr_jump(self, onset: int, step: int, *, lead: int = 5,
                 min_factor: float = 2.0) -> dict[str, Any] | None:
        """``{"step", "from", "to", "factor"}`` when the lr rose ``min_factor`` x or more
        between ``onset - lead`` and ``step`` against the median of the 20 records before it
        (as :func:`stablestep.diagnosis.infer.lr_jump` reads a stored trace), else None."""
        lrs = self._lrs
        for k, (st, lr) in enumerate(lrs):
            if st < onset - lead or st > step or k == 0:
                continue
            prev = sorted(v for _, v in lrs[max(0, k - 20):k] if v > 0)
            if prev:
                med = prev[len(prev) // 2] if len(prev) % 2 else \
                    0.5 * (prev[len(prev) // 2 - 1] + prev[len(prev) // 2])
                if lr >= min_factor * med:
                    return {"step": st, "from": med, "to": lr, "factor": lr / med}
        return None

    def _highest_lr_before(self, step: int) -> float | None:
        """The highest user lr of the checks before ``step`` (None if none)."""
        before = [lr for st, lr in self._lr_peaks if st < step]
        return before[-1] if before else None

    def _skip(self, step: int, reason: str, data: dict, batch_id: Any) -> None:
        self.bad_batches.append(batch_id)
        self._record(step, "skip", reason, {**data, "batch": batch_id})

    def _on_spike(self, step: int, alarm: Any, gnorm: float) -> None:
        self.counts["spike"] += 1
        if not R.is_adam(self.optimizer):
            return
        p = self.policy
        if self._last_adapt is not None and step - self._last_adapt < p.adapt_cooldown:
            return
        if self._last_outlier is not None and step - self._last_outlier < p.stack.spike.window:
            return  # the echo of a bad batch (momentum carries it), not Adam's instability
        if step < p.stack.spike.window:
            return  # the run's noise is not learnt yet (a mean of a few records): no evidence
        self._aeos = [s for s in self._aeos if step - s < p.adapt_window] + [step]
        if p.adapt and len(self._aeos) >= p.adapt_after:
            evidence = {"spike_steps": list(self._aeos), "loss": alarm.value,
                        "baseline": alarm.baseline, "grad_norm": gnorm}
            g2v = R.g2v_rms(self.optimizer)
            if g2v is not None:
                evidence[names.G2V_RMS] = g2v
            self._aeos = []
            self._adapt(step, "adaptive-edge-of-stability", evidence)

    def _maybe_restore(self, step: int) -> None:
        """Undo one lr cut after ``restore_after`` steps without trouble."""
        p = self.policy
        if (p.restore_after is None or self.lr_scale >= 1.0
                or step - max(self._last_trouble, self._last_adapt or -1) < p.restore_after):
            return
        old = self.lr_scale
        self.lr_scale = min(1.0, self.lr_scale / p.lr_backoff)
        self._last_adapt = step
        self._record(step, "restore", "healthy",
                     {"lr_scale_old": old, "lr_scale": self.lr_scale,
                      "calm_steps": p.restore_after})

    # --------------------------------------------------------- rollback & adapt
    def _rollback(self, step: int, reason: str, *, onset: int, data: dict,
                  lr_factor: float | None = None) -> None:
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
        # The detector stack is not rewound: it watches the stream as recorded (the restored
        # loss reads as the spike's recovery), so a replay of the store sees the same.
        self._nonfinite_run, self._aeos, self._last_trouble = 0, [], step
        self._record(step, "rollback", reason,
                     {**data, "onset": onset, "to_step": snap.step, "lost_steps": step - snap.step})
        if p.adapt and lr_factor is not None:  # the loss jumped and stays: lower the lr
            old = self.lr_scale
            self.lr_scale = max(p.min_lr_scale, old * lr_factor)  # bounded, as in _apply
            self._last_adapt = step
            ev = {"rollback_reason": reason, "cause": data.get("cause")}
            if "lr_jump" in data:
                ev["lr_jump"] = data["lr_jump"]
            self._record(step, "adapt", "after-rollback",
                         {"remedy": "lr", "factor": self.lr_scale / old,
                          "lr_scale": self.lr_scale, **ev})
        elif p.adapt:
            self._adapt(step, "after-rollback", {"rollback_reason": reason})

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
        old = self.lr_scale
        self.lr_scale = max(self.policy.min_lr_scale, old * f)  # bounded
        out = {"remedy": "lr", "factor": self.lr_scale / old, "lr_scale": self.lr_scale}
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
        self.counts[action] = self.counts.get(action, 0) + 1
        log.log(logging.INFO if action in ("skip", "hold") else logging.WARNING,
                "guard step %d: %s (%s) %s", step, action, reason, _brief(data))
        if self.monitor is not None:
            self.monitor.record_event(step, names.EVENT_GUARD, rec.to_dict())
        for hook in list(self._hooks.values()):
            hook(rec)

    def register_action_hook(self, hook: Callable[[GuardRecord], None]) -> Any:
        """Call ``hook(record)`` on every action (e.g. to log it with the framework's own
        logger); returns a handle whose ``remove()`` unregisters it."""
        if not callable(hook):
            raise TypeError("hook must be callable with one GuardRecord")
        key = max(self._hooks, default=-1) + 1
        self._hooks[key] = hook
        return _Handle(self._hooks, key)

    def summary(self) -> dict[str, Any]:
        """What the guard did so far, in plain numbers: steps decided, skipped steps by
        reason (with their steps and batch ids), rollbacks (with reasons and steps lost),
        adaptations (remedies), lr restorations, the lr scale now, and AMSGrad/eps of the
        param groups. Log it at close; the callbacks pass it to the framework's logger."""
        skips: dict[str, list[int]] = {}
        for r in self.records:
            if r.action == "skip":
                skips.setdefault(r.reason, []).append(r.step)
        rb = [r for r in self.records if r.action == "rollback"]
        return {
            "steps": self._checks,
            "skipped": sum(len(v) for v in skips.values()),
            "skipped_by_reason": {k: len(v) for k, v in skips.items()},
            "skipped_steps": skips,
            "bad_batches": list(self.bad_batches),
            "clipped": self.counts.get("clip", 0),
            "rollbacks": len(rb),
            "rollback_reasons": [r.reason for r in rb],
            "steps_lost": sum(int(r.data.get("lost_steps", 0)) for r in rb),
            "adaptations": [r.data.get("remedy") for r in self.records if r.action == "adapt"],
            "restorations": self.counts.get("restore", 0),
            "holds": self.counts.get("hold", 0),
            "lr_scale": self.lr_scale,
            "spikes_seen": self.counts.get("spike", 0),
            "amsgrad": [bool(g.get("amsgrad", False)) for g in self.optimizer.param_groups],
            "eps": [float(g["eps"]) for g in self.optimizer.param_groups if "eps" in g],
        }

    # ------------------------------------------------------------------ signals
    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _signals(self, loss: torch.Tensor | float,
                 check_state: str | None) -> tuple[float, float, float]:
        """(loss, gradient norm, state norm) in one host read. The state norm covers the
        parameters (``check_state="params"``), the parameters and the optimizer state
        (``"full"``), or nothing (``None``: 0.0). Under torch.distributed they are
        all-reduced (loss and replicated gradients: mean over ranks; FSDP2 shards: squared
        norms summed over ranks).
        With a Monitor that just read this step (not distributed), its loss and per-tensor
        squared gradient norms, still on the device, are reused (no second gradient norm),
        and on its detailed steps its parameter norms too; they go into the same read."""
        if self._d is not None:
            return self._signals_dist(loss, check_state)
        pend = _monitor_partials(self.monitor)
        scalars: list[torch.Tensor] = []  # 0-d tensors, read in one stack
        vectors: list[torch.Tensor] = []  # 1-d tensors, appended after them
        loss_f = None
        if pend is not None and "loss" in pend:
            scalars.append(pend["loss"])
        elif isinstance(loss, torch.Tensor):
            lt = loss.detach()
            scalars.append(lt if lt.dim() == 0 else lt.reshape(()))
        else:
            loss_f = float(loss)
        if pend is not None:
            vectors.append(pend["grad_sq"])  # per-tensor squared norms
            n_grad = 0
        else:
            gnorms = _norms([g for g in (q.grad for q in self._params) if g is not None])
            scalars += gnorms
            n_grad = len(gnorms)
        n_state = 0
        if check_state:
            params = []
            if pend is not None and "param_sq" in pend:
                vectors.append(pend["param_sq"])
            else:
                params = [q.data for q in self._params]
            st = _norms(params + (self._state_tensors() if check_state == "full" else []))
            scalars += st
            n_state = len(st)
        parts = []
        if scalars:
            dev = scalars[-1].device  # the gradients' (the loss may live elsewhere)
            if scalars[0].device != dev:
                scalars[0] = scalars[0].to(dev)
            parts.append(torch.stack(scalars))
        if vectors:
            dev = parts[0].device if parts else vectors[0].device
            parts = [x.to(dev, torch.float64) for x in parts + vectors]
        if not parts:
            return float(loss_f), 0.0, 0.0  # no gradients, no state: nothing to read
        vals = parts[0] if len(parts) == 1 else torch.cat(parts)
        host = vals.tolist()  # the one host read of the step (float32 values are exact)
        k = 0
        if loss_f is None:
            loss_f, k = host[0], 1
        if pend is not None:
            gsq = math.fsum(host[k + n_grad + n_state:][:pend["grad_sq"].numel()])
            extra = host[k + n_state + pend["grad_sq"].numel():]
        else:
            gsq = math.fsum(x * x for x in host[k:k + n_grad])
            extra = []
        state_v = 0.0
        if check_state:
            state = host[k + n_grad:k + n_grad + n_state]
            state_v = math.sqrt(math.fsum(x * x for x in state) + math.fsum(extra))
        return float(loss_f), math.sqrt(gsq), float(state_v)

    def _state_tensors(self) -> list[torch.Tensor]:
        """The optimizer's floating-point state tensors (moments, AMSGrad's max, momentum
        buffers), as local shards."""
        out = []
        for q in self._params:
            st = self.optimizer.state.get(q)
            if st:
                out += [local(v) for k, v in st.items() if isinstance(v, torch.Tensor)
                        and k != "step" and v.is_floating_point() and v.dim() > 0]
        return out

    def _signals_dist(self, loss: torch.Tensor | float,
                      check_state: str | None) -> tuple[float, float, float]:
        """:meth:`_signals` under torch.distributed: one all-reduce, then one host read."""
        d = self._d
        tensors: list[torch.Tensor] = []
        if check_state:
            tensors = [local(q.detach()) for q in self._params]
            if check_state == "full":
                tensors += self._state_tensors()
        grads = [q.grad.detach() for q in self._params if q.grad is not None]
        # FSDP2 gradients are DTensor shards: this rank's part, squared norms summed
        shard = [local(g) for g in grads if is_sharded(g)]
        grads = [local(g) for g in grads if not is_sharded(g)]
        dev = (grads or shard)[0].device if grads or shard else self._device()
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        gn = (stack_scalars([n.to(dev) for n in _norms(grads)]).square().sum().sqrt()
              if grads else zero)
        gs = (stack_scalars([n.to(dev) for n in _norms(shard)]).square().sum()
              if shard else zero)
        lt = (loss.detach().double().reshape(()).to(dev) if isinstance(loss, torch.Tensor)
              else torch.tensor(float(loss), dtype=torch.float64, device=dev))
        parts = [lt, gn, gs]
        if tensors:
            parts.append(stack_scalars([n.to(dev) for n in _norms(tensors)]).double().sum())
        vals = torch.stack(parts)
        d.all_reduce(vals)  # NaN/Inf on any rank reaches every rank
        vals[:2] /= d.get_world_size()
        vals[3:] /= d.get_world_size()
        host = vals.tolist()  # the one host read
        loss_v, gnorm, shard_sq = host[:3]
        state_v = host[3] if tensors else 0.0
        return float(loss_v), math.sqrt(gnorm * gnorm + shard_sq), float(state_v)

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
        """Everything needed to continue identically: counters, records, lr scale, bad batch
        ids, the detector stack and the snapshots (CPU tensors; save with ``torch.save``).
        eps and AMSGrad live in the optimizer's param groups and are saved with its
        state_dict; the lr there is always the user's own (the scale is applied only inside
        ``optimizer.step()``), so loading both never applies the scale twice."""
        return {"step": self._step, "checks": self._checks, "lr_scale": self.lr_scale,
                "counts": dict(self.counts),
                "records": [r.to_dict() for r in self.records],
                "bad_batches": list(self.bad_batches),
                "nonfinite_run": self._nonfinite_run, "aeos": list(self._aeos),
                "ladder": self._ladder, "last_adapt": self._last_adapt,
                "last_outlier": self._last_outlier, "last_trouble": self._last_trouble,
                "stack": self.stack.state_dict(), "lrs": [list(x) for x in self._lrs],
                "lr_peaks": [list(x) for x in self._lr_peaks], "first": list(self._first),
                "recent": list(self._recent),
                "rolled_onsets": list(self._rolled_onsets),
                "snapshots": [S.to_state(s) for s in self._snaps],
                "policy": self.policy.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the policy given to the constructor is kept).
        The lr scale is *set* to the saved one (never multiplied into the current one)."""
        self._step, self.lr_scale = int(state["step"]), float(state["lr_scale"])
        self._checks = int(state.get("checks", state["step"]))  # older states: the step
        self.counts = dict(state["counts"])
        self.records = []
        for r in state["records"]:
            r = dict(r)
            self.records.append(GuardRecord(step=r.pop("step"), action=r.pop("action"),
                                            reason=r.pop("reason"), data=r))
        self.bad_batches = list(state.get("bad_batches", []))
        self._nonfinite_run = int(state["nonfinite_run"])
        self._aeos, self._ladder = [int(s) for s in state["aeos"]], int(state["ladder"])
        self._last_adapt = state["last_adapt"]
        self._last_outlier = state["last_outlier"]
        self._last_trouble = int(state.get("last_trouble", -1))
        self.stack.load_state_dict(state["stack"])
        self._lrs = [(int(a), float(b)) for a, b in state.get("lrs", [])]
        self._lr_peaks = [(int(a), float(b)) for a, b in state.get("lr_peaks", [])]
        self._first = [float(v) for v in state.get("first", [])]
        self._recent = deque((float(v) for v in state.get("recent", [])), maxlen=10)
        self._rolled_onsets = [int(x) for x in state.get("rolled_onsets", [])]
        self._snaps = [S.from_state(s) for s in state["snapshots"]]

    def close(self) -> None:
        """Log the :meth:`summary` (one line, WARNING if the guard acted, else INFO) and
        remove the optimizer hooks (the lr scale stops being applied)."""
        if self._handles:
            s = self.summary()
            acted = s["skipped"] or s["clipped"] or s["rollbacks"] or s["adaptations"]
            log.log(logging.WARNING if acted else logging.INFO,
                    "guard summary after %d steps: %d skipped %s, %d clipped, %d rollbacks "
                    "(%d steps lost), adaptations %s, lr scale %.4g", s["steps"], s["skipped"],
                    s["skipped_by_reason"], s["clipped"], s["rollbacks"], s["steps_lost"],
                    s["adaptations"] or "none", s["lr_scale"])
        for h in self._handles:
            h.remove()
        self._handles = []


def skip_batches(batches: Iterable[Any], bad: Iterable[Any], *,
                 batch_id: Callable[[int, Any], Any] | None = None) -> Iterator[Any]:
    """Yield the batches of ``batches`` whose id is not in ``bad`` (e.g. a resumed run's
    ``guard.bad_batches``): the id of the ``i``-th batch is ``batch_id(i, batch)``, by default
    ``i`` (the step, when one epoch of a deterministic loader is one pass over the steps).

    Example::

        for x, y in skip_batches(loader, state["guard"]["bad_batches"],
                                 batch_id=lambda i, b: int(b[2][0])):  # sample id column
            ...
    """
    drop = set(bad)
    for i, b in enumerate(batches):
        if (i if batch_id is None else batch_id(i, b)) not in drop:
            yield b


class _Handle:
    """Removable handle of :meth:`Guard.register_action_hook`."""

    def __init__(self, hooks: dict, key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        """Unregister the hook."""
        self._hooks.pop(self._key, None)


def _monitor_partials(monitor: Any) -> dict[str, torch.Tensor] | None:
    """The Monitor's device-side norms for the step being decided
    (:meth:`stablestep.Monitor.device_partials`); ``None`` without a Monitor or when it did
    not record this step. Not used under torch.distributed, where the Monitor's partials
    are this rank's own (the guard all-reduces its own)."""
    read = getattr(monitor, "device_partials", None)
    return read() if callable(read) else None


@torch.no_grad()
def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One L2 norm per tensor (0-d, float32 or wider: a half-precision norm would overflow
    at 65504), in one fused call, outside autograd (no ``detach`` per tensor needed)."""
    if not tensors:
        return []
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32) if low
                else torch._foreach_norm(tensors))


def _brief(data: dict) -> str:
    keys = ("loss", "grad_norm", "z", "remedy", "lr_scale", "to_step", "lost_steps", "batch")
    return " ".join(f"{k}={_fmt(data[k])}" for k in keys if k in data)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _num(x: float) -> float | str:
    """A JSON-safe number: non-finite values as strings ("nan", "inf")."""
    return x if math.isfinite(x) else str(x)
