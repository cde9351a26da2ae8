"""Held-out labelled runs for benchmarks/detection.py (the default ``--set heldout``).

Nothing was tuned on these: seeds (100-102), model sizes (48-tanh, 96-gelu) and data size
(384 points) are all disjoint from detection_tuning.py (tests/diagnosis/test_labeled_sets.py
checks it). Each entry: ``make_run`` keyword arguments (benchmarks/labeled.py).
"""

CAUSES = ("adaptive-edge-of-stability", "lr-too-high", "gradient-outlier", "non-finite",
          "stable")
MODELS = ((48, "tanh"), (96, "gelu"))
SEEDS = (100, 101, 102)
N_POINTS = 384

RUNS = [dict(cause=c, seed=s, width=w, act=a, n=N_POINTS,
             **({"steps": 1500} if c == "adaptive-edge-of-stability" else {}))
        for c in CAUSES for w, a in MODELS for s in SEEDS]
