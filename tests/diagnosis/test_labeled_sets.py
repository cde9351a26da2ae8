"""The detection benchmark's tuning and held-out runs share no seed, model size or data size."""

from benchmarks import detection_heldout, detection_tuning


def test_tuning_and_held_out_runs_are_disjoint():
    def settings(module, key):
        return {r[key] for r in module.RUNS}

    for key in ("seed", "width", "n"):
        assert not settings(detection_tuning, key) & settings(detection_heldout, key), key
    assert set(detection_heldout.CAUSES) == set(detection_tuning.CAUSES)
    assert len(detection_heldout.RUNS) >= 30
