"""The shared multi-rank fixture fails fast instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tests.distributed import RankError


def rank_1_raises_while_others_wait():
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # never completes: rank 1 is not there


def sleep_forever():
    time.sleep(3600)


def world_size_of_group():
    return dist.get_world_size()


def test_rank_error_fails_the_call_and_pool_recovers(ranks):
    start = time.monotonic()
    with pytest.raises(RankError, match="boom on rank 1") as info:
        ranks.run(3, rank_1_raises_while_others_wait, timeout=60)
    assert "did not finish" in str(info.value)
    assert time.monotonic() - start < 20
    assert ranks.run(3, world_size_of_group) == [3, 3, 3]


def test_timeout_fails_the_call(ranks):
    start = time.monotonic()
    with pytest.raises(RankError, match="did not finish within the time limit"):
        ranks.run(2, sleep_forever, timeout=1.5)
    assert time.monotonic() - start < 15
    assert ranks.run(2, world_size_of_group) == [2, 2]
