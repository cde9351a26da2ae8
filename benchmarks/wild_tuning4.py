"""Tuning runs for benchmarks/wild.py (fourth file): the third round's held-out set, run blind once
at commit cf51547 (default Monitor F1 0.964, curvature on 0.976) and then looked at, so it is
no longer held out; ``wild_heldout.py`` is the fourth round's blind set.

Held-out runs for benchmarks/wild.py: the third round's blind set (55 runs, 12 Keras).

Written before any detector change of this round and never diagnosed while it was written:
only ``python benchmarks/wild.py --set heldout --labels-only`` was run on it (it records the
runs and checks ``label_holds``, it diagnoses nothing); all 55 labels held (about 2 min 15 s
of recording on one core). The second round's held-out set was seen and is now the tuning
file ``wild_tuning3.py``. Everything differs from all three tuning files
(tests/diagnosis/test_wild.py checks it): seeds 700-754; the data generators
(``data="third"``: a tanh-gated MLP target on heavy-tailed Laplace inputs, which the Keras
runs share; a CNN that tells a vertical from a horizontal bar in noise; a GPT-2 walk
language whose stride is only known from the context); dataset sizes (384 / 192 samples,
full-batch sets of 36, 44, 72, 192 and 384); widths and depths (MLP 56, or 20 with four
hidden layers; CNN 48 or 28; GPT-2 n_embd 56, or 24 with three blocks; Keras 48, or 28
with three hidden layers); batch sizes (10, 20, 28, 40, 56, 80, 96, 128 or full batch);
every learning rate, lr jump factor and step, outlier scale and step. Constructions the
tuning files lack: a GPT-2 jump after which the loss falls back to chance level (about 2x
its trained loss) and stays there, AMSGrad under an lr jump and an outlier batch, Keras
AdamW, full-batch SGD that trains for 30 steps before it sharpens past its stable lr and
diverges, square-loss CNNs above SGD's stable lr (one with momentum, one catapults and
dies).

Labels are by construction (benchmarks/wild.py module docstring); ``label_holds`` checks
without any detector that each construction did what its label says (a healthy run must
not rise on its own), and runs whose label does not hold are reported, not scored.
"""

_M = dict(model="mlp", width=56, data="third", n=384)
_M4 = dict(model="mlp", width=20, depth=4, data="third", n=384)
_C = dict(model="cnn", width=48, data="third", n=384)
_C2 = dict(model="cnn", width=28, data="third", n=384)
_G = dict(model="gpt2", width=56, data="third", n=192)
_G3 = dict(model="gpt2", width=24, depth=3, data="third", n=192)
_K = dict(model="keras", width=48, data="third", n=384, eps=1e-7)
_K3 = dict(model="keras", width=28, depth=3, data="third", n=384, eps=1e-7)

