"""Keras 3 callback with ``guard=``: the Guard decides each step before Keras applies it."""

from __future__ import annotations

import io
import logging
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

if keras.backend.backend() != "torch":  # pragma: no cover - the guard needs torch tensors
    pytest.skip("the Keras guard needs the torch backend", allow_module_level=True)

from stablestep.guard import GuardPolicy  # noqa: E402
from stablestep.integrations.keras import StablestepCallback  # noqa: E402
from stablestep.telemetry import names as N  # noqa: E402

KEYS = [f"stablestep/guard_{a}" for a in ("skip", "clip", "rollback", "adapt", "restore")]


def _data(n=128, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (np.sin(x[:, :2].sum(1, keepdims=True)) + 0.1 * x[:, 2:3]).astype("float32")
    return x, y


def _model(lr=1e-3, seed=0, d=6):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    return model


def _fit(model, x, y, cb, epochs, **kw):
    cbs = [cb] if cb is not None else []
    return model.fit(x, y, batch_size=16, epochs=epochs, callbacks=cbs, verbose=0,
                     shuffle=False, **kw)


def _weights(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]


def _guard_events(run):
    return [e for e in run.events if e.kind == N.EVENT_GUARD]


def test_healthy_training_no_action_and_the_same_training(tmp_path):
    x, y = _data()
    plain = _model()
    h0 = _fit(plain, x, y, None, 5)
    model = _model()
    cb = StablestepCallback(store=tmp_path / "k.db", run="healthy", guard=True)
    h1 = _fit(model, x, y, cb, 5)
    assert cb.guard.step == 40 and cb.step == 40
    assert sum(cb.guard.counts[a] for a in ("skip", "clip", "rollback", "adapt")) == 0
    assert cb.guard.snapshots  # it kept a snapshot to roll back to
    for key in KEYS:
        assert h1.history[key] == [0.0] * 5, key
    assert h1.history["stablestep/guard_lr_scale"] == [1.0] * 5
    # a guard that does nothing changes nothing: same weights, same History loss
    for a, b in zip(_weights(plain), _weights(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert h0.history["loss"] == h1.history["loss"]
    assert not _guard_events(cb.read())
    assert "apply" not in vars(model.optimizer)  # Keras' own method is back after fit


def test_nan_batch_is_skipped_before_the_update_and_shown_everywhere(tmp_path, caplog):
    x, y = _data(n=64)
    y = y.copy()
    y[40] = np.nan  # batch 2 of every epoch (batch size 16, no shuffle)
    model = _model()
    opt = model.optimizer
    store = tmp_path / "k.db"
    cb = StablestepCallback(store=store, run="nan", guard=True)
    seen = []

    class Peek(keras.callbacks.Callback):  # what a later callback sees in the batch logs
        def on_train_batch_end(self, batch, logs=None):
            seen.append((batch, logs.get("stablestep/guard_skip")))

    with caplog.at_level(logging.INFO, logger="stablestep.guard"):
        hist = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False,
                         callbacks=[cb, Peek()])
    g = cb.guard
    skips = [r for r in g.records if r.action == "skip"]
    assert [r.step for r in skips] == [2, 6, 10]
    assert {r.reason for r in skips} == {"non-finite"}
    assert g.counts["rollback"] == 0
    # refused before the update: Keras' step count and the weights never saw the batch
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 12 - 3
    assert all(np.isfinite(w).all() for w in _weights(model))
    assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in opt.variables)
    # training goes on: the last step recorded is finite and an update happened
    run = cb.read()
    steps, loss = run.series(N.LOSS)
    assert steps[-1] == 11 and np.isfinite(loss[-1])
    # every action: a store event, a logging line, Keras' logs (batch and epoch)
    ev = _guard_events(run)
    assert [e.step for e in ev] == [2, 6, 10]
    assert all(e.data["action"] == "skip" for e in ev)
    assert sum("skip (non-finite)" in r.getMessage() for r in caplog.records) == 3
    assert hist.history["stablestep/guard_skip"] == [1.0, 2.0, 3.0]
    assert hist.history["stablestep/guard_rollback"] == [0.0, 0.0, 0.0]
    assert seen[1][1] == 0.0 and seen[2][1] == 1.0

    from stablestep.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        main(["diagnose", str(store)])
    text = " ".join(out.getvalue().split())
    assert all(f"The guard acted: skip at step {s}" in text for s in (2, 6, 10))


def test_repeated_nan_rolls_back_and_cuts_the_lr_keras_keeps_its_own(tmp_path):
    x, y = _data(n=128)
    y = y.copy()
    y[48:80] = np.nan  # batches 3 and 4: two non-finite steps in a row
    model = _model(lr=1e-3)
    opt = model.optimizer
    policy = GuardPolicy(max_nonfinite_run=2, snapshot_every=2, restore_after=None)
    cb = StablestepCallback(store=tmp_path / "k.db", run="rb", guard=policy, every=1)
    hist = _fit(model, x, y, cb, 1)
    g = cb.guard
    (rb,) = [r for r in g.records if r.action == "rollback"]
    assert rb.step == 4 and rb.reason == "repeated-non-finite" and rb.data["to_step"] == 2
    assert g.lr_scale < 1.0  # the bounded cut after a rollback
    assert hist.history["stablestep/guard_rollback"] == [1.0]
    assert hist.history["stablestep/guard_lr_scale"] == [g.lr_scale]
    # Keras' learning rate is still the user's: the cut lives in the guard
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(1e-3)
    # the rollback went back to step 2's state (iterations included), then 3 steps more
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2 + 3
    assert all(np.isfinite(w).all() for w in _weights(model))
    # the recorded lr is the one applied
    run = cb.read()
    steps, lr = run.series(N.LR)
    assert lr[list(steps).index(7)] == pytest.approx(1e-3 * g.lr_scale)
    assert lr[0] == pytest.approx(1e-3)
    assert {e.data["action"] for e in _guard_events(run)} >= {"rollback", "adapt"}


@pytest.mark.parametrize("schedule", [False, True])
def test_the_lr_cut_is_the_lr_keras_applies(tmp_path, schedule):
    """SGD without momentum: the update after the cut is exactly lr_t * lr_scale * grad."""
    x, y = _data(n=128)
    y = y.copy()
    y[48:80] = np.nan  # batches 3 and 4
    lr = (keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=4, decay_rate=0.9)
          if schedule else 0.05)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    opt = keras.optimizers.SGD(lr)
    model.compile(optimizer=opt, loss="mse")
    policy = GuardPolicy(max_nonfinite_run=2, snapshot_every=1, restore_after=None)
    cb = StablestepCallback(store=tmp_path / "k.db", run="sgd", guard=policy)
    steps = []

    class Peek(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.w0 = [v.value.detach().clone().double() for v in self.model.trainable_variables]
            self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_train_batch_end(self, batch, logs=None):
            var = self.model.trainable_variables
            g = [v.value.grad.double() for v in var]
            du = [a - v.value.detach().double() for a, v in zip(self.w0, var, strict=True)]
            steps.append((batch, self.lr, du, g))

    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb, Peek()])
    scale = cb.guard.lr_scale
    assert scale == 0.5 and cb.guard.counts["rollback"] == 1
    for _batch, lr_t, du, g in steps[5:]:  # after the rollback at step 4
        for d, gg in zip(du, g, strict=True):
            torch.testing.assert_close(d, lr_t * scale * gg, rtol=1e-3, atol=1e-6)  # float32 w
    # Keras' learning rate is the user's again after each step
    assert opt._learning_rate is lr or not schedule
    if not schedule:
        assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.05)


