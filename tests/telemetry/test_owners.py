"""Which rank reads which tensor under torch.distributed (recorder.owners)."""

from __future__ import annotations

import pytest

from stablestep.telemetry.recorder import owners


@pytest.mark.parametrize("world", [2, 3, 8])
def test_replicas_are_dealt_out_each_to_one_rank_with_balanced_elements(world):
    numels = [4096, 4096, 64, 1_048_576, 1, 262_144, 262_144, 0, 65_536, 512] * 3
    out = owners(numels, [False] * len(numels), world)
    assert out == owners(numels, [False] * len(numels), world)  # no communication needed
    assert all(o in range(world) for o in out)
    load = [sum(n for n, o in zip(numels, out, strict=True) if o == r) for r in range(world)]
    # greedy largest-first: the spread is at most the largest tensor
    assert max(load) - min(load) <= max(numels)
    assert max(load) <= sum(numels) / world + max(numels)


def test_one_process_reads_all_and_fsdp_keeps_replicas_on_rank_0():
    assert owners([5, 7, 9], [False] * 3, 1) == [0, 0, 0]
    assert owners([5, 7, 9], [True, False, True], 2) == [None, 0, None]
    assert owners([], [], 4) == []
