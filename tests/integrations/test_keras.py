"""Keras 3 callback: stored telemetry against Keras' own variables, History and updates."""

from __future__ import annotations

import io
import json
import math
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from stablestep.integrations.keras import StablestepCallback  # noqa: E402
from stablestep.telemetry import names as N  # noqa: E402


def _data(n=96, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (np.sin(x[:, :2].sum(1, keepdims=True)) + 0.1 * x[:, 2:3]).astype("float32")
    return x, y


def _model(opt, d=6, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(12, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=opt, loss="mse")
    return model


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


class Recorder(keras.callbacks.Callback):
    """Independent reference: Keras' variables before/after each step and, for full-batch
    fits, the true gradient by autograd through the Keras (torch backend) model."""

    def __init__(self, x=None, y=None):
        super().__init__()
        self.x, self.y, self.steps = x, y, []

    def on_train_batch_begin(self, batch, logs=None):
        self.w0 = [_np(v) for v in self.model.trainable_variables]
        self.lr = float(_np(self.model.optimizer.learning_rate))
        self.g = None
        if self.x is not None and keras.backend.backend() == "torch":
            pred = self.model(torch.as_tensor(self.x), training=True)
            loss = torch.mean((pred - torch.as_tensor(self.y)) ** 2)
            vals = [v.value for v in self.model.trainable_variables]
            self.g = [g.double().numpy() for g in torch.autograd.grad(loss, vals)]

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        var = self.model.trainable_variables
        idx = [opt._get_variable_index(v) for v in var]
        rec = {
            "t": int(_np(opt.iterations)),
            "lr": self.lr,
            "w0": self.w0,
            "w1": [_np(v) for v in var],
            "m": [_np(opt._momentums[i]) for i in idx],
            "v": [_np(opt._velocities[i]) for i in idx],
            "g": self.g,
        }
        if opt.amsgrad:
            rec["vh"] = [_np(opt._velocity_hats[i]) for i in idx]
        self.steps.append(rec)


def _reference_eff(opt, rec):
    """Keras' documented update: lr*sqrt(1-b2^t)/(1-b1^t) / (sqrt(v) + eps_hat) per coordinate."""
    t, b1, b2 = rec["t"], float(opt.beta_1), float(opt.beta_2)
    alpha = rec["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
    vs = rec["vh"] if opt.amsgrad else rec["v"]
    return [alpha / (np.sqrt(v) + float(opt.epsilon)) for v in vs]


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(3e-2),
    "amsgrad": lambda: keras.optimizers.Adam(3e-2, amsgrad=True, epsilon=1e-4),
    "adamw": lambda: keras.optimizers.AdamW(3e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_effective_step_gradient_and_update_match_keras(tmp_path, kind):
    x, y = _data()
    model = _model(OPTIMIZERS[kind]())
    opt = model.optimizer
    cb = StablestepCallback(store=tmp_path / "k.db", run=kind, state_every=1, top_k=0)
    rec = Recorder(x, y)
    model.fit(x, y, batch_size=len(x), epochs=6, callbacks=[cb, rec], verbose=0, shuffle=False)
    run = cb.read()
    assert run.config["optimizer"] == f"keras.{type(opt).__name__}"
    assert run.config["hyper"]["eps_mode"] == "tf"
    assert run.config["hyper"]["amsgrad"] == (kind == "amsgrad")
    series = {n: dict(zip(*run.series(n), strict=True)) for n in run.names()}
    wd = float(opt.weight_decay or 0.0)
    for s, r in enumerate(rec.steps):
        eff = _reference_eff(opt, r)
        # the formula is Keras' actual update: w1 = w0 (1 - lr wd) - eff * m
        for w0, w1, e, m in zip(r["w0"], r["w1"], eff, r["m"], strict=True):
            np.testing.assert_allclose(w0 * (1 - r["lr"] * wd) - w1, e * m, rtol=2e-4, atol=1e-8)
        flat = np.concatenate([e.ravel() for e in eff])
        assert series[N.EFF_STEP_MAX][s] == pytest.approx(flat.max(), rel=1e-5)
        for q, name in ((0.5, N.EFF_STEP_P50), (0.9, N.EFF_STEP_P90), (0.99, N.EFF_STEP_P99)):
            assert series[name][s] == pytest.approx(np.quantile(flat, q), rel=1e-5)
        # gradient recovered from the moments == autograd's gradient of the batch loss
        g = np.concatenate([x.ravel() for x in r["g"]])
        assert series[N.GRAD_NORM][s] == pytest.approx(np.linalg.norm(g), rel=1e-4)
        vs = r["vh"] if kind == "amsgrad" else r["v"]
        bc2 = 1 - float(opt.beta_2) ** r["t"]
        eps_t = float(opt.epsilon) / math.sqrt(bc2)
        vhat = np.concatenate([v.ravel() for v in vs]) / bc2
        g2v = g**2 / np.maximum(vhat, eps_t**2)
        assert series[N.G2V_RMS][s] == pytest.approx(math.sqrt(g2v.mean()), rel=1e-3)
        assert series[N.EPS_SHARE][s] == pytest.approx(np.mean(np.sqrt(vhat) < eps_t))
        u = np.concatenate([(a - b).ravel() for a, b in zip(r["w0"], r["w1"], strict=True)])
        assert series[N.UPDATE_NORM][s] == pytest.approx(np.linalg.norm(u), rel=1e-5)
        assert series[N.LR][s] == pytest.approx(r["lr"])
    if kind == "amsgrad":
        assert N.AMSGRAD_GAP in series


def test_loss_is_the_batch_loss_history_averages(tmp_path):
    x, y = _data(n=100)
    # full batch: one batch per epoch, History's epoch loss is that batch's loss
    model = _model(keras.optimizers.Adam(1e-2))
    cb = StablestepCallback(store=tmp_path / "k.db", run="full", state_every=None)
    hist = model.fit(x, y, batch_size=100, epochs=5, callbacks=[cb], verbose=0)
    steps, loss = cb.read().series(N.LOSS)
    assert steps.tolist() == list(range(5))
    np.testing.assert_allclose(loss, hist.history["loss"], rtol=1e-6)
    # minibatches 32,32,32,4: History is the sample-weighted mean of the stored batch losses
    model = _model(keras.optimizers.Adam(1e-2))
    cb = StablestepCallback(store=tmp_path / "k.db", run="mini", state_every=3)
    hist = model.fit(x, y, batch_size=32, epochs=3, callbacks=[cb], verbose=0)
    steps, loss = cb.read().series(N.LOSS)
    assert steps.tolist() == list(range(12))
    w = np.array([32, 32, 32, 4], dtype=float)
    means = [(loss[4 * e : 4 * e + 4] * w).sum() / w.sum() for e in range(3)]
    np.testing.assert_allclose(means, hist.history["loss"], rtol=1e-5)
    # detailed steps only every 3rd step
    assert cb.read().series(N.EFF_STEP_MAX)[0].tolist() == [0, 3, 6, 9]


def test_history_is_untouched_and_small_losses_keep_their_digits(tmp_path):
    # one long epoch of full batches: Keras' float32 running sum reaches ~1e3 while the
    # batch loss falls to ~1e-3, whose digits a difference of running sums would lose
    x, y = _data(n=64)
    steps = 400
    xs, ys = np.tile(x, (steps, 1)), np.tile(y, (steps, 1))

    class Forward(keras.callbacks.Callback):  # reference: the loss of the batch, forward only
        def __init__(self):
            super().__init__()
            self.loss = []

        def on_train_batch_begin(self, batch, logs=None):
            pred = _np(self.model(x, training=False))
            self.loss.append(float(np.mean((pred - y) ** 2)))

    hists = []
    for cbs in ([], [StablestepCallback(store=tmp_path / "k.db", run="long", state_every=None)]):
        model = _model(keras.optimizers.Adam(3e-2))
        ref = Forward()
        hist = model.fit(xs, ys, batch_size=64, epochs=1, shuffle=False,
                         callbacks=[*cbs, ref], verbose=0)
        hists.append(hist.history["loss"])
    assert hists[0] == hists[1]  # bit-identical History with the callback
    loss = cbs[0].read().series(N.LOSS)[1]
    assert loss[-1] < 1e-2 * loss[0]
    np.testing.assert_allclose(loss, ref.loss, rtol=2e-5)


def test_lr_schedule_is_the_lr_each_step_used(tmp_path):
    x, y = _data(n=64)
    sched = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=3, decay_rate=0.5)
    model = _model(keras.optimizers.Adam(sched))
    cb = StablestepCallback(store=tmp_path / "k.db", run="sched", every=2, state_every=None)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    steps, lr = cb.read().series(N.LR)
    assert steps.tolist() == [0, 2, 4, 6]
    np.testing.assert_allclose(lr, [1e-2 * 0.5 ** (s / 3) for s in steps], rtol=1e-6)


def test_nonfinite_loss_is_an_event_and_diagnose_reads_the_run(tmp_path):
    x, y = _data(n=64)
    y = y.copy()
    y[40] = np.nan  # batch 2 of every epoch (batch size 16, no shuffle)
    model = _model(keras.optimizers.Adam(1e-2))
    cb = StablestepCallback(store=tmp_path / "k.db", run="nan", state_every=1)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0, shuffle=False)
    run = cb.read()
    steps, loss = run.series(N.LOSS)
    assert steps.tolist() == [0, 1] and np.isfinite(loss).all()
    events = [e for e in run.events if e.kind == N.EVENT_NONFINITE]
    assert [e.step for e in events] == [2, 3]
    assert "loss" in events[0].data["what"] and "grad" in events[0].data["what"]
    assert sum(events[0].data["tensors"].values()) > 0
    for name in run.names():
        assert np.isfinite(run.series(name)[1]).all(), name

    from stablestep.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["diagnose", str(tmp_path / "k.db"), "--json"]) == 0
    findings = json.loads(out.getvalue())["findings"]
    assert any(f["kind"] == "non-finite" for f in findings)


def test_state_round_trip_continues_identically(tmp_path):
    x, y = _data(n=48)
    store = tmp_path / "k.db"

    def fit(model, cb, epochs):
        model.fit(x, y, batch_size=16, epochs=epochs, callbacks=[cb], verbose=0, shuffle=False)

    whole = _model(keras.optimizers.Adam(1e-2, amsgrad=True))
    cb = StablestepCallback(store=store, run="whole", state_every=2)
    fit(whole, cb, 4)

    parts = _model(keras.optimizers.Adam(1e-2, amsgrad=True))
    first = StablestepCallback(store=store, run="parts", state_every=2)
    fit(parts, first, 1)  # 3 steps: the next (3) is not a detailed step, 4 is
    state = first.state_dict()
    assert state["step"] == 3
    fit(parts, first, 1)  # an abandoned continuation, replaced on resume
    # "restore the checkpoint": the same seed and one epoch again give the same model
    parts = _model(keras.optimizers.Adam(1e-2, amsgrad=True))
    fit(parts, StablestepCallback(store=tmp_path / "scratch.db", run="x"), 1)
    second = StablestepCallback(store=store, run="ignored", state_every=2)
    second.load_state_dict(state)
    fit(parts, second, 3)

    a, b = cb.read(), second.read()
    assert b.name == "parts" and a.names() == b.names()
    for name in a.names():
        sa, va = a.series(name)
        sb, vb = b.series(name)
        assert sa.tolist() == sb.tolist(), name
        np.testing.assert_allclose(vb, va, rtol=1e-6, atol=1e-12, err_msg=name)
    with pytest.raises(RuntimeError, match="before the callback records"):
        second.load_state_dict(state)


def test_several_fits_continue_one_run_and_sgd_gets_update_stats(tmp_path):
    x, y = _data(n=32)
    model = _model(keras.optimizers.SGD(1e-2, momentum=0.9))
    cb = StablestepCallback(store=tmp_path / "k.db", run="sgd", state_every=1)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    cb.close()  # closes the store; a later fit reopens the same run
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    run = cb.read()
    assert run.series(N.LOSS)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert run.config["hyper"]["kind"] == "sgd" and run.config["hyper"]["momentum"] == 0.9
    assert N.UPDATE_NORM in run.names() and N.EFF_STEP_MAX not in run.names()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "Invalid every: 0 (a positive int)"),
        ({"state_every": 1.5}, "Invalid state_every: 1.5 (a positive int)"),
        ({"top_k": -1}, "Invalid top_k: -1 (an int >= 0)"),
        ({"config": {"hyper": 1}}, "config key 'hyper' is reserved for the Monitor"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        StablestepCallback(**kwargs)


def test_settings_are_monitor_config_fields():
    from stablestep.telemetry.config import MonitorConfig

    with pytest.raises(TypeError, match="^unknown setting 'evry'; MonitorConfig fields are: every"):
        StablestepCallback(evry=2)
    with pytest.raises(ValueError, match="curvature probe needs a torch optimizer"):
        StablestepCallback(curvature_every=5, curvature_loss=lambda: 0.0)
    cb = StablestepCallback(config=MonitorConfig(state_every=5, top_k=1), top_k=0)
    assert (cb.config.state_every, cb.config.top_k) == (5, 0)  # keywords win


def test_import_sets_no_backend_and_says_how_when_keras_cannot_load(tmp_path):
    # a keras.json naming a backend that is not installed: importing the callback must not
    # switch Keras to another backend behind the user's back, and must say what to set
    import subprocess
    import sys

    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)
    code = (
        "import os, importlib.util, sys\n"
        "if importlib.util.find_spec('jax'): sys.exit(3)\n"
        "try:\n"
        "    import stablestep.integrations.keras\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
        "print('ENV', os.environ.get('KERAS_BACKEND'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode == 3:
        pytest.skip("jax is installed here: the missing-backend case cannot be made")
    assert out.returncode == 0, out.stderr
    assert "ENV None" in out.stdout
    assert "ERR" in out.stdout and "KERAS_BACKEND" in out.stdout


def test_validation_metrics_are_recorded_and_statistics_reach_history(tmp_path):
    x, y = _data(n=64)
    xv, yv = _data(n=32, seed=1)
    model = _model(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    cb = StablestepCallback(store=tmp_path / "k.db", run="val", state_every=2, top_k=0)
    hist = model.fit(x, y, batch_size=16, epochs=3, validation_data=(xv, yv), callbacks=[cb],
                     verbose=0, shuffle=False)
    run = cb.read()
    for key in ("val_loss", "val_mae"):
        steps, vals = run.series(key)
        assert steps.tolist() == [3, 7, 11]  # each epoch's last step (4 batches an epoch)
        np.testing.assert_allclose(vals, hist.history[key], rtol=1e-6)
    # History holds each epoch's largest recorded value, next to Keras' own keys
    for name in (N.EFF_STEP_MAX, N.G2V_RMS, N.GRAD_NORM):
        steps, vals = run.series(name)
        per_epoch = [vals[(steps >= 4 * e) & (steps < 4 * e + 4)].max() for e in range(3)]
        np.testing.assert_allclose(hist.history[f"stablestep/{name}"], per_epoch, rtol=1e-12)
    assert len(hist.history["stablestep/eps_share"]) == 3


def test_steps_per_execution_records_the_state_and_warns_once(tmp_path, caplog):
    # JAX/TensorFlow with steps_per_execution=2 call the batch hooks once per 2 batches
    # (begin_step, end_step); the torch backend refuses k > 1, so drive the hooks as they do
    x, y = _data(n=64)
    model = _model(keras.optimizers.Adam(3e-2, amsgrad=True))
    opt = model.optimizer
    cb = StablestepCallback(store=tmp_path / "k.db", run="spe", state_every=2, top_k=0)
    cb.set_model(model)
    cb.on_train_begin()
    refs = []
    with pytest.warns(RuntimeWarning, match="steps_per_execution=2") as caught:
        for execution in range(3):
            cb.on_train_batch_begin(2 * execution)
            for b in range(2):
                i = 4 * execution + 2 * b
                model.train_on_batch(x[16 * (i % 4) : 16 * (i % 4) + 16],
                                     y[16 * (i % 4) : 16 * (i % 4) + 16])
            var = model.trainable_variables
            vh = [_np(opt._velocity_hats[opt._get_variable_index(v)]) for v in var]
            refs.append({"t": int(_np(opt.iterations)), "vh": vh,
                         "lr": float(_np(opt.learning_rate))})
            cb.on_train_batch_end(2 * execution + 1, {})
    cb.on_train_end()
    assert sum("steps_per_execution" in str(w.message) for w in caught) == 1
    run = cb.read()
    steps, eff = run.series(N.EFF_STEP_MAX)
    assert steps.tolist() == [1, 3, 5]  # stored at each execution's last step
    for e, r in zip(eff, refs, strict=True):
        ref = _reference_eff(opt, {**r, "v": None})
        assert e == pytest.approx(max(a.max() for a in ref), rel=1e-5)
    assert N.AMSGRAD_GAP in run.names() and N.EPS_SHARE in run.names()
    for missing in (N.GRAD_NORM, N.G2V_RMS, N.G2V_MAX, N.UPDATE_NORM):
        assert missing not in run.names()


def test_store_defaults_to_keras_log_dir_and_sinks_get_the_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class ListSink:
        def __init__(self):
            self.rows, self.events, self.closed = [], [], False

        def write(self, step, metrics):
            self.rows.append((step, dict(metrics)))

        def event(self, step, kind, data):
            self.events.append((step, kind))

        def close(self):
            self.closed = True

    x, y = _data(n=32)
    model = _model(keras.optimizers.Adam(1e-2))
    sink = ListSink()
    cb = StablestepCallback(run="default-dir", state_every=None, sinks=[sink])
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    cb.close()
    assert cb.store == os.path.join("logs", "stablestep.db")
    assert (tmp_path / "logs" / "stablestep.db").exists()
    assert [s for s, _ in sink.rows] == [0, 1] and sink.closed
    stored = cb.read().series(N.LOSS)[1].tolist()
    assert [m[N.LOSS] for _, m in sink.rows] == stored
    # a directory as store= holds stablestep.db
    assert StablestepCallback(store=tmp_path / "logs").store == str(
        tmp_path / "logs" / "stablestep.db"
    )


def _writer_can_suffix():
    import inspect as _inspect

    from stablestep.telemetry.store import RunWriter

    return "overwrite" in _inspect.signature(RunWriter).parameters


@pytest.mark.skipif(not _writer_can_suffix(), reason="RunWriter(overwrite=) not merged yet")
def test_fixed_run_name_twice_starts_a_suffixed_run_or_overwrites(tmp_path):
    from stablestep.telemetry.store import list_runs

    x, y = _data(n=32)
    names = []
    for overwrite in (False, False, True):
        model = _model(keras.optimizers.Adam(1e-2))
        cb = StablestepCallback(store=tmp_path / "k.db", run="fixed", overwrite=overwrite,
                                state_every=None)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
        names.append(cb.run_name)
        assert cb.read().name == cb.run_name
    assert names[0] == "fixed" and names[1] != "fixed" and names[1].startswith("fixed")
    assert names[2] == "fixed"
    assert sorted(list_runs(tmp_path / "k.db")) == sorted({"fixed", names[1]})


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="grads come from torch's .grad")
def test_grad_norm_every_step_on_torch_is_the_applied_gradient(tmp_path):
    """On the torch backend ``grad_norm`` is recorded at every step, not only detailed
    ones: against plain SGD's own update, ``|w_{t+1} - w_t| / lr`` (a minibatch fit)."""
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.05))

    class Weights(keras.callbacks.Callback):
        steps: list = []

        def on_train_batch_begin(self, batch, logs=None):
            self.w0 = [_np(v) for v in self.model.trainable_variables]

        def on_train_batch_end(self, batch, logs=None):
            w1 = [_np(v) for v in self.model.trainable_variables]
            self.steps.append({"w0": self.w0, "w1": w1, "lr": 0.05})

    ref = Weights()
    cb = StablestepCallback(store=str(tmp_path / "s.db"), run="sgd", state_every=50)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[ref, cb], verbose=0)
    steps, gn = cb.read().series(N.GRAD_NORM)
    assert steps.tolist() == list(range(len(ref.steps)))  # every step, not every 50th
    want = [math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(r["w0"], r["w1"],
                                                                      strict=True))) / r["lr"]
            for r in ref.steps]
    np.testing.assert_allclose(gn, want, rtol=1e-4)
