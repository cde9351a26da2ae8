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
(``eps_mode="tf"`` in :mod:`stablestep.optim.inspect`). :class:`StablestepCallback` feeds
Keras' ``momentums``, ``velocities``, ``velocity_hats`` and ``iterations`` to the very same
statistics code as :class:`stablestep.Monitor` (:mod:`stablestep.telemetry.probes`), under
the same metric names, into the same run store.

Keras does not hand gradients to callbacks; on detailed steps the gradient Adam used is
recovered exactly from two consecutive first moments,
:math:`g_t = (m_t - \beta_1 m_{t-1}) / (1-\beta_1)` (after Keras' own clipping, before
weight decay), and the update from the weights before and after the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stablestep.integrations._common import (
    LOG_PREFIX,
    check_every,
    default_run_name,
    open_writer,
    resolve_store,
    utc_now,
)
from stablestep.optim.inspect import GroupHyper
from stablestep.telemetry import names as N
from stablestep.telemetry.probes import CoordinateSample, Scratch, adam_state_stats, update_stats
from stablestep.telemetry.store import Run, RunWriter, open_run

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

_RESERVED = ("optimizer", "hyper", "n_params", "torch_version", "started_at", "monitor")


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


class _Param:
    """Stand-in for a torch parameter in :func:`adam_state_stats` (numel, grad, identity)."""

    __slots__ = ("grad", "n")

    def __init__(self, n: int, grad: torch.Tensor):
        self.n, self.grad = n, grad

    def numel(self) -> int:
        return self.n


