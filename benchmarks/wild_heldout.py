"""Held-out runs for benchmarks/wild.py: the fifth round's blind set (60 runs, 17 Keras).

Written after the fourth round's held-out set was run blind (commit 3495234) and became the
tuning file ``wild_tuning5.py``, before any detector change of this round, and never
diagnosed while it was written: only ``python benchmarks/wild.py --set heldout
--labels-only`` was run on it (it records the runs and checks ``label_holds``, it diagnoses
nothing), besides a scratch loop that recorded candidate runs with ``wild.record`` and
printed their loss curves from the store (no detector, no diagnosis). All 60 labels held
(225 s of recording on one core; 297 s when the machine was busier). Constructions changed
before that, on their loss curves alone: a "healthy" full-batch AdamW MLP at lr 2.1e-3 that
spiked 4.4x at the edge of stability and a "healthy" full-batch Keras AdamW at 1.25e-3 that
overshot 23% after its first steps (both lr lowered); a GPT-2 lr jump x34 that rose only
1.8x (now x140); a Keras ``aeos`` at lr 1.1e-2 that never spiked and an ``ss-adam-tf`` one
at 1.75e-2 that rose once at step 6 and never again (lrs lowered: both now spike again and
again from step 270-490); a square-loss CNN ``aeos`` on 68 (then 144) samples whose only 2x
"spikes" were rounding noise at a loss of 1e-15 (``label_holds`` passed it; now 256 samples,
spiking from step 112 at a loss of 2e-4); a "plateau" MLP under AdamW that came back under
its first loss (now Adam, which stays above it).

Everything differs from all five tuning files (tests/diagnosis/test_wild.py checks it):
seeds 900-959; the data generators (``data="fifth"``, wild.py ``_data``: an MLP target
``x0 sin(x1) / 2 + tanh(x2 x3) / 2 + x3 / 4`` on correlated Gaussian inputs of mixed
scales, which the Keras runs share; a CNN on 12x12 images, not 8x8, that tells a 4x4
checkerboard from 4x4 stripes in noise; GPT-2 on real text, character windows of the
Python standard library's own source read at run time, 47 common characters and one id for
the rest, 32 tokens a window); dataset sizes (640 samples, 512 text windows, full-batch
sets of 68, 76, 116, 144 and 256); widths and depths, larger than before (MLP 96, or 64
with three hidden layers; CNN 64 or 96; GPT-2 n_embd 64 with four blocks and four heads,
or 48 with three blocks; Keras 96, or 64 with three hidden layers); batch sizes (18, 26,
34, 50, 72, 100, 192, 256 or full batch); every learning rate, lr jump factor and step,
outlier scale and step; minibatch runs of 400-560 steps.

Constructions the tuning files lack or have few of: GPT-2 on real text, healthy and in
every minibatch incident (blow-up, jump, plateau, outlier); a GPT-2 outlier batch, a garbage
document (its tokens random characters from the rarer half of the vocabulary, wild.py
``record``; its loss rises only 2.2-3x, a real document's loss being high already); lr
jumps late (steps 305, 316, 345, 420); outlier batches late in long runs (step 378 of
430, 455 of 560, 470 of 540); a plateau under AdamW with weight decay 0.1 (GPT-2: up 3x,
then held at the unigram level, about 2.95 where healthy runs reach 2.1) and a Keras AdamW
plateau with weight decay 0.02; a blow-up at step 0 on the four-block GPT-2; Keras
SGD-momentum (0.9) too high, from step 0 at batch 50 and in full batch; healthy GPT-2
under SGD-momentum and under AdamW with weight decay at batch 100; healthy Keras at batch
256 for 400 steps; noisy healthy batch-18 training on the MLP, Keras and GPT-2.

The text depends on the interpreter's standard library (the same on one machine; another
CPython version gives other windows). Labels are by construction (benchmarks/wild.py
module docstring); ``label_holds`` checks without any detector that each construction did
what its label says (a healthy run must not rise on its own), and runs whose label does
not hold are reported, not scored.
"""

_M = dict(model="mlp", width=96, data="fifth", n=640)
_M3 = dict(model="mlp", width=64, depth=3, data="fifth", n=640)
_C = dict(model="cnn", width=64, data="fifth", n=640)
_C2 = dict(model="cnn", width=96, data="fifth", n=640)
_G = dict(model="gpt2", width=64, depth=4, data="fifth", n=512)
_G3 = dict(model="gpt2", width=48, depth=3, data="fifth", n=512)
_K = dict(model="keras", width=96, data="fifth", n=640, eps=1e-7)
_K3 = dict(model="keras", width=64, depth=3, data="fifth", n=640, eps=1e-7)

