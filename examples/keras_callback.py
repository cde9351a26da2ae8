"""Periodic spikes in Keras 3: roughly periodic loss spikes with Adam, gone with amsgrad=True.

A Keras user (periodic spikes: tf.keras, Adam, a custom loss) sees the loss spike again and again
once it has flattened. Here: a one-hidden-layer tanh network fitted full-batch to
``y = sin(3 * sum(x))`` on 128 points, 4000 Adam steps, once with Keras' default Adam
(lr 1e-3, epsilon 1e-7) and once with ``amsgrad=True``. ``StablestepCallback`` writes both
runs into one store; then ``stablestep diagnose`` explains them. About a minute on a CPU.

    python examples/keras_callback.py [STORE]        # default: keras_periodic_spikes.db
    stablestep diagnose keras_periodic_spikes.db             # the same diagnosis, again
    stablestep report keras_periodic_spikes.db -o periodic_spikes.html
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")  # any backend; before importing keras

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stablestep.cli import main as stablestep_cli  # noqa: E402
from stablestep.integrations.keras import StablestepCallback  # noqa: E402
from stablestep.telemetry.config import MonitorConfig  # noqa: E402

STEPS, N, DIM, WIDTH = 4000, 128, 4, 256


def fit(amsgrad: bool, store: str) -> tuple[np.ndarray, dict]:
    """Train the periodic-spikes network for STEPS full-batch steps; return the batch losses and
    Keras' History (which holds stablestep's per-epoch statistics too)."""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype("float32")  # 1. small data, made here
    y = np.sin(3.0 * x.sum(1, keepdims=True)).astype("float32")
    model = keras.Sequential(  # 2. the model
        [keras.Input((DIM,)), keras.layers.Dense(WIDTH, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3, amsgrad=amsgrad), loss="mse")
    name = "amsgrad" if amsgrad else "adam"
    # 3. stablestep's eyes; overwrite=True: running the example again replaces its runs
    cb = StablestepCallback(store=store, run=name, config=MonitorConfig(state_every=10),
                            overwrite=True)
    # 4. STEPS full-batch steps in 10 epochs (History gets one row per epoch)
    xs, ys = np.tile(x, (STEPS // 10, 1)), np.tile(y, (STEPS // 10, 1))
    hist = model.fit(xs, ys, batch_size=N, epochs=10, shuffle=False, callbacks=[cb], verbose=0)
    cb.close()
    return cb.read().series("loss")[1], hist.history


def spikes(loss: np.ndarray, factor: float = 3.0, window: int = 50) -> int:
    """Steps whose loss exceeds ``factor`` times the median of the previous ``window``."""
    hits = (loss[i] > factor * np.median(loss[i - window : i]) for i in range(window, len(loss)))
    return int(sum(hits))


def run(store: str) -> None:
    """Both variants into ``store`` (replaced), a one-line summary each, then the diagnosis."""
    torch.set_num_threads(1)  # tiny model: threads only add overhead
    for amsgrad in (False, True):
        loss, history = fit(amsgrad, store)
        label = "Adam amsgrad=True" if amsgrad else "Adam (Keras defaults)"
        eff = max(history["stablestep/eff_step_max"])
        print(f"{label:22s} final loss {loss[-1]:.2e}, spikes (>3x recent median): "
              f"{spikes(loss)}, largest effective step (History) {eff:.2e}")
    print(f"\n$ stablestep diagnose {store}")
    if not sys.stdout.isatty():  # piped: rich would assume 80 columns
        os.environ.setdefault("COLUMNS", "120")
    stablestep_cli(["diagnose", store])


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "keras_periodic_spikes.db")
