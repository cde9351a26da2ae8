"""Tuning runs for benchmarks/wild.py (fifth file): the fourth round's held-out set, run blind once
at commit 3495234 (default Monitor F1 1.000, curvature on 1.000) and then part of tuning, so
it is no longer held out; ``wild_heldout.py`` is the fifth round's blind set.

Held-out runs for benchmarks/wild.py: the fourth round's blind set (57 runs, 14 Keras).

Written after the third round's held-out set was run blind and became the tuning file
``wild_tuning4.py``, before any detector change of this round, and never diagnosed while
it was written: only ``python benchmarks/wild.py --set heldout --labels-only`` was run on
it (it records the runs and checks ``label_holds``, it diagnoses nothing): all 57 labels
held (164 s of recording on one core, 269 s with ``--curvature``; four earlier
constructions whose label did not hold were changed before that). Everything
differs from all four tuning files (tests/diagnosis/test_wild.py checks it): seeds 800-856;
the data generators (``data="fourth"``: a sine-cosine-square MLP target on a two-cluster
input, which the Keras runs share; a CNN that tells a 3x3 plus from a 3x3 cross in noise;
a GPT-2 skip-bigram language, each token a fixed table of the token two back); dataset
sizes (288 / 224 samples, full-batch sets of 52, 60, 88, 104 and 208); widths and depths
(MLP 36, or 28 with three hidden layers; CNN 36 or 20; GPT-2 n_embd 36, or 28 with three
blocks; Keras 36, or 20 with four hidden layers); batch sizes (6, 14, 22, 36, 44, 60, 112
or full batch); every learning rate, lr jump factor and step, outlier scale and step.
Constructions the tuning files lack or have few of: very noisy healthy minibatch training
(batch 6 on GPT-2, 14 on every model; at batch 6 the MLP and Keras runs' running median
wanders 2x, not healthy by ``label_holds``, so they use 22), a healthy full-batch CNN, healthy
AMSGrad on GPT-2 and in Keras, a Keras AdamW lr jump, an outlier batch under plain SGD at
batch 6, a Keras outlier on the four-layer net.

Labels are by construction (benchmarks/wild.py module docstring); ``label_holds`` checks
without any detector that each construction did what its label says (a healthy run must
not rise on its own), and runs whose label does not hold are reported, not scored.
"""

_M = dict(model="mlp", width=36, data="fourth", n=288)
_M3 = dict(model="mlp", width=28, depth=3, data="fourth", n=288)
_C = dict(model="cnn", width=36, data="fourth", n=288)
_C2 = dict(model="cnn", width=20, data="fourth", n=288)
_G = dict(model="gpt2", width=36, data="fourth", n=224)
_G3 = dict(model="gpt2", width=28, depth=3, data="fourth", n=224)
_K = dict(model="keras", width=36, data="fourth", n=288, eps=1e-7)
_K4 = dict(model="keras", width=20, depth=4, data="fourth", n=288, eps=1e-7)