def test_rollback_restores_the_snapshot_exactly(tmp_path):
    x, y = _data(n=64)
    y = y.copy()
    y[32:64] = np.nan  # batches 2 and 3
    model = _model()
    policy = GuardPolicy(max_nonfinite_run=2, snapshot_every=1, adapt=False)
    cb = StablestepCallback(store=tmp_path / "k.db", run="exact", guard=policy)
    snap = {}

    class Peek(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:  # the last snapshot before the non-finite run (step 2 had none)
                snap["w"] = _weights(self.model)
                snap["opt"] = [np.array(keras.ops.convert_to_numpy(v))
                               for v in self.model.optimizer.variables]

    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[Peek(), cb])
    assert [r.action for r in cb.guard.records] == ["skip", "rollback"]
    assert cb.guard.records[1].data["to_step"] == 1
    for a, b in zip(snap["w"], _weights(model), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, v in zip(snap["opt"], model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(v))


def test_guard_state_round_trip_continues_identically(tmp_path):
    x, y = _data(n=64)
    y = y.copy()
    y[40] = np.nan
    store = tmp_path / "k.db"
    whole = _model()
    cb = StablestepCallback(store=store, run="whole", guard=True)
    h_whole = _fit(whole, x, y, cb, 3)

    parts = _model()
    first = StablestepCallback(store=store, run="parts", guard=True)
    _fit(parts, x, y, first, 1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["guard"]["counts"]["skip"] == 1
    # "restore the checkpoint": the same seed and one guarded epoch give the same model
    parts = _model()
    _fit(parts, x, y, StablestepCallback(store=tmp_path / "scratch.db", run="s", guard=True), 1)
    second = StablestepCallback(store=store, run="ignored", guard=True)
    second.load_state_dict(state)
    h_parts = _fit(parts, x, y, second, 2)

    assert second.guard.step == cb.guard.step == 12
    assert [r.to_dict() for r in second.guard.records] == [r.to_dict() for r in cb.guard.records]
    assert h_parts.history["stablestep/guard_skip"] == h_whole.history["stablestep/guard_skip"][1:]
    for a, b in zip(_weights(whole), _weights(parts), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [e.step for e in _guard_events(second.read())] == [2, 6, 10]


def test_close_then_another_fit_continues_the_guard(tmp_path):
    x, y = _data(n=64)
    y = y.copy()
    y[40] = np.nan
    model = _model()
    cb = StablestepCallback(store=tmp_path / "k.db", run="two", guard=True)
    _fit(model, x, y, cb, 1)
    cb.close()
    assert cb.guard is None and "apply" not in vars(model.optimizer)
    hist = _fit(model, x, y, cb, 1)
    assert cb.guard.step == 8 and cb.guard.counts["skip"] == 2
    assert hist.history["stablestep/guard_skip"] == [2.0]
    # a fit without the callback is Keras' own again: the NaN batch is applied
    _fit(model, x, y, None, 1)
    assert not all(np.isfinite(w).all() for w in _weights(model))


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"guard": "yes"}, TypeError, "guard must be None, True or a GuardPolicy"),
        ({"guard": 1}, TypeError, "guard must be None, True or a GuardPolicy"),
    ],
)
def test_invalid_guard_argument(kwargs, exc, message):
    with pytest.raises(exc, match=message) as info:
        StablestepCallback(**kwargs)
    assert "\n" not in str(info.value)


