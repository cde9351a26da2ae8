r"""Keras 3 callback: Adam's telemetry read from the Keras optimizer's own variables.

Keras 3's Adam (and AdamW, and AMSGrad) use the TensorFlow "epsilon hat" convention::

    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
    w   -= lr_t * m / (sqrt(v) + eps_hat)        # v -> velocity_hat = max(v) under AMSGrad

so the effective per-coordinate step (the diagonal of Adam's :math:`P^{-1}`, applied to the
raw first moment ``m``) is

.. math::

    s_i = \frac{\mathrm{lr}\,\sqrt{1-\beta_2^t}}{(1-\beta_1^t)\,(\sqrt{v_i} + \hat\epsilon)}
        = \frac{\mathrm{lr}/(1-\beta_1^t)}{\sqrt{\hat v_i} + \hat\epsilon/\sqrt{1-\beta_2^t}},

the PyTorch-convention formula with :math:`\epsilon_t = \hat\epsilon/\sqrt{1-\beta_2^t}`
(``eps_mode="tf"`` in :mod:`stablestep.optim.inspect`). :class:`StablestepCallback` hands
Keras' ``momentums``, ``velocities``, ``velocity_hats`` and ``iterations``, as torch tensors
(:class:`~stablestep.telemetry.probes.StepTensors`, one
:class:`~stablestep.telemetry.probes.AdamTensor` per variable), to the Monitor's own
:class:`~stablestep.telemetry.recorder.Recorder`: the same statistics, metric names, store
rules, sinks and non-finite events as :class:`stablestep.Monitor`, with no optimizer object.

Keras does not hand gradients to callbacks; on detailed steps the gradient Adam used is
recovered exactly from two consecutive first moments,
:math:`g_t = (m_t - \beta_1 m_{t-1}) / (1-\beta_1)` (after Keras' own clipping, before
weight decay), and the update from the weights before and after the step.

With ``guard=`` (torch backend only) a :class:`stablestep.guard.Guard` decides each step
*before* Keras applies it: for the duration of ``fit`` the Keras optimizer's ``apply`` (which
``apply_gradients`` and Keras' torch ``train_step`` call) is wrapped, so a refused step is
never applied (weights, slots and ``iterations`` untouched), and ``on_train_end`` puts the
method back. The Guard sees the Keras variables through two thin torch views
(:class:`_KerasModuleView`, :class:`_KerasOptimizerView`) that share their tensors, so its
snapshots and rollbacks copy Keras' own storage in place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stablestep.integrations._common import (
    LOG_PREFIX,
    GuardReport,
    guard_policy,
    make_parent,
    monitor_config,
    resolve_store,
)
from stablestep.optim.inspect import GroupHyper
from stablestep.telemetry import names as N
from stablestep.telemetry._common import default_run_name, utc_now
from stablestep.telemetry.config import UNSET, MonitorConfig
from stablestep.telemetry.probes import AdamTensor, StepTensors, step_stats
from stablestep.telemetry.recorder import Recorder
from stablestep.telemetry.store import Run, open_run

try:  # Keras picks its backend itself (KERAS_BACKEND, ~/.keras/keras.json); we never set it
    import keras
except ImportError as exc:  # e.g. the configured backend (default: tensorflow) is missing
    raise ImportError(
        f"stablestep.integrations.keras needs Keras 3 with an installed backend ({exc}); "
        "set KERAS_BACKEND=torch (or jax, tensorflow) before importing keras"
    ) from exc

log = logging.getLogger("stablestep.integrations.keras")

DEFAULT_LOG_DIR = "logs"
"""Where the store goes by default: ``keras.callbacks.TensorBoard``'s default ``log_dir``."""

LOGGED = (N.EFF_STEP_MAX, N.G2V_RMS, N.EPS_SHARE, N.GRAD_NORM)
"""Statistics written into Keras' epoch ``logs`` (and so ``History``) by default."""


def _host(x: Any) -> float:
    """A Keras scalar (variable, tensor, schedule output, Python number) as a float."""
    if isinstance(x, (int, float)):
        return float(x)
    value = getattr(x, "value", x)
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).item())
    return float(np.asarray(keras.ops.convert_to_numpy(x)))


def _tensor(var: Any) -> torch.Tensor:
    """A Keras variable's value as a torch tensor (a view on the torch backend)."""
    if keras.backend.backend() == "torch":
        return var.value.detach()
    return torch.from_numpy(np.array(keras.ops.convert_to_numpy(var)))


