"""Tuning runs for benchmarks/wild.py: what the inference rules were looked at on.

Seeds 0-9 and the settings below; ``wild_heldout.py`` uses other seeds (200+), widths,
learning rates, batch sizes and jump/outlier steps (tests/diagnosis/test_wild.py checks
that the two sets are disjoint).
"""

RUNS = [
    dict(kind="healthy", model="mlp", opt="adam", lr=1e-3, seed=0, batch=32),
    dict(kind="healthy", model="cnn", opt="sgd", lr=5e-2, momentum=0.9, seed=1, batch=32),
    dict(kind="healthy", model="gpt2", opt="adamw", lr=3e-3, seed=2, batch=16, n=128,
         steps=150),
    dict(kind="blowup0", model="gpt2", opt="adamw", lr=1.0, seed=3, batch=16, n=128, steps=60),
    dict(kind="blowup0", model="mlp", opt="sgd", lr=3.0, seed=4, batch=None, steps=60),
    dict(kind="jump", model="mlp", opt="adam", lr=1e-3, factor=300.0, at=150, seed=5, batch=32),
    dict(kind="jump", model="cnn", opt="sgd", lr=2e-2, factor=40.0, at=120, seed=6, batch=None,
         steps=200),
    dict(kind="plateau", model="gpt2", opt="adamw", lr=0.5, seed=7, batch=16, n=128, steps=100),
    dict(kind="sgd-high", model="mlp", opt="sgd", lr=0.6, seed=8, batch=None, steps=120),
    dict(kind="aeos", model="mlp", opt="adam", lr=1e-2, seed=9, batch=None, n=64, width=64,
         steps=700),
    dict(kind="outlier", model="mlp", opt="adam", lr=1e-3, factor=30.0, at=180, seed=0,
         batch=32),
    dict(kind="outlier", model="cnn", opt="adamw", lr=1e-3, factor=30.0, at=160, seed=1,
         batch=32, steps=250),
    dict(kind="aeos", model="cnn", opt="ss-adam", lr=5e-3, seed=3, batch=None, n=96,
         steps=600, extra={"mse": True}),
    dict(kind="sgd-high", model="cnn", opt="sgd", momentum=0.8, lr=0.7, seed=4, batch=None,
         steps=150),
    dict(kind="blowup0", model="mlp", opt="adam", lr=4.0, seed=5, batch=32, steps=60),
    dict(kind="healthy", model="mlp", opt="ss-adam", amsgrad=True, lr=1e-3, seed=6,
         batch=None),
]