RUNS = [
    # healthy: nothing to find
    dict(kind="healthy", **_M, opt="adam", lr=1.7e-3, batch=18, seed=900, steps=400),
    dict(kind="healthy", **_M3, opt="ss-adam", lr=1.05e-3, batch=72, seed=901),
    dict(kind="healthy", **{**_M, "n": 116}, opt="adamw", lr=5.5e-4, batch=None, seed=902),
    dict(kind="healthy", **_M3, opt="adam", amsgrad=True, lr=2.3e-3, batch=34, seed=903),
    dict(kind="healthy", **_C, opt="sgd", momentum=0.9, lr=2.1e-2, batch=34, seed=904),
    dict(kind="healthy", **_C2, opt="adam", lr=8.5e-4, batch=100, seed=905, steps=200),
    dict(kind="healthy", **{**_C, "n": 144}, opt="ss-adam-tf", eps=1e-7, lr=1.15e-3,
         batch=None, seed=906, steps=200),
    dict(kind="healthy", **_G, opt="adam", lr=1.9e-3, batch=26, seed=907, steps=200),
    dict(kind="healthy", **_G3, opt="adamw", amsgrad=True, lr=2.7e-3, batch=18, seed=908,
         steps=200),
    dict(kind="healthy", **_G, opt="adamw", lr=1.35e-3, batch=100, seed=909, steps=120,
         extra={"weight_decay": 0.1}),
    dict(kind="healthy", **_G3, opt="sgd", momentum=0.9, lr=0.13, batch=34, seed=959,
         steps=200),
    dict(kind="healthy", **_K, opt="keras-adam", lr=1.7e-3, batch=18, seed=910, steps=400),
    dict(kind="healthy", **_K3, opt="keras-sgd", momentum=0.9, lr=1.9e-2, batch=34,
         seed=911),
    dict(kind="healthy", **_K, opt="keras-adam", amsgrad=True, lr=2.9e-3, batch=72,
         seed=912),
    dict(kind="healthy", **{**_K, "n": 76}, opt="keras-adamw", lr=2.5e-4, batch=None,
         seed=913),
    dict(kind="healthy", **_K3, opt="keras-adam", lr=9.5e-4, batch=256, seed=914,
         steps=400),
    # blow-up from step 0
    dict(kind="blowup0", **_G, opt="adam", lr=1.7, batch=26, seed=915, steps=60),
    dict(kind="blowup0", **_G3, opt="ss-adam", lr=2.3, batch=34, seed=916, steps=60),
    dict(kind="blowup0", **{**_M, "n": 116}, opt="sgd", lr=11.0, batch=None, seed=917,
         steps=60),
    dict(kind="blowup0", **_C2, opt="sgd", lr=17.0, batch=50, seed=918, steps=60),
    dict(kind="blowup0", **_M3, opt="adamw", lr=3.7, batch=100, seed=919, steps=60),
    dict(kind="blowup0", **_K, opt="keras-adam", lr=4.2, batch=18, seed=920, steps=60),
    dict(kind="blowup0", **_K3, opt="keras-sgd", momentum=0.9, lr=1.6, batch=50,
         seed=921, steps=60),
    # lr schedule jumps, four of them late (after step 300)
    dict(kind="jump", **_M, opt="adam", lr=1.7e-3, factor=260.0, at=345, batch=50,
         seed=922, steps=420),
    dict(kind="jump", **_M3, opt="ss-adam-tf", eps=1e-7, lr=1.05e-3, factor=560.0, at=124,
         batch=26, seed=923, steps=200),
    dict(kind="jump", **{**_C, "n": 144}, opt="sgd", lr=2.1e-2, factor=72.0, at=105,
         batch=None, seed=924, steps=170),
    dict(kind="jump", **_C2, opt="adamw", lr=8.5e-4, factor=440.0, at=316, batch=34,
         seed=925, steps=380),
    dict(kind="jump", **_G, opt="adam", lr=1.9e-3, factor=140.0, at=134, batch=26,
         seed=926, steps=190),
    dict(kind="jump", **_G3, opt="ss-adam", lr=2.7e-3, factor=130.0, at=305, batch=18,
         seed=927, steps=360),
    dict(kind="jump", **_M, opt="adamw", amsgrad=True, lr=2.3e-3, factor=180.0, at=148,
         batch=192, seed=928, steps=220),
    dict(kind="jump", **_K, opt="keras-adam", lr=1.7e-3, factor=360.0, at=420, batch=50,
         seed=929, steps=480),
    dict(kind="jump", **_K3, opt="keras-sgd", momentum=0.9, lr=1.9e-2, factor=68.0,
         at=115, batch=34, seed=930, steps=180),
    dict(kind="jump", **_K, opt="keras-adamw", lr=2.9e-3, factor=520.0, at=172, batch=72,
         seed=931, steps=240),
    # too large an lr that sends the loss up and keeps it there
    dict(kind="plateau", **_G, opt="adamw", lr=0.37, batch=26, seed=932, steps=100,
         extra={"weight_decay": 0.1}),  # held at the unigram level (healthy: about 2.1)
    dict(kind="plateau", **_G3, opt="adam", lr=0.53, batch=34, seed=933, steps=100),
    dict(kind="plateau", **_C, opt="adam", lr=0.29, batch=50, seed=934, steps=100),
    dict(kind="plateau", **_M3, opt="adam", lr=0.66, batch=72, seed=935, steps=100),
    dict(kind="plateau", **_K, opt="keras-adam", lr=0.44, batch=26, seed=936, steps=100),
    dict(kind="plateau", **_K3, opt="keras-adamw", lr=0.57, batch=50, seed=937,
         steps=100, extra={"weight_decay": 0.02}),
    # gradient descent above its stable lr
    dict(kind="sgd-high", **{**_M, "n": 256}, opt="sgd", lr=1.9, batch=None, seed=938,
         steps=150),
    dict(kind="sgd-high", **{**_M, "n": 256}, opt="sgd", momentum=0.9, lr=0.21,
         batch=None, seed=939, steps=150),
    dict(kind="sgd-high", **{**_C, "n": 256}, opt="sgd", lr=0.44, batch=None, seed=940,
         steps=150, extra={"mse": True}),
    dict(kind="sgd-high", **{**_C2, "n": 256}, opt="sgd", momentum=0.7, lr=0.24,
         batch=None, seed=941, steps=150),
    dict(kind="sgd-high", **{**_M3, "n": 256}, opt="sgd", momentum=0.6, lr=0.34,
         batch=None, seed=942, steps=150),
    dict(kind="sgd-high", **{**_K, "n": 256}, opt="keras-sgd", lr=1.7, batch=None,
         seed=943, steps=150),
    dict(kind="sgd-high", **{**_K3, "n": 256}, opt="keras-sgd", momentum=0.9, lr=0.27,
         batch=None, seed=944, steps=150),
    # full-batch Adam at the adaptive edge of stability
    dict(kind="aeos", **{**_M, "n": 68}, opt="adam", lr=1.25e-2, batch=None, seed=945,
         steps=700),
    dict(kind="aeos", **{**_M3, "n": 76}, opt="ss-adam", lr=7.5e-3, batch=None, seed=946,
         steps=700),
    dict(kind="aeos", **{**_M, "n": 116}, opt="ss-adam-tf", lr=6.5e-3, batch=None,
         seed=947, steps=700),
    dict(kind="aeos", **{**_C, "n": 256}, opt="adam", lr=3.1e-3, batch=None, seed=948,
         steps=400, extra={"mse": True}),
    dict(kind="aeos", **{**_K, "n": 68}, opt="keras-adam", lr=4.6e-3, batch=None,
         seed=949, steps=700),
    # one corrupted minibatch, three of them late in a long run
    dict(kind="outlier", **_M, opt="adam", lr=1.7e-3, factor=56.0, at=455, batch=50,
         seed=950, steps=560),
    dict(kind="outlier", **_M3, opt="ss-adam-tf", eps=1e-7, lr=1.05e-3, factor=68.0,
         at=166, batch=18, seed=951, steps=230),
    dict(kind="outlier", **_C, opt="adamw", lr=1.45e-3, factor=95.0, at=158, batch=34,
         seed=952, steps=220),
    dict(kind="outlier", **_C2, opt="sgd", momentum=0.9, lr=2.1e-2, factor=72.0, at=184,
         batch=26, seed=953, steps=250),
    dict(kind="outlier", **_M3, opt="adam", amsgrad=True, lr=2.3e-3, factor=74.0, at=215,
         batch=100, seed=955, steps=280),
    dict(kind="outlier", **_K, opt="keras-adam", lr=1.7e-3, factor=58.5, at=470,
         batch=50, seed=956, steps=540),
    dict(kind="outlier", **_K3, opt="keras-adamw", lr=2.9e-3, factor=63.0, at=176,
         batch=26, seed=957, steps=240),
    dict(kind="outlier", **_G3, opt="adamw", lr=2.7e-3, factor=1.0, at=164, batch=18,
         seed=954, steps=220),  # a garbage document (wild.py: record)
    dict(kind="outlier", **_G, opt="adam", lr=1.9e-3, factor=1.0, at=378, batch=26,
         seed=958, steps=430),  # late in a long run
]