def _inner(optimizer: Any) -> Any:
    """The optimizer doing the update (unwraps ``keras.optimizers.LossScaleOptimizer``)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def keras_hyper(optimizer: Any, lr: float) -> GroupHyper:
    """The hyperparameters of a Keras 3 optimizer as stablestep's :class:`GroupHyper`.

    ``keras.optimizers.Adam``/``AdamW``: ``kind="adam"``, ``eps_mode="tf"`` (``epsilon`` is
    Keras' epsilon hat). ``SGD``: ``kind="sgd"``. Others: ``kind="other"``. Keras applies
    ``weight_decay`` to the weights directly, so it is always decoupled.
    """
    opt = _inner(optimizer)
    wd = float(getattr(opt, "weight_decay", None) or 0.0)
    if isinstance(opt, keras.optimizers.Adam):
        return GroupHyper(
            kind="adam",
            lr=lr,
            beta1=float(opt.beta_1),
            beta2=float(opt.beta_2),
            eps=float(opt.epsilon),
            eps_mode="tf",
            amsgrad=bool(opt.amsgrad),
            weight_decay=wd,
            decoupled_weight_decay=wd > 0,
        )
    if isinstance(opt, keras.optimizers.SGD):
        return GroupHyper(
            kind="sgd",
            lr=lr,
            momentum=float(opt.momentum),
            nesterov=bool(opt.nesterov),
            weight_decay=wd,
            decoupled_weight_decay=wd > 0,
        )
    return GroupHyper(kind="other", lr=lr)


class _EpochMax:
    """A sink inside the callback: the epoch's largest value of each ``log_metrics`` name,
    seen as the recorder writes the steps (it flushes at every epoch's end)."""

    def __init__(self, cb: StablestepCallback):
        self.cb = cb

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Keep the maxima of this epoch."""
        epoch = self.cb._epoch
        for name in self.cb.log_metrics:
            if name in metrics:
                epoch[name] = max(epoch.get(name, -math.inf), metrics[name])

    def event(self, step: int, kind: str, data: dict) -> None:
        """Events do not go into ``logs``."""

    def close(self) -> None:
        """Nothing to close."""


class _KerasModuleView(torch.nn.Module):
    """What the Guard snapshots of a Keras model: every variable of the model (trainable and
    not, e.g. BatchNorm's moving statistics) registered once, sharing Keras' torch storage
    (``model.state_dict()`` lists each variable twice in functional models)."""

    def __init__(self, model: Any):
        super().__init__()
        for i, v in enumerate(model.variables):
            self.register_parameter(f"v{i}", v.value)


class _KerasOptimizerView(torch.optim.Optimizer):
    """What the Guard sees of a Keras optimizer: one param group over the model's trainable
    variables (Keras' torch parameters, whose ``.grad`` Keras' ``train_step`` fills) with
    ``lr`` = the user's learning rate of this step, and, as the ``state`` of the first
    parameter, every optimizer variable except the learning rate (``iterations``, moments,
    velocities... sharing Keras' storage), so a snapshot holds them and a rollback restores
    them in place. The group has no ``betas``: the Guard's Adam-only remedies (AMSGrad, eps)
    would change this view, not Keras, so they stay off; its lr cut (``lr_scale``) is
    applied by the callback. ``step()`` is never called."""

    def __init__(self, optimizer: Any, variables: Sequence[Any]):
        params = [v.value for v in variables]
        super().__init__(params, {"lr": 0.0})
        lr_var = optimizer._learning_rate
        slots = {
            f"slot{i}": v.value
            for i, v in enumerate(optimizer.variables)
            if v is not lr_var and isinstance(v.value, torch.Tensor)
        }
        if params:
            self.state[params[0]] = slots

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never called
        """Not used: Keras applies the update."""
        raise RuntimeError("the Keras optimizer applies the update, not this view")


class _Events:
    """The Guard's ``monitor`` for events only: ``record_event`` writes into the run."""

    def __init__(self, cb: StablestepCallback):
        self.cb = cb

    def record_event(self, step: int, kind: str, data: dict) -> None:
        """Write one event into the store (and the sinks)."""
        self.cb._recorder().event(step, kind, data)


class StablestepCallback(keras.callbacks.Callback):
    """Record what Keras' Adam does, step by step, in a stablestep run store.

    Works on whatever backend Keras is configured with (``KERAS_BACKEND`` or
    ``~/.keras/keras.json``; importing this module never sets it). On torch the optimizer's
    variables are read in place; on JAX and TensorFlow each detailed step copies them to the
    host once::

        import os; os.environ.setdefault("KERAS_BACKEND", "torch")  # your choice, before keras
        import keras, numpy as np
        from stablestep.integrations.keras import StablestepCallback

        x = np.random.rand(256, 8).astype("float32"); y = x.sum(1, keepdims=True)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "tanh"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        cb = StablestepCallback(run="keras-adam")          # store: logs/stablestep.db
        hist = model.fit(x, y, batch_size=32, epochs=5, callbacks=[cb], verbose=0)
        hist.history["stablestep/eff_step_max"]            # per epoch, next to "loss"
        # then: stablestep diagnose logs/stablestep.db  /  stablestep report logs/stablestep.db

    Steps are counted from 0 by train batches (one record per ``on_train_batch_end``).
    Recorded:

    * every ``every`` steps: ``loss`` (this batch's loss: the sample-weighted batch mean
      Keras optimised, read from Keras' running mean ``model._loss_tracker``, see below;
      ``logs["loss"]`` when the model has no such tracker) and ``lr`` (the learning rate
      this step used, schedules included);
    * every ``state_every`` steps (``None``: off): ``param_norm``, ``update_norm``,
      ``update_ratio``; for ``keras.optimizers.Adam``/``AdamW`` also ``grad_norm``,
      ``grad_nonfinite``, ``grad_norm/<variable path without the model's name>``, ``update_cos``,
      ``eff_step_p50/p90/p99/max``, ``eps_share``, ``g2v_rms``, ``g2v_max``,
      ``amsgrad_gap`` and the ``top_k`` worst tensors, exactly as the Monitor computes
      them (module docstring for the epsilon-hat math). These steps copy the weights and
      first moments once before the batch;
    * at each epoch's end, the validation metrics Keras computed (``val_loss``, ``val_<metric>``)
      at the epoch's last step.

    Into Keras' epoch ``logs`` (hence ``History``, and ``keras.callbacks.TensorBoard`` when it
    comes after this callback) go ``stablestep/<name>`` for each name in ``log_metrics``: the
    largest value recorded during the epoch (NaN in an epoch that recorded none).

    ``steps_per_execution = k > 1`` (JAX and TensorFlow; the torch backend refuses it): Keras
    calls callbacks once per ``k`` batches, so one record covers ``k`` steps and is stored at
    the last of them. Its loss is the mean over the ``k`` batches; the effective-step
    quantiles, ``eps_share`` and ``amsgrad_gap`` are exact (they read only the second moment);
    the gradient cannot be recovered from moments ``k`` steps apart, so ``grad_norm``,
    ``g2v_rms``/``g2v_max`` and the update statistics are not recorded (a warning says so
    once). Use ``steps_per_execution=1`` to see them.

    The batch loss: Keras keeps only a float32 running sum of the epoch's losses, whose
    differences lose the digits of small losses late in a long epoch. So on the torch and
    TensorFlow backends the callback zeroes the tracker's ``total``/``count`` before a
    recorded batch, reads this batch's own sum after it, and puts back ``old + batch``:
    the same float32 addition Keras does, so ``History`` is bit-identical. On JAX (whose
    fit loop does not see writes from callbacks) the loss is the difference of the
    running sums (float32 precision of the sum). After a non-finite batch Keras' running
    loss stays non-finite until the epoch ends; on JAX the following batches of that
    epoch are then reported non-finite too.

    A non-finite loss or statistic is never stored as a number: the value is missing
    and a ``non-finite`` event says what (``what``; ``tensors``: non-finite gradient
    entries per variable).

    ``Run.config`` holds ``optimizer`` (``keras.Adam`` ...), ``hyper``
    (``eps_mode="tf"``, Keras' epsilon), ``keras_version``, ``keras_backend``.
    Resume with ``cb.load_state_dict(sd)`` before ``fit``; several ``fit`` calls with
    one callback continue one run. Each ``fit`` ends with everything written; :meth:`close`
    after the last one closes the store and the sinks.

    The seatbelt (torch backend): ``guard=True`` (default policy) or ``guard=GuardPolicy(...)``
    adds a :class:`stablestep.guard.Guard` that decides each step *before* Keras applies it.
    For the duration of each ``fit`` the optimizer's ``apply`` is wrapped (put back at
    ``on_train_end``): the guard reads this batch's loss and the gradients Keras' torch
    ``train_step`` left in the variables' ``.grad`` (before Keras' own clipping), and a refused
    step (non-finite loss or gradient, outlier batch) is simply not applied: weights, moments
    and ``iterations`` stay as they were. A rollback copies the last snapshot (on the CPU,
    every ``snapshot_every`` steps: all model variables, all optimizer variables but the
    learning rate, ``iterations`` included) back into Keras' variables in place; the data
    goes on with the next batch. Keras' clock is ``iterations`` (optimizer steps taken), so
    a skipped step does not advance a ``LearningRateSchedule`` and a rollback rewinds it by
    the steps lost. The lr cut is ``guard.lr_scale``, applied to the learning rate (variable
    or schedule) only inside the wrapped ``apply`` and restored right after, so the
    optimizer's saved learning rate stays the user's. The guard's AMSGrad/eps remedies are
    off here (they are written into torch param groups, which Keras does not read); its only
    adaptation is the bounded lr cut, restored after calm steps. Cost per step: one host read
    (loss, gradient norm, non-finite flag; the Guard's) plus reading the learning rate and
    Keras' loss tracker; snapshots cost one CPU copy of model + optimizer variables.
    Not supported with the guard: ``LossScaleOptimizer`` (mixed float16), gradient
    accumulation (``gradient_accumulation_steps``), ``jit_compile=True``. Forward-pass
    updates of non-trainable variables (BatchNorm's moving statistics) on a skipped batch
    are Keras' and stay; a rollback restores them.

    Every action is a ``logging`` line (logger ``stablestep.guard``), a ``guard`` event in
    the store (``stablestep diagnose STORE`` shows it) and numbers in Keras' ``logs`` (batch
    and epoch, hence ``History``): ``stablestep/guard_skip``, ``_clip``, ``_rollback``,
    ``_adapt``, ``_restore`` (totals) and ``stablestep/guard_lr_scale``, the same keys as the
    Lightning and HF callbacks. The ``lr`` recorded is the one applied (the guard's scale
    included). Keras' running ``loss`` still includes a skipped batch's loss (so a NaN batch
    makes the epoch's reported loss NaN, and ``TerminateOnNaN`` still stops the run). The
    guard's state (counters, detectors, snapshots) is in :meth:`state_dict`.

    Args:
        config: a :class:`~stablestep.telemetry.config.MonitorConfig` (or a dict of run
            config extras), the settings the Monitor takes: ``every``, ``state_every``,
            ``top_k``, ``quantile_sample``, ``flush_every``, ``flush_seconds``, ``sinks``,
            ``overwrite``, ``extra``; ``settings`` (the same names as keywords) win over its
            fields. ``curvature_every`` is refused: the curvature probe needs a torch
            optimizer.
        store: path of the SQLite run store, or a directory to hold ``stablestep.db``;
            default ``logs/stablestep.db`` (``logs`` is ``keras.callbacks.TensorBoard``'s
            default directory). Created when the first step is written.
        run: the run's name (default ``run-<UTC time>-<random>``). A name already in the
            store starts a new run under a suffixed name (:attr:`run_name` says which)
            unless ``overwrite=True``, which replaces the old run.
        overwrite: replace a stored run of the same name instead of suffixing.
        log_metrics: names whose epoch maximum goes into Keras' ``logs`` (``()``: none).
        guard: ``None`` (off), ``True`` (default policy) or a ``GuardPolicy``; torch
            backend only.
    """

    def __init__(
        self,
        *,
        config: MonitorConfig | dict[str, Any] | None = None,
        store: str | os.PathLike | None = None,
        run: str | None = None,
        overwrite: bool = UNSET,
        log_metrics: Sequence[str] = LOGGED,
        guard: Any = None,
        **settings: Any,
    ):
        super().__init__()
        self.config = monitor_config(config, overwrite=overwrite, **settings)
        self._policy = guard_policy(guard)
        if self._policy is not None and keras.backend.backend() != "torch":
            raise ValueError(
                f"guard: needs Keras' torch backend (this one is {keras.backend.backend()!r}); "
                "set KERAS_BACKEND=torch before importing keras"
            )
        self.guard: Any = None  # the stablestep.guard.Guard, built at the first fit
        self._guard_state: dict[str, Any] | None = None  # from load_state_dict
        self._guarded: Any = None  # the Keras optimizer whose apply is wrapped now
        self._guard_opt: Any = None  # the Keras optimizer the guard was built on
        self._armed = False  # a batch of our fit is running: the wrapper decides
        self._report = GuardReport()
        if self.config.curvature_every is not None:
            raise ValueError(
                "curvature_every: the curvature probe needs a torch optimizer; Keras' is not one"
            )
        self.store = resolve_store(store, DEFAULT_LOG_DIR)
        self._run_name = run or default_run_name()
        self.log_metrics = tuple(log_metrics)
        self._step = 0
        self._resume_from: int | None = None
        self._rec: Recorder | None = None
        self._begin: tuple | None = None
        self._begin_batch: int | None = None
        self._track: tuple | None = None  # the loss tracker before this batch (guard on)
        self._epoch: dict[str, float] = {}  # this epoch's maxima, for ``logs``
        self._logged: set[str] = set()
        self._warned_spe = False

    @property
    def step(self) -> int:
        """Index of the next train batch this callback will record."""
        return self._step

    @property
    def run_name(self) -> str:
        """The run's name in the store (with the store's suffix when the name was taken)."""
        return self._rec.run_name if self._rec is not None else self._run_name

    @property
    def sinks(self) -> list[Any]:
        """The sinks records are written to (``config.sinks``)."""
        return list(self.config.sinks)

    # ------------------------------------------------------------ keras hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        """Attach the recorder (the Monitor's) to this model's variables; with ``guard=``,
        build the guard and wrap the optimizer's ``apply`` for this ``fit``."""
        self._recorder()
        if self._policy is not None:
            self._attach_guard()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Start the epoch's maxima for ``logs``."""
        self._epoch = {}

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Read the lr, Keras' running loss and (detailed steps) weights and moments."""
        s = self._step
        k = max(int(getattr(self.model, "steps_per_execution", 1) or 1), 1)
        cfg = self.config
        se = cfg.state_every
        detail = se is not None and (s % se == 0 or (s + k - 1) // se != s // se)
        self._begin_batch = batch
        self._armed = self._guarded is not None
        self._track = self._tracker() if self._armed else None  # this batch alone, for the guard
        if not (any((s + i) % cfg.every == 0 for i in range(k)) or detail):
            self._begin = None
            return
        opt = self.model.optimizer
        lr = _host(opt.learning_rate)  # the value this step will use (schedules: at t-1)
        tracker = self._track if self._armed else self._tracker()
        self._begin = (lr, tracker, self._snapshot(opt) if detail else None)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Complete the record of this step (or execution of ``k`` steps) and hand it to the
        recorder."""
        begin_batch = self._begin_batch if self._begin_batch is not None else batch
        k = max(int(batch) - int(begin_batch) + 1, 1)
        s = self._step + k - 1  # the record is stored at the execution's last step
        self._step += k
        self._armed = False
        begin, self._begin = self._begin, None
        track, self._track = self._track, None
        if self.guard is not None:
            self._guard_logs(logs)
        if begin is None:
            if track is not None:
                self._batch_loss(track, logs)  # put Keras' running loss back
            return
        lr, tracker, snap = begin
        loss = self._batch_loss(tracker, logs)
        rec = self._recorder()
        if self.guard is not None:
            lr *= self.guard.lr_scale  # the lr applied
        host = {N.LR: lr}
        st = StepTensors(loss, self._torch_grads(k))
        if snap is not None:
            st, partial = self._detail(st, snap, lr)
            if partial is not None:  # host metrics only (k > 1 steps, or not Adam)
                host.update(partial)
        rec.record(s, st, host=host, per_tensor=st.neg_update is not None)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Record the validation metrics and write this epoch's statistics into ``logs``."""
        rec = self._recorder()
        rec.flush()  # one host transfer per epoch for the steps still on the device
        if logs is None:
            return
        val = {}
        for key, value in logs.items():
            if key.startswith("val_"):
                try:
                    val[key] = _host(value)
                except (TypeError, ValueError):
                    continue
        if val and self._step > 0:
            rec.emit(self._step - 1, val)
        for name in self.log_metrics:
            if name in self._epoch or name in self._logged:  # same keys every epoch
                self._logged.add(name)
                logs[f"{LOG_PREFIX}{name}"] = self._epoch.get(name, math.nan)
        if self.guard is not None:
            self._guard_logs(logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        """Write everything recorded and put the optimizer's ``apply`` back; a later ``fit``
        continues the same run (and the same guard)."""
        self._detach_guard()
        if self._rec is not None:
            self._rec.flush()

    def close(self) -> None:
        """Flush and close the store and the sinks (after the last ``fit``); with a guard,
        log its summary."""
        self._detach_guard()
        if self.guard is not None:
            self._guard_state = self.guard.state_dict()
            self._report.detach()
            self.guard.close()
            self.guard = None
        if self._rec is not None:
            self._rec.close()
            self._run_name = self._rec.run_name
            self._resume_from = self._step
            self._rec = None

    # ------------------------------------------------------------------- guard
    def _attach_guard(self) -> None:
        """Build the guard over views of this model and optimizer (again when ``compile``
        gave the model a new optimizer, carrying its state) and wrap ``apply``."""
        model, opt = self.model, self.model.optimizer
        if opt is None:
            raise ValueError("guard: the model has no optimizer (call model.compile first)")
        if _inner(opt) is not opt:
            raise ValueError(
                "guard: keras.optimizers.LossScaleOptimizer (mixed float16) is not supported; "
                "use float32 or bfloat16"
            )
        if (getattr(opt, "gradient_accumulation_steps", None) or 1) > 1:
            raise ValueError("guard: gradient_accumulation_steps > 1 is not supported")
        if getattr(model, "jit_compile", False):
            raise ValueError("guard: jit_compile=True is not supported (compile with "
                             "jit_compile=False)")
        if not opt.built:
            opt.build(model.trainable_variables)
        if self.guard is not None and self._guard_opt is not opt:
            self._guard_state = self.guard.state_dict()
            self._report.detach()
            self.guard.close()
            self.guard = None
        if self.guard is None:
            from stablestep.guard import Guard

            view = _KerasOptimizerView(opt, model.trainable_variables)
            self.guard = Guard(
                _KerasModuleView(model), view, policy=self._policy, monitor=_Events(self),
                start_step=self._step,
            )
            self._guard_opt = opt
            if self._guard_state is not None:
                self.guard.load_state_dict(self._guard_state)
                self._guard_state = None
            self._report.attach(self.guard)
        self._detach_guard()
        original = type(opt).apply.__get__(opt)  # the class's method: never a stale wrapper

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            if not self._armed or self.guard is None:  # outside our fit's batches
                return original(grads, trainable_variables)
            self._armed = False
            if not self._decide(opt):
                return None  # refused: nothing applied
            return self._apply_scaled(opt, original, grads, trainable_variables)

        vars(opt)["apply"] = apply  # an instance attribute: bypasses Keras' tracking
        self._guarded = opt

    def _detach_guard(self) -> None:
        """Put the optimizer's own ``apply`` back."""
        if self._guarded is not None:
            vars(self._guarded).pop("apply", None)
            self._guarded = None
        self._armed = False

    def _decide(self, opt: Any) -> bool:
        """``guard.check`` on this batch's loss (Keras' loss tracker, zeroed before the
        batch, holds this batch alone) and the gradients in ``.grad``."""
        view = self.guard.optimizer
        view.param_groups[0]["lr"] = _host(opt.learning_rate)  # the user's, for lr jumps
        tr = self._loss_tracker() if self._track is not None else None
        if tr is not None:
            loss: Any = tr.total.value.detach() / tr.count.value.detach()
        else:  # no tracker: the loss detectors see nothing (a non-positive loss is ignored)
            loss = 0.0
        return self.guard.check(loss)

    def _apply_scaled(self, opt: Any, original: Any, grads: Any, variables: Any) -> Any:
        """Keras' ``apply`` with the learning rate times ``guard.lr_scale`` (the user's
        learning rate put back right after)."""
        scale = self.guard.lr_scale
        if scale == 1.0:
            return original(grads, variables)
        lr = opt._learning_rate
        if isinstance(lr, keras.Variable):
            old = lr.value.detach().clone()
            lr.assign(old * scale)
            try:
                return original(grads, variables)
            finally:
                lr.assign(old)
        applied = _host(opt.learning_rate) * scale  # a schedule or callable, at this step
        opt._learning_rate = lambda: applied
        try:
            return original(grads, variables)
        finally:
            opt._learning_rate = lr

    def _guard_logs(self, logs: dict | None) -> None:
        """The guard's totals and lr scale into Keras' ``logs``."""
        self._report.new(self.guard)  # the Guard logs each action itself
        if logs is not None:
            logs.update(self._report.values(self.guard))

    # ---------------------------------------------------------------- recorder
    def _recorder(self) -> Recorder:
        if self._rec is None:
            variables = self.model.trainable_variables
            prefix = f"{self.model.name}/"
            make_parent(self.store)
            config = self.config.replace(sinks=(*self.config.sinks, _EpochMax(self)))
            if self._resume_from is not None:  # continuing the run: nothing to overwrite
                config = config.replace(overwrite=False)
            self._rec = Recorder(
                self.store,
                self._run_name,
                config,
                [v.path.removeprefix(prefix) for v in variables],
                [int(np.prod(v.shape)) for v in variables],
                self._run_config,
            )
            self._rec.resume_from = self._resume_from
            self._resume_from = None
        return self._rec
    # ---------------------------------------------------------------- reading
    def _torch_grads(self, k: int) -> list:
        """This step's gradients where Keras leaves them: on the torch backend its
        ``train_step`` fills each trainable variable's ``.grad`` (zeroed at the next step),
        so ``grad_norm`` is recorded every step on the device like the torch Monitor's (an
        outlier batch shows in it). Empty on other backends and for executions of ``k > 1``
        steps (only the last step's gradient would be there)."""
        if k != 1 or keras.backend.backend() != "torch":
            return []
        grads = [getattr(v.value, "grad", None) for v in self.model.trainable_variables]
        return grads if any(g is not None for g in grads) else []

    def _loss_tracker(self) -> Any:
        tr = getattr(self.model, "_loss_tracker", None)
        if tr is None or not hasattr(tr, "total") or not hasattr(tr, "count"):
            return None
        return tr

    def _tracker(self) -> tuple[Any, Any, bool] | None:
        """Before a batch: the tracker's (total, count) as float32 numpy scalars, and
        whether they were zeroed (so that after the batch they hold this batch alone)."""
        tr = self._loss_tracker()
        if tr is None:
            return None
        total, count = (np.asarray(keras.ops.convert_to_numpy(v)) for v in (tr.total, tr.count))
        reset = keras.backend.backend() != "jax"
        if reset:
            tr.total.assign(keras.ops.zeros_like(tr.total))
            tr.count.assign(keras.ops.zeros_like(tr.count))
        return total, count, reset

    def _batch_loss(self, before: tuple | None, logs: dict | None) -> float | None:
        tr = self._loss_tracker() if before is not None else None
        if tr is not None:
            total0, count0, reset = before
            total, count = (np.asarray(keras.ops.convert_to_numpy(v)) for v in (tr.total, tr.count))
            if reset:  # this batch alone; put back old + batch, Keras' own float32 addition
                tr.total.assign(total0 + total)
                tr.count.assign(count0 + count)
                if count > 0:
                    return float(total) / float(count)
            elif count > count0:
                return (float(total) - float(total0)) / (float(count) - float(count0))
        if logs and "loss" in logs:
            return _host(logs["loss"])
        return None

    def _snapshot(self, opt: Any) -> dict:
        inner = _inner(opt)
        variables = self.model.trainable_variables
        snap: dict[str, Any] = {"w": [_tensor(v).clone() for v in variables], "m": None, "t": 0}
        if isinstance(inner, keras.optimizers.Adam) and inner.built:
            moms = [inner._momentums[inner._get_variable_index(v)] for v in variables]
            snap["m"] = [_tensor(m).clone() for m in moms]
            snap["t"] = int(_host(inner.iterations))
        return snap

    def _detail(
        self, st: StepTensors, snap: dict, lr: float
    ) -> tuple[StepTensors, dict[str, float] | None]:
        """The tensors of a detailed step for the recorder: the gradient recovered from two
        first moments, the update, Adam's state. ``(st, None)``, or ``(st, metrics)`` when
        only host metrics can be given (``k > 1`` optimizer steps since the snapshot; not
        Adam: the update and parameter norms)."""
        inner = _inner(self.model.optimizer)
        variables = self.model.trainable_variables
        w_prev = snap["w"]
        neg = [wp - _tensor(v) for wp, v in zip(w_prev, variables, strict=True)]
        p_sq = [x.double().square() for x in torch._foreach_norm(w_prev)] if w_prev else []
        adam = isinstance(inner, keras.optimizers.Adam) and inner.built
        t = int(_host(inner.iterations)) if adam else 0
        k = t - snap["t"]
        if not adam or k < 1 or not variables:  # not Adam, or no step: norms only
            if not variables:
                return st, {}
            p = math.sqrt(float(sum(p_sq)))
            u = math.sqrt(sum(float(x) ** 2 for x in torch._foreach_norm(neg)))
            out = {N.PARAM_NORM: p, N.UPDATE_NORM: u}
            if p > 0:
                out[N.UPDATE_RATIO] = u / p
            return st, out
        h = keras_hyper(inner, lr)
        idx = [inner._get_variable_index(v) for v in variables]
        m = [_tensor(inner._momentums[i]) for i in idx]
        vel = [_tensor(inner._velocities[i]) for i in idx]
        vh = [_tensor(inner._velocity_hats[i]) for i in idx] if h.amsgrad else None
        if k == 1:  # g_t from two consecutive first moments
            m_prev = snap["m"] or [torch.zeros_like(x) for x in m]
            grads = [(a - h.beta1 * b) / (1.0 - h.beta1) for a, b in zip(m, m_prev, strict=True)]
        else:  # no gradient from moments k steps apart: a stand-in, its g2v_* dropped below
            self._warn_steps_per_execution(k)
            grads = [torch.zeros_like(x) for x in m]
        adam_t = [
            AdamTensor(g, vh[j] if vh is not None else v, t, h, v if vh is not None else None)
            for j, (g, v) in enumerate(zip(grads, vel, strict=True))
        ]
        if k == 1:
            return StepTensors(st.loss, grads, p_sq, neg, adam_t), None
        rec = self._recorder()
        stats = step_stats(
            StepTensors(None, [], adam=adam_t), rec.names, sample=rec.sample,
            top_k=self.config.top_k, scratch=rec.scratch,
        )
        out = {n: v for n, v in stats.items() if not n.startswith((N.G2V_RMS, N.G2V_MAX))}
        out[N.PARAM_NORM] = math.sqrt(float(sum(p_sq)))
        return st, out

    def _warn_steps_per_execution(self, k: int) -> None:
        if self._warned_spe:
            return
        self._warned_spe = True
        msg = (
            f"steps_per_execution={k}: Keras calls callbacks once per {k} batches, so stablestep "
            f"records one step in {k} and cannot recover the gradient: grad_norm, g2v_rms, "
            "g2v_max and the update statistics are not recorded (the effective step, eps_share "
            "and amsgrad_gap are); use steps_per_execution=1 to see them"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ store
    def _run_config(self) -> dict[str, Any]:
        opt = self.model.optimizer
        inner = _inner(opt)
        cfg: dict[str, Any] = {
            "optimizer": f"keras.{type(inner).__name__}",
            "hyper": dataclasses.asdict(keras_hyper(inner, _host(opt.learning_rate))),
            "n_params": int(sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)),
            "torch_version": torch.__version__,
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "started_at": utc_now(),
            "monitor": {
                **self.config.summary(),
                "source": "keras",
                "loss": "loss_tracker" if self._loss_tracker() is not None else "logs",
            },
        }
        cfg.update(self.config.extra)
        return cfg

    def flush(self) -> None:
        """Write buffered records to the store (and the sinks) now."""
        if self._rec is not None:
            self._rec.flush()

    def read(self) -> Run:
        """Flush and return this run as a :class:`~stablestep.telemetry.store.Run`."""
        self.flush()
        if self._rec is not None:
            self._rec.ensure_writer()
        return open_run(self.store, self.run_name)

    def state_dict(self) -> dict[str, Any]:
        """State to resume this run (next step, run name, store; with ``guard=``, the
        guard's counters, detectors and snapshots: save with ``torch.save``); flushes first."""
        self.flush()
        out = {"version": 1, "step": self._step, "run": self.run_name, "store": self.store}
        if self.guard is not None:
            out["guard"] = self.guard.state_dict()
        elif self._guard_state is not None:
            out["guard"] = self._guard_state
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` (call before ``fit``): steps
        recorded at or after the saved step (an abandoned continuation) are replaced."""
        if self._rec is not None or self._step != 0:
            raise RuntimeError("load_state_dict() must be called before the callback records")
        if state.get("version") != 1:
            raise ValueError(f"unsupported callback state version: {state.get('version')!r}")
        if state.get("guard") is not None and self._policy is None:
            raise ValueError("the saved state has a guard: create the callback with guard=")
        self._step = int(state["step"])
        self._resume_from = self._step
        self._run_name = state["run"]
        self._guard_state = state.get("guard")