def test_unsupported_setups_say_so_in_one_line(tmp_path):
    x, y = _data(n=32)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=2),
                  loss="mse")
    cb = StablestepCallback(store=tmp_path / "k.db", run="acc", guard=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps") as info:
        _fit(model, x, y, cb, 1)
    assert "\n" not in str(info.value)
    plain = StablestepCallback(store=tmp_path / "k.db", run="p")
    with pytest.raises(ValueError, match="create the callback with guard="):
        plain.load_state_dict({"version": 1, "step": 3, "run": "r", "guard": {"step": 3}})


def test_an_outlier_batch_is_skipped_by_the_shared_detector_stack(tmp_path):
    x, y = _data(n=1024)
    y = y.copy()
    y[800:816] *= 1e3  # batch 50: finite, but its gradient is far out of the run's range
    model = _model()
    cb = StablestepCallback(store=tmp_path / "k.db", run="out", guard=True)
    hist = _fit(model, x, y, cb, 1)
    skips = [r for r in cb.guard.records if r.action == "skip"]
    assert [(r.step, r.reason) for r in skips] == [(50, "gradient-outlier")]
    assert skips[0].data["z"] > 0
    assert hist.history["stablestep/guard_skip"] == [1.0]
    assert cb.guard.counts["rollback"] == 0