RUNS = [
    # healthy: nothing to find
    dict(kind="healthy", **_M, opt="adam", lr=9e-4, batch=40, seed=700),
    dict(kind="healthy", **_M4, opt="ss-adam", lr=1.8e-3, batch=20, seed=701),
    dict(kind="healthy", **_M, opt="ss-adam-tf", eps=1e-7, lr=8e-4, batch=128, seed=702),
    dict(kind="healthy", **{**_M, "n": 72}, opt="adamw", lr=6e-4, batch=None, seed=703),
    dict(kind="healthy", **{**_M4, "n": 72}, opt="adam", amsgrad=True, lr=1.1e-3,
         batch=None, seed=704),
    dict(kind="healthy", **_C, opt="adam", lr=1.1e-3, batch=56, seed=705),
    dict(kind="healthy", **_C2, opt="sgd", momentum=0.9, lr=2.2e-2, batch=20, seed=706),
    dict(kind="healthy", **_G, opt="adamw", lr=1.8e-3, batch=20, seed=707, steps=150),
    dict(kind="healthy", **_G3, opt="ss-adam-tf", eps=1e-7, lr=2.2e-3, batch=10, seed=708,
         steps=150),
    dict(kind="healthy", **_C, opt="ss-adam", lr=3.3e-3, batch=80, seed=753),
    dict(kind="healthy", **_G3, opt="adam", lr=3.3e-3, batch=28, seed=754, steps=150),
    dict(kind="healthy", **_K, opt="keras-adam", lr=9e-4, batch=28, seed=709),
    dict(kind="healthy", **_K, opt="keras-adamw", lr=1.8e-3, batch=56, seed=710),
    dict(kind="healthy", **_K3, opt="keras-sgd", momentum=0.9, lr=8.5e-3, batch=20, seed=711),
    # blow-up from step 0
    dict(kind="blowup0", **_G, opt="adamw", lr=1.8, batch=20, seed=712, steps=60),
    dict(kind="blowup0", **_G3, opt="ss-adam-tf", eps=1e-7, lr=1.1, batch=10, seed=713,
         steps=60),
    dict(kind="blowup0", **_M4, opt="sgd", lr=8.0, batch=None, seed=714, steps=60),
    dict(kind="blowup0", **_C, opt="sgd", lr=15.0, batch=40, seed=715, steps=60),
    dict(kind="blowup0", **_M, opt="adam", lr=3.2, batch=96, seed=716, steps=60),
    dict(kind="blowup0", **_K, opt="keras-adam", lr=2.8, batch=28, seed=717, steps=60),
    dict(kind="blowup0", **_K3, opt="keras-sgd", lr=9.0, batch=56, seed=718, steps=60),
    # lr schedule jumps (some leave the loss high: plateau after the jump)
    dict(kind="jump", **_M, opt="adam", lr=9e-4, factor=220.0, at=117, batch=40, seed=719,
         steps=190),
    dict(kind="jump", **_M4, opt="ss-adam", lr=1.8e-3, factor=550.0, at=99, batch=20,
         seed=720, steps=170),
    dict(kind="jump", **_C, opt="sgd", lr=2.2e-2, factor=70.0, at=89, batch=None,
         seed=721, steps=160),
    dict(kind="jump", **_C2, opt="adamw", lr=1.1e-3, factor=380.0, at=109, batch=56,
         seed=722, steps=180),
    dict(kind="jump", **_G, opt="adam", lr=1.8e-3, factor=32.0, at=141, batch=20, seed=723,
         steps=210),  # falls back to chance level (about 2x) and stays there
    dict(kind="jump", **_G3, opt="adamw", lr=1.8e-3, factor=800.0, at=77, batch=10,
         seed=724, steps=140),
    dict(kind="jump", **_M, opt="adam", amsgrad=True, lr=1.1e-3, factor=120.0, at=131,
         batch=80, seed=725, steps=200),
    dict(kind="jump", **_K, opt="keras-adam", lr=9e-4, factor=280.0, at=111, batch=28,
         seed=726, steps=180),
    dict(kind="jump", **_K3, opt="keras-sgd", momentum=0.9, lr=8.5e-3, factor=90.0, at=95,
         batch=20, seed=727, steps=160),
    # too large an lr that sends the loss up and keeps it there
    dict(kind="plateau", **_G, opt="adamw", lr=0.38, batch=20, seed=728, steps=100),
    dict(kind="plateau", **_G3, opt="adam", lr=0.75, batch=10, seed=729, steps=100),
    dict(kind="plateau", **_C, opt="adamw", lr=0.22, batch=56, seed=730, steps=100),
    dict(kind="plateau", **_M4, opt="adam", lr=0.55, batch=40, seed=731, steps=100),
    dict(kind="plateau", **_K, opt="keras-adam", lr=0.55, batch=28, seed=732, steps=100),
    # gradient descent above its stable lr
    dict(kind="sgd-high", **{**_M, "n": 192}, opt="sgd", lr=1.1, batch=None, seed=733,
         steps=150),
    dict(kind="sgd-high", **{**_M, "n": 192}, opt="sgd", lr=0.32, batch=None, seed=752,
         steps=150),  # trains for 30 steps, then sharpens past 2/lr and diverges
    dict(kind="sgd-high", **{**_M, "n": 192}, opt="sgd", momentum=0.9, lr=0.14, batch=None,
         seed=734, steps=150),
    dict(kind="sgd-high", **{**_C, "n": 192}, opt="sgd", lr=0.47, batch=None, seed=735,
         steps=150, extra={"mse": True}),
    dict(kind="sgd-high", **{**_C2, "n": 192}, opt="sgd", momentum=0.7, lr=0.16,
         batch=None, seed=736, steps=150, extra={"mse": True}),
    dict(kind="sgd-high", **{**_M4, "n": 192}, opt="sgd", momentum=0.5, lr=0.36,
         batch=None, seed=737, steps=150),
    dict(kind="sgd-high", **{**_K, "n": 192}, opt="keras-sgd", lr=1.1, batch=None,
         seed=738, steps=150),
    # full-batch Adam at the adaptive edge of stability
    dict(kind="aeos", **{**_M, "n": 36}, opt="adam", lr=1.1e-2, batch=None, seed=739,
         steps=700),
    dict(kind="aeos", **{**_M4, "n": 72}, opt="ss-adam", lr=9e-3, batch=None, seed=740,
         steps=700),
    dict(kind="aeos", **{**_M, "n": 44}, opt="ss-adam-tf", lr=1.4e-2, batch=None, seed=741,
         steps=700),
    dict(kind="aeos", **{**_C, "n": 44}, opt="adam", lr=2.2e-3, batch=None, seed=742,
         steps=600, extra={"mse": True}),
    dict(kind="aeos", **{**_K, "n": 44}, opt="keras-adam", lr=1.1e-2, batch=None,
         seed=743, steps=700),
    # one corrupted minibatch
    dict(kind="outlier", **_M, opt="adam", lr=9e-4, factor=38.0, at=161, batch=40,
         seed=744, steps=220),
    dict(kind="outlier", **_M4, opt="ss-adam-tf", eps=1e-7, lr=8e-4, factor=55.0, at=137,
         batch=20, seed=745, steps=190),
    dict(kind="outlier", **_C, opt="adamw", lr=1.1e-3, factor=85.0, at=147, batch=56,
         seed=746, steps=200),
    dict(kind="outlier", **_C2, opt="sgd", momentum=0.9, lr=2.2e-2, factor=42.0, at=127,
         batch=20, seed=747, steps=180),
    dict(kind="outlier", **_M, opt="sgd", lr=3.3e-2, factor=33.0, at=151, batch=10,
         seed=748, steps=210),
    dict(kind="outlier", **_M, opt="adamw", amsgrad=True, lr=1.8e-3, factor=48.0, at=119,
         batch=96, seed=749, steps=180),
    dict(kind="outlier", **_K, opt="keras-adam", lr=9e-4, factor=48.0, at=149, batch=28,
         seed=750, steps=200),
    dict(kind="outlier", **_K3, opt="keras-adamw", lr=1.1e-3, factor=36.0, at=139, batch=20,
         seed=751, steps=190),
]
