"""Second tuning file for benchmarks/wild.py: the FIRST held-out set, seen now.

These 41 runs were the held-out set of the previous round (F1 0.928); their failures were
looked at and led to fixes, so they are no longer blind and count as tuning runs
(``--set tuning`` runs ``wild_tuning.py`` and this file). The new held-out set is
``wild_heldout.py``.

Seeds 200-240, widths (48 MLP, 40 CNN, n_embd 48 GPT-2), learning rates, batch sizes (8, 16,
64), jump steps/factors and outlier steps/scales all differ from ``wild_tuning.py``.
"""

_M = dict(model="mlp", width=48)
_C = dict(model="cnn", width=40)
_G = dict(model="gpt2", width=48, n=128)

RUNS = [
    # healthy: nothing to find
    dict(kind="healthy", **_M, opt="adam", lr=2e-3, batch=64, seed=200),
    dict(kind="healthy", **_M, opt="ss-adam-tf", lr=1e-3, batch=16, seed=201),
    dict(kind="healthy", **_C, opt="adamw", lr=2e-3, batch=64, seed=202),
    dict(kind="healthy", **_C, opt="sgd", lr=3e-2, batch=16, seed=203),
    dict(kind="healthy", **_G, opt="adamw", lr=2e-3, batch=32, seed=204, steps=150),
    dict(kind="healthy", **_G, opt="ss-adam", lr=1e-3, batch=8, seed=205, steps=150),
    dict(kind="healthy", **_M, opt="sgd", momentum=0.9, lr=1e-2, batch=None, seed=206),
    dict(kind="healthy", **_M, opt="adam", amsgrad=True, lr=3e-3, batch=None, seed=207),
    # blow-up from step 0
    dict(kind="blowup0", **_G, opt="adamw", lr=2.0, batch=32, seed=208, steps=60),
    dict(kind="blowup0", **_G, opt="adam", lr=0.8, batch=8, seed=209, steps=60),
    dict(kind="blowup0", **_M, opt="sgd", lr=5.0, batch=None, seed=210, steps=60),
    dict(kind="blowup0", **_C, opt="sgd", lr=20.0, batch=64, seed=211, steps=60),
    dict(kind="blowup0", **_M, opt="ss-adam-tf", lr=3.0, batch=16, seed=212, steps=60),
    dict(kind="blowup0", **_C, opt="adam", lr=1.0, batch=16, seed=213, steps=60),
    # lr schedule jumps
    dict(kind="jump", **_M, opt="adam", lr=2e-3, factor=200.0, at=130, batch=64, seed=214,
         steps=220),
    dict(kind="jump", **_M, opt="ss-adam", lr=1e-3, factor=500.0, at=90, batch=16, seed=215,
         steps=180),
    dict(kind="jump", **_C, opt="sgd", lr=3e-2, factor=50.0, at=100, batch=None, seed=216,
         steps=180),
    dict(kind="jump", **_C, opt="adamw", lr=1e-3, factor=300.0, at=140, batch=64, seed=217,
         steps=220),
    dict(kind="jump", **_G, opt="adamw", lr=1e-3, factor=400.0, at=80, batch=32, seed=218,
         steps=140),
    dict(kind="jump", **_M, opt="sgd", momentum=0.9, lr=5e-3, factor=100.0, at=110,
         batch=None, seed=219, steps=180),
    dict(kind="jump", **_G, opt="ss-adam-tf", lr=1e-3, factor=500.0, at=70, batch=8,
         seed=220, steps=130),
    # too large an lr that sends the loss up and keeps it there
    dict(kind="plateau", **_G, opt="adamw", lr=0.4, batch=32, seed=221, steps=100),
    dict(kind="plateau", **_G, opt="adam", lr=0.3, batch=8, seed=222, steps=100),
    dict(kind="plateau", **_C, opt="adam", lr=0.3, batch=64, seed=223, steps=100),
    dict(kind="plateau", **_M, opt="adamw", lr=0.5, batch=16, seed=224, steps=100),
    # gradient descent above its stable lr
    dict(kind="sgd-high", **_M, opt="sgd", lr=0.8, batch=None, seed=225, steps=150),
    dict(kind="sgd-high", **_M, opt="sgd", momentum=0.9, lr=0.15, batch=None, seed=226,
         steps=150),
    dict(kind="sgd-high", **_C, opt="sgd", lr=2.0, batch=None, seed=227, steps=150),
    dict(kind="sgd-high", **_M, opt="sgd", momentum=0.5, lr=0.4, batch=None, seed=228,
         steps=150),
    dict(kind="sgd-high", **_C, opt="sgd", momentum=0.9, lr=0.5, batch=None, seed=229,
         steps=150),
    # full-batch Adam at the adaptive edge of stability
    dict(kind="aeos", **_M, opt="adam", lr=1.5e-2, n=48, batch=None, seed=230, steps=700),
    dict(kind="aeos", **_M, opt="ss-adam", lr=1e-2, n=96, batch=None, seed=231, steps=700),
    dict(kind="aeos", **_M, opt="ss-adam-tf", lr=1e-2, n=48, batch=None, seed=232,
         steps=700),
    dict(kind="aeos", **_C, opt="adam", lr=3e-3, n=64, batch=None, seed=233, steps=600,
         extra={"mse": True}),
    dict(kind="aeos", **_M, opt="adamw", lr=8e-3, n=48, batch=None, seed=234, steps=700),
    # one corrupted minibatch
    dict(kind="outlier", **_M, opt="adam", lr=1e-3, factor=40.0, at=170, batch=64, seed=235,
         steps=230),
    dict(kind="outlier", **_M, opt="ss-adam-tf", lr=1e-3, factor=25.0, at=140, batch=16,
         seed=236, steps=200),
    dict(kind="outlier", **_C, opt="adamw", lr=1e-3, factor=100.0, at=150, batch=64, seed=237,
         steps=210),
    dict(kind="outlier", **_C, opt="sgd", momentum=0.9, lr=2e-2, factor=30.0, at=120,
         batch=16, seed=238, steps=180),
    dict(kind="outlier", **_M, opt="sgd", lr=5e-2, factor=40.0, at=160, batch=16, seed=239,
         steps=220),
    dict(kind="outlier", **_C, opt="adam", lr=1e-3, factor=50.0, at=200, batch=16, seed=240,
         steps=260),
]
