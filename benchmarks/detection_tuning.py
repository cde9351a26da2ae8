"""The labelled runs the detection thresholds were tuned on (benchmarks/detection.py
``--set tuning``). Never report detection figures from these: see detection_heldout.py.

Each entry: ``make_run`` keyword arguments (benchmarks/labeled.py). Seeds 0-5 drove the
2026-11 fixes (10% bar, early-overshoot settle, the label rules); models 32-tanh and
64-gelu on 256 points.
"""

CAUSES = ("adaptive-edge-of-stability", "lr-too-high", "gradient-outlier", "non-finite",
          "stable")
MODELS = ((32, "tanh"), (64, "gelu"))
SEEDS = (0, 1, 2, 3, 4, 5)
N_POINTS = 256

RUNS = [dict(cause=c, seed=s, width=w, act=a, n=N_POINTS)
        for c in CAUSES for w, a in MODELS for s in SEEDS]
