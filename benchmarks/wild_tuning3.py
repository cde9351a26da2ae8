"""Tuning runs for benchmarks/wild.py (third file): the second round's held-out set.

It was run blind once (F1 0.840 at commit 8200560) and its failures then led to fixes, so
it is no longer held out; ``wild_heldout.py`` is the third round's blind set.

The previous held-out set (seeds 200-240) was seen (its failures led to fixes) and is now
the tuning file ``wild_tuning2.py``. This file replaced it before any detector change of
this round. Everything differs from both tuning files (tests/diagnosis/test_wild.py checks
it): seeds 400-447; the data generators (``data="alt"``: another MLP target on uniform
inputs, another CNN task, a noisier bigram language); dataset sizes (320 / 160 samples,
full-batch sets of 40, 56 and 80); widths (MLP 24 with three hidden layers or 40, CNN 56
or 24, GPT-2 n_embd 40); batch sizes (12, 24, 48 or full batch); every learning rate, lr
jump factor and step, outlier scale and step; Keras 3 runs (torch backend) recorded by
stablestep's Keras callback, which neither tuning file has.

Labels are by construction (benchmarks/wild.py module docstring); ``label_holds`` checks
without any detector that each construction did what its label says (a healthy run must
not rise 2x on its own), and runs whose label does not hold are reported, not scored.
"""

_M = dict(model="mlp", width=40, data="alt", n=320)
_M3 = dict(model="mlp", width=24, depth=3, data="alt", n=320)
_C = dict(model="cnn", width=56, data="alt", n=320)
_C2 = dict(model="cnn", width=24, data="alt", n=320)
_G = dict(model="gpt2", width=40, data="alt", n=160)
_K = dict(model="keras", width=40, data="alt", n=320, eps=1e-7)
_K3 = dict(model="keras", width=24, depth=3, data="alt", n=320, eps=1e-7)