class _AdamView:
    """Keras Adam state in torch.optim's layout (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``; group with ``betas``, ``eps``, ``eps_mode="tf"``), read-only."""

    def __init__(self, hyper: GroupHyper):
        self.param_groups = [
            {
                "params": [],
                "lr": hyper.lr,
                "betas": (hyper.beta1, hyper.beta2),
                "eps": hyper.eps,
                "eps_mode": "tf",
                "amsgrad": hyper.amsgrad,
                "weight_decay": hyper.weight_decay,
                "decoupled_weight_decay": hyper.decoupled_weight_decay,
            }
        ]
        self.state: dict[Any, dict] = {}


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
    one callback continue one run. There is no seatbelt here: the Guard acts on torch
    optimizers, and Keras' are not.

    Args:
        store: path of the SQLite run store, or a directory to hold ``stablestep.db``;
            default ``logs/stablestep.db`` (``logs`` is ``keras.callbacks.TensorBoard``'s
            default directory). Created if needed.
        run: the run's name (default ``run-<UTC time>-<random>``). A name already in the
            store starts a new run under a suffixed name (``cb.run_name`` says which) unless
            ``overwrite=True``, which replaces the old run.
        overwrite: replace a stored run of the same name instead of suffixing.
        config: extra JSON-serialisable entries for ``Run.config``.
        every, state_every: recording periods in steps (positive ints; ``state_every``
            may be ``None``).
        top_k: per-tensor metrics for the ``top_k`` tensors with the largest effective step.
        quantile_sample: coordinates sampled for the effective-step quantiles.
        flush_every, flush_seconds: write to the store every this many recorded steps or
            seconds (and at the end of ``fit``, on :meth:`state_dict` and on a non-finite
            event).
        sinks: objects with ``write(step, metrics)``, ``event(step, kind, data)``,
            ``close()`` (e.g. :class:`stablestep.telemetry.TensorBoardSink`), as for the
            Monitor; they receive finite values only and are closed by :meth:`close`.
        log_metrics: names whose epoch maximum goes into Keras' ``logs`` (``()``: none).
    """

    def __init__(
        self,
        *,
        store: str | os.PathLike | None = None,
        run: str | None = None,
        overwrite: bool = False,
        config: dict[str, Any] | None = None,
        every: int = 1,
        state_every: int | None = 10,
        top_k: int = 3,
        quantile_sample: int = 65536,
        flush_every: int = 100,
        flush_seconds: float = 10.0,
        sinks: Sequence[Any] = (),
        log_metrics: Sequence[str] = LOGGED,
    ):
        super().__init__()
        check_every("every", every)
        check_every("state_every", state_every, optional=True)
        check_every("flush_every", flush_every)
        check_every("quantile_sample", quantile_sample)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"Invalid top_k: {top_k!r} (an int >= 0)")
        if not (isinstance(flush_seconds, (int, float)) and flush_seconds > 0):
            raise ValueError(f"Invalid flush_seconds: {flush_seconds!r} (> 0)")
        for key in config or {}:
            if key in _RESERVED:
                raise ValueError(f"config key {key!r} is reserved for the callback")
        self.store = resolve_store(store, DEFAULT_LOG_DIR)
        self.run_name = run or default_run_name()
        self.overwrite = bool(overwrite)
        self.every, self.state_every, self.top_k = every, state_every, top_k
        self.quantile_sample, self.flush_every = quantile_sample, flush_every
        self.flush_seconds = float(flush_seconds)
        self.sinks = list(sinks)
        self.log_metrics = tuple(log_metrics)
        self._extra = dict(config or {})
        self._step = 0
        self._resume_from: int | None = None
        self._writer: RunWriter | None = None
        self._begin: tuple | None = None
        self._sample: CoordinateSample | None = None
        self._scratch = Scratch()
        self._since_flush = 0
        self._last_flush = time.monotonic()
        self._epoch: dict[str, float] = {}  # this epoch's maxima, for ``logs``
        self._logged: set[str] = set()
        self._begin_batch: int | None = None
        self._warned_spe = False

    @property
    def step(self) -> int:
        """Index of the next train batch this callback will record."""
        return self._step

    # ------------------------------------------------------------ keras hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        """Open (or reopen, when resuming) the run in the store."""
        self._ensure_writer()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Start the epoch's maxima for ``logs``."""
        self._epoch = {}

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Read the lr, Keras' running loss and (detailed steps) weights and moments."""
        s = self._step
        k = max(int(getattr(self.model, "steps_per_execution", 1) or 1), 1)
        se = self.state_every
        detail = se is not None and (s % se == 0 or (s + k - 1) // se != s // se)
        if not (any((s + i) % self.every == 0 for i in range(k)) or detail):
            self._begin = None
            self._begin_batch = batch
            return
        opt = self.model.optimizer
        lr = _host(opt.learning_rate)  # the value this step will use (schedules: at t-1)
        self._begin = (lr, self._tracker(), self._snapshot(opt) if detail else None)
        self._begin_batch = batch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Complete the record of this step (or execution of ``k`` steps) and write it."""
        begin_batch = getattr(self, "_begin_batch", batch)
        k = max(int(batch) - int(begin_batch) + 1, 1) if begin_batch is not None else 1
        s = self._step + k - 1  # the record is stored at the execution's last step
        self._step += k
        begin, self._begin = self._begin, None
        if begin is None:
            return
        lr, tracker, snap = begin
        metrics: dict[str, float] = {}
        loss = self._batch_loss(tracker, logs)
        if loss is not None:
            metrics[N.LOSS] = loss
        metrics[N.LR] = lr
        bad: dict[str, int] = {}
        if snap is not None:
            metrics.update(self._state_stats(lr, snap, bad))
        self._emit(s, metrics, bad)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Record the validation metrics and write this epoch's statistics into ``logs``."""
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
            self._emit(self._step - 1, val, {}, stats=False)
        for name in self.log_metrics:
            if name in self._epoch or name in self._logged:  # same keys every epoch
                self._logged.add(name)
                logs[f"{LOG_PREFIX}{name}"] = self._epoch.get(name, math.nan)

    def on_train_end(self, logs: dict | None = None) -> None:
        """Flush and close the store; a later ``fit`` continues the same run."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._resume_from = self._step
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()
        self._since_flush = 0

    def close(self) -> None:
        """Close the sinks (the store closes at the end of every ``fit``)."""
        self.on_train_end()
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    # ---------------------------------------------------------------- reading
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

    def _state_stats(self, lr: float, snap: dict, bad: dict[str, int]) -> dict[str, float]:
        inner = _inner(self.model.optimizer)
        variables = self.model.trainable_variables
        prefix = f"{self.model.name}/"
        names = [v.path.removeprefix(prefix) for v in variables]
        w_prev = snap["w"]
        neg = [wp - _tensor(v) for wp, v in zip(w_prev, variables, strict=True)]
        p_norms = torch._foreach_norm(w_prev) if w_prev else []
        adam = isinstance(inner, keras.optimizers.Adam) and inner.built
        t = int(_host(inner.iterations)) if adam else 0
        k = t - snap["t"]
        if not adam or k < 1 or not variables:
            # not Adam (or no step taken): the update and the parameters only
            out: dict[str, float] = {}
            if variables:
                u = math.sqrt(sum(float(x) ** 2 for x in torch._foreach_norm(neg)))
                p = math.sqrt(sum(float(x) ** 2 for x in p_norms))
                out = {N.PARAM_NORM: p, N.UPDATE_NORM: u}
                if p > 0:
                    out[N.UPDATE_RATIO] = u / p
            return out
        h = keras_hyper(inner, lr)
        idx = [inner._get_variable_index(v) for v in variables]
        m = [_tensor(inner._momentums[i]) for i in idx]
        if k == 1:  # g_t from two consecutive first moments
            m_prev = snap["m"] or [torch.zeros_like(x) for x in m]
            grads = [(a - h.beta1 * b) / (1.0 - h.beta1) for a, b in zip(m, m_prev, strict=True)]
            g_norms = torch._foreach_norm(grads)
            host = torch.stack([x.double() for x in g_norms]).tolist()
            out = {N.GRAD_NORM: math.sqrt(sum(x * x for x in host))}
            for name, g, nrm in zip(names, grads, host, strict=True):
                out[f"{N.GRAD_NORM}/{name}"] = nrm
                if not math.isfinite(nrm):
                    cnt = g.numel() - int(torch.count_nonzero(torch.isfinite(g)))
                    if cnt:
                        bad[name] = cnt
            out[N.GRAD_NONFINITE] = float(sum(bad.values()))
            out.update(update_stats(names, neg, p_norms, g_norms, grads, top_k=self.top_k))
        else:  # k optimizer steps since the snapshot: no gradient, state statistics only
            self._warn_steps_per_execution(k)
            grads = [torch.zeros_like(x) for x in m]  # stand-in; its g2v_* are dropped below
            out = {N.PARAM_NORM: math.sqrt(sum(float(x) ** 2 for x in p_norms))}
        view = _AdamView(h)
        group = view.param_groups[0]
        params = []
        for name, i, mt, g in zip(names, idx, m, grads, strict=True):
            p = _Param(g.numel(), g)
            st = {"step": t, "exp_avg": mt, "exp_avg_sq": _tensor(inner._velocities[i])}
            if h.amsgrad:
                st["max_exp_avg_sq"] = _tensor(inner._velocity_hats[i])
            view.state[p] = st
            group["params"].append(p)
            params.append((name, p, group))
        if self._sample is None:
            self._sample = CoordinateSample([p.numel() for _, p, _ in params], self.quantile_sample)
        stats = adam_state_stats(
            view, params, self._sample, top_k=self.top_k, scratch=self._scratch
        )
        if k > 1:
            stats = {n: v for n, v in stats.items() if not n.startswith((N.G2V_RMS, N.G2V_MAX))}
        out.update(stats)
        return out

    def _warn_steps_per_execution(self, k: int) -> None:
        if self._warned_spe:
            return
        self._warned_spe = True
        msg = (
            f"steps_per_execution={k}: Keras calls callbacks once per {k} batches, so stablestep "
            "records one step in {k} and cannot recover the gradient: grad_norm, g2v_rms, "
            "g2v_max and the update statistics are not recorded (the effective step, eps_share "
            "and amsgrad_gap are); use steps_per_execution=1 to see them"
        ).replace("{k}", str(k))
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

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
                "source": "keras",
                "every": self.every,
                "state_every": self.state_every,
                "top_k": self.top_k,
                "loss": "loss_tracker" if self._loss_tracker() is not None else "logs",
            },
        }
        cfg.update(self._extra)
        return cfg

    def _ensure_writer(self) -> RunWriter:
        if self._writer is None:
            self._writer = open_writer(
                self.store,
                self.run_name,
                config=self._run_config(),
                resume_from=self._resume_from,
                overwrite=self.overwrite,
            )
            self.run_name = self._writer.run
            self._resume_from = None
        return self._writer

    def _emit(
        self, step: int, metrics: dict[str, float], bad: dict[str, int], *, stats: bool = True
    ) -> None:
        what = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            what.insert(0, "grad")
        writer = self._ensure_writer()
        writer.add(step, metrics)  # drops non-finite values
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for sink in self.sinks:
            sink.write(step, finite)
        if stats:
            for name in self.log_metrics:
                if name in finite:
                    self._epoch[name] = max(self._epoch.get(name, -math.inf), finite[name])
        if what:
            data = {"what": what, "tensors": bad}
            writer.event(step, N.EVENT_NONFINITE, data)
            for sink in self.sinks:
                sink.event(step, N.EVENT_NONFINITE, data)
            self.flush()
        self._since_flush += 1
        if (
            self._since_flush >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write buffered records to the store (and the sinks) now."""
        if self._writer is not None:
            self._writer.flush()
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()
        self._since_flush = 0
        self._last_flush = time.monotonic()

    def read(self) -> Run:
        """Flush and return this run as a :class:`~stablestep.telemetry.store.Run`."""
        self.flush()
        return open_run(self.store, self.run_name)

    def state_dict(self) -> dict[str, Any]:
        """State to resume this run (next step, run name, store); flushes first."""
        self.flush()
        return {"version": 1, "step": self._step, "run": self.run_name, "store": self.store}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` (call before ``fit``): steps
        recorded at or after the saved step (an abandoned continuation) are replaced."""
        if self._writer is not None or self._step != 0:
            raise RuntimeError("load_state_dict() must be called before the callback records")
        if state.get("version") != 1:
            raise ValueError(f"unsupported callback state version: {state.get('version')!r}")
        self._step = int(state["step"])
        self._resume_from = self._step
        self.run_name = state["run"]