RUNS = [
    # healthy: nothing to find
    dict(kind="healthy", **_M, opt="adam", lr=1.3e-3, batch=14, seed=800),
    dict(kind="healthy", **_M3, opt="ss-adam", lr=6.5e-4, batch=22, seed=801),
    dict(kind="healthy", **_M, opt="ss-adam-tf", eps=1e-7, lr=2.4e-3, batch=112, seed=802),
    dict(kind="healthy", **{**_M, "n": 88}, opt="adamw", lr=1.6e-3, batch=None, seed=803),
    dict(kind="healthy", **{**_M3, "n": 60}, opt="adam", amsgrad=True, lr=1.3e-3,
         batch=None, seed=804),
    dict(kind="healthy", **_C, opt="adamw", lr=1.4e-3, batch=36, seed=805),
    dict(kind="healthy", **_C2, opt="sgd", momentum=0.9, lr=1.6e-2, batch=14, seed=806),
    dict(kind="healthy", **{**_C, "n": 104}, opt="adam", lr=6.5e-4, batch=None, seed=807,
         steps=200),
    dict(kind="healthy", **_G, opt="adam", lr=2.8e-3, batch=14, seed=808, steps=150),
    dict(kind="healthy", **_G3, opt="ss-adam", lr=1.3e-3, batch=6, seed=809, steps=150),
    dict(kind="healthy", **_G, opt="adamw", amsgrad=True, lr=3.6e-3, batch=44, seed=810,
         steps=150),
    dict(kind="healthy", **_K, opt="keras-adam", lr=1.4e-3, batch=14, seed=811),
    dict(kind="healthy", **_K4, opt="keras-sgd", momentum=0.9, lr=1.3e-2, batch=22,
         seed=812),
    dict(kind="healthy", **{**_K, "n": 60}, opt="keras-adamw", lr=7.5e-4, batch=None,
         seed=813),
    dict(kind="healthy", **_K, opt="keras-adam", amsgrad=True, lr=7.5e-4, batch=22, seed=814),
    # blow-up from step 0
    dict(kind="blowup0", **_G, opt="adam", lr=2.2, batch=14, seed=815, steps=60),
    dict(kind="blowup0", **_G3, opt="adamw", lr=1.4, batch=22, seed=816, steps=60),
    dict(kind="blowup0", **{**_M, "n": 104}, opt="sgd", lr=10.0, batch=None, seed=817,
         steps=60),
    dict(kind="blowup0", **_C2, opt="sgd", lr=13.0, batch=36, seed=818, steps=60),
    dict(kind="blowup0", **_M3, opt="ss-adam", lr=4.5, batch=44, seed=819, steps=60),
    dict(kind="blowup0", **_K, opt="keras-adam", lr=3.4, batch=14, seed=820, steps=60),
    dict(kind="blowup0", **_K4, opt="keras-adamw", lr=2.6, batch=44, seed=821, steps=60),
    # lr schedule jumps (some leave the loss high: plateau after the jump)
    dict(kind="jump", **_M, opt="adam", lr=1.3e-3, factor=240.0, at=118, batch=14,
         seed=822, steps=190),
    dict(kind="jump", **_M3, opt="ss-adam-tf", eps=1e-7, lr=6.5e-4, factor=650.0, at=102,
         batch=36, seed=823, steps=170),
    dict(kind="jump", **{**_C, "n": 104}, opt="sgd", lr=1.6e-2, factor=64.0, at=92,
         batch=None, seed=824, steps=160),
    dict(kind="jump", **_C2, opt="adamw", lr=1.4e-3, factor=420.0, at=112, batch=36,
         seed=825, steps=180),
    dict(kind="jump", **_G, opt="adam", lr=2.8e-3, factor=26.0, at=136, batch=14, seed=826,
         steps=200),  # falls back to chance level (about 2x) and stays there
    dict(kind="jump", **_G3, opt="ss-adam", lr=1.3e-3, factor=900.0, at=74, batch=22,
         seed=827, steps=140),
    dict(kind="jump", **_M, opt="adam", amsgrad=True, lr=1.6e-3, factor=160.0, at=126,
         batch=60, seed=828, steps=200),
    dict(kind="jump", **_K, opt="keras-adam", lr=1.4e-3, factor=320.0, at=114, batch=14,
         seed=829, steps=180),
    dict(kind="jump", **_K4, opt="keras-sgd", momentum=0.9, lr=1.3e-2, factor=75.0, at=98,
         batch=22, seed=830, steps=160),
    dict(kind="jump", **_K, opt="keras-adamw", lr=2.4e-3, factor=480.0, at=123, batch=44,
         seed=831, steps=190),
    # too large an lr that sends the loss up and keeps it there
    dict(kind="plateau", **_G, opt="adamw", lr=0.42, batch=14, seed=832, steps=100),
    dict(kind="plateau", **_G3, opt="adam", lr=0.62, batch=22, seed=833, steps=100),
    dict(kind="plateau", **_C, opt="adam", lr=0.26, batch=36, seed=834, steps=100),
    dict(kind="plateau", **_M3, opt="adamw", lr=0.58, batch=44, seed=835, steps=100),
    dict(kind="plateau", **_K, opt="keras-adam", lr=0.48, batch=14, seed=836, steps=100),
    # gradient descent above its stable lr
    dict(kind="sgd-high", **{**_M, "n": 208}, opt="sgd", lr=1.3, batch=None, seed=837,
         steps=150),
    dict(kind="sgd-high", **{**_M, "n": 208}, opt="sgd", lr=0.28, batch=None, seed=838,
         steps=150),
    dict(kind="sgd-high", **{**_M, "n": 208}, opt="sgd", momentum=0.9, lr=0.17, batch=None,
         seed=839, steps=150),
    dict(kind="sgd-high", **{**_C, "n": 208}, opt="sgd", lr=0.52, batch=None, seed=840,
         steps=150, extra={"mse": True}),
    dict(kind="sgd-high", **{**_C2, "n": 208}, opt="sgd", momentum=0.6, lr=0.19,
         batch=None, seed=841, steps=150),  # cross-entropy: catapults, then trains
    dict(kind="sgd-high", **{**_M3, "n": 208}, opt="sgd", momentum=0.5, lr=0.42,
         batch=None, seed=842, steps=150),
    dict(kind="sgd-high", **{**_K, "n": 208}, opt="keras-sgd", lr=1.4, batch=None,
         seed=843, steps=150),
    # full-batch Adam at the adaptive edge of stability
    dict(kind="aeos", **{**_M, "n": 52}, opt="adam", lr=1.3e-2, batch=None, seed=844,
         steps=700),
    dict(kind="aeos", **{**_M3, "n": 88}, opt="ss-adam", lr=9.5e-3, batch=None, seed=845,
         steps=700),
    dict(kind="aeos", **{**_M, "n": 60}, opt="ss-adam-tf", lr=1.6e-2, batch=None, seed=846,
         steps=700),
    dict(kind="aeos", **{**_C, "n": 52}, opt="adam", lr=2.6e-3, batch=None, seed=847,
         steps=600, extra={"mse": True}),
    dict(kind="aeos", **{**_K, "n": 52}, opt="keras-adam", lr=1.3e-2, batch=None,
         seed=848, steps=700),
    # one corrupted minibatch
    dict(kind="outlier", **_M, opt="adam", lr=1.3e-3, factor=44.0, at=157, batch=36,
         seed=849, steps=220),
    dict(kind="outlier", **_M3, opt="ss-adam-tf", eps=1e-7, lr=6.5e-4, factor=58.0, at=133,
         batch=14, seed=850, steps=190),
    dict(kind="outlier", **_C, opt="adamw", lr=1.4e-3, factor=110.0, at=146, batch=36,
         seed=851, steps=200),
    dict(kind="outlier", **_C2, opt="sgd", momentum=0.9, lr=1.6e-2, factor=52.0, at=129,
         batch=14, seed=852, steps=180),
    dict(kind="outlier", **_M, opt="sgd", lr=4.4e-2, factor=66.0, at=152, batch=6,
         seed=853, steps=210),
    dict(kind="outlier", **_M, opt="adamw", amsgrad=True, lr=2.4e-3, factor=62.0, at=142,
         batch=112, seed=854, steps=190),
    dict(kind="outlier", **_K, opt="keras-adam", lr=1.4e-3, factor=46.0, at=163, batch=14,
         seed=855, steps=220),
    dict(kind="outlier", **_K4, opt="keras-adamw", lr=2.4e-3, factor=54.0, at=168,
         batch=22, seed=856, steps=230),
]