RUNS = [
    # healthy: nothing to find
    dict(kind="healthy", **_M3, opt="adam", lr=1.2e-3, batch=24, seed=400),
    dict(kind="healthy", **_M, opt="ss-adam-tf", eps=1e-7, lr=7e-4, batch=12, seed=401),
    dict(kind="healthy", **_C, opt="adamw", lr=1.5e-3, batch=48, seed=402),
    dict(kind="healthy", **_C2, opt="sgd", momentum=0.8, lr=4e-2, batch=24, seed=403),
    dict(kind="healthy", **_G, opt="adamw", lr=1.5e-3, batch=24, seed=404, steps=150),
    dict(kind="healthy", **_M, opt="sgd", lr=1.8e-2, batch=None, seed=405),
    dict(kind="healthy", **_K, opt="keras-adam", lr=1.2e-3, batch=24, seed=406),
    dict(kind="healthy", **_K3, opt="keras-sgd", momentum=0.9, lr=6e-3, batch=12, seed=407),
    dict(kind="healthy", **_M, opt="adamw", amsgrad=True, lr=7e-4, batch=None, seed=408),
    # blow-up from step 0
    dict(kind="blowup0", **_G, opt="adamw", lr=1.5, batch=24, seed=409, steps=60),
    dict(kind="blowup0", **_G, opt="ss-adam", lr=0.65, batch=12, seed=410, steps=60),
    dict(kind="blowup0", **_M3, opt="sgd", lr=7.0, batch=None, seed=411, steps=60),
    dict(kind="blowup0", **_C, opt="sgd", lr=12.0, batch=48, seed=412, steps=60),
    dict(kind="blowup0", **_M, opt="adam", lr=2.5, batch=12, seed=413, steps=60),
    dict(kind="blowup0", **_K, opt="keras-adam", lr=3.5, batch=24, seed=414, steps=60),
    dict(kind="blowup0", **_K, opt="keras-sgd", lr=6.0, batch=24, seed=415, steps=60),
    # lr schedule jumps
    dict(kind="jump", **_M, opt="adam", lr=1.2e-3, factor=250.0, at=121, batch=48, seed=416,
         steps=200),
    dict(kind="jump", **_M3, opt="ss-adam-tf", eps=1e-7, lr=7e-4, factor=600.0, at=103,
         batch=12, seed=417, steps=180),
    dict(kind="jump", **_C, opt="sgd", lr=2.5e-2, factor=60.0, at=93, batch=None, seed=418,
         steps=170),
    dict(kind="jump", **_C2, opt="adamw", lr=7e-4, factor=450.0, at=113, batch=24, seed=419,
         steps=190),
    dict(kind="jump", **_G, opt="adam", lr=7e-4, factor=700.0, at=63, batch=12, seed=420,
         steps=120),
    dict(kind="jump", **_M, opt="sgd", momentum=0.8, lr=4e-3, factor=150.0, at=97,
         batch=None, seed=421, steps=170),
    dict(kind="jump", **_K, opt="keras-adam", lr=1.2e-3, factor=350.0, at=107, batch=24,
         seed=422, steps=180),
    dict(kind="jump", **_K, opt="keras-sgd", lr=6e-3, factor=250.0, at=87, batch=12,
         seed=423, steps=160),
    # too large an lr that sends the loss up and keeps it there
    dict(kind="plateau", **_G, opt="adamw", lr=0.35, batch=24, seed=424, steps=100),
    dict(kind="plateau", **_G, opt="ss-adam-tf", eps=1e-7, lr=0.25, batch=12, seed=425,
         steps=100),
    dict(kind="plateau", **_C, opt="adam", lr=0.25, batch=48, seed=426, steps=100),
    dict(kind="plateau", **_M3, opt="adamw", lr=0.45, batch=24, seed=427, steps=100),
    dict(kind="plateau", **_K, opt="keras-adamw", lr=0.45, batch=24, seed=428, steps=100),
    # gradient descent above its stable lr
    dict(kind="sgd-high", **_M, opt="sgd", lr=0.9, batch=None, seed=429, steps=150),
    dict(kind="sgd-high", **_M3, opt="sgd", momentum=0.9, lr=0.12, batch=None, seed=430,
         steps=150),
    dict(kind="sgd-high", **_C, opt="sgd", lr=1.2, batch=None, seed=431, steps=150),
    dict(kind="sgd-high", **_M, opt="sgd", momentum=0.6, lr=0.45, batch=None, seed=432,
         steps=150),
    dict(kind="sgd-high", **_C2, opt="sgd", momentum=0.9, lr=0.35, batch=None, seed=433,
         steps=150),
    dict(kind="sgd-high", **_K, opt="keras-sgd", lr=0.9, batch=None, seed=434, steps=150),
    # full-batch Adam at the adaptive edge of stability
    dict(kind="aeos", **{**_M, "n": 40}, opt="adam", lr=1.2e-2, batch=None, seed=435,
         steps=700),
    dict(kind="aeos", **{**_M3, "n": 80}, opt="ss-adam", lr=7e-3, batch=None, seed=436,
         steps=700),
    dict(kind="aeos", **{**_M, "n": 56}, opt="ss-adam-tf", lr=1.2e-2, batch=None, seed=437,
         steps=700),
    dict(kind="aeos", **{**_C, "n": 56}, opt="adam", lr=2.5e-3, batch=None, seed=438,
         steps=600, extra={"mse": True}),
    dict(kind="aeos", **{**_M, "n": 40}, opt="adamw", lr=6e-3, batch=None, seed=439,
         steps=700),
    dict(kind="aeos", **{**_K, "n": 40}, opt="keras-adam", lr=1.2e-2, batch=None, seed=440,
         steps=700),
    # one corrupted minibatch
    dict(kind="outlier", **_M, opt="adam", lr=1.2e-3, factor=35.0, at=165, batch=48,
         seed=441, steps=220),
    dict(kind="outlier", **_M3, opt="ss-adam-tf", eps=1e-7, lr=7e-4, factor=60.0, at=135,
         batch=24, seed=442, steps=190),
    dict(kind="outlier", **_C, opt="adamw", lr=1.5e-3, factor=80.0, at=145, batch=48,
         seed=443, steps=200),
    dict(kind="outlier", **_C2, opt="sgd", momentum=0.8, lr=2.5e-2, factor=45.0, at=125,
         batch=24, seed=444, steps=180),
    dict(kind="outlier", **_M, opt="sgd", lr=4e-2, factor=35.0, at=155, batch=12, seed=445,
         steps=210),
    dict(kind="outlier", **_K, opt="keras-adam", lr=1.2e-3, factor=45.0, at=153, batch=24,
         seed=446, steps=200),
    dict(kind="outlier", **_K3, opt="keras-sgd", momentum=0.9, lr=6e-3, factor=35.0, at=143,
         batch=12, seed=447, steps=190),
]
