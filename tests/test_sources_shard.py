"""``shard="sources"`` (launch/data.py): each rank reads its own source, and the sources
hold the hard examples in the shares 4:2:1:0; with ``global_batch_size`` the global batch
is the same set at any world size."""

from __future__ import annotations

import pytest
import torch

from launch.config import parse_args
from launch.data import batch_indices, global_batch, rank_pool, source_split
from launch.tasks import make_task


def test_source_split_deals_the_hard_examples_four_two_one_zero() -> None:
    batch = torch.arange(100, 140)  # 40 examples, 14 of them hard
    hard = torch.zeros(40, dtype=torch.bool)
    hard[torch.tensor([0, 3, 5, 7, 8, 11, 13, 17, 19, 23, 29, 31, 37, 39])] = True
    out = source_split(batch, hard, 4)
    assert sorted(out.tolist()) == batch.tolist()  # a reordering of the same batch
    is_hard = torch.isin(out, batch[hard])
    assert [int(part.sum()) for part in is_hard.tensor_split(4)] == [8, 4, 2, 0]
    # W=8 ranks read the 4 sources twice over; every rank's slice keeps its size.
    out8 = source_split(batch, hard, 8)
    counts = [int(part.sum()) for part in torch.isin(out8, batch[hard]).tensor_split(8)]
    assert counts == [4, 2, 1, 0, 4, 2, 1, 0]


def test_source_split_overflow_goes_to_the_ranks_with_room() -> None:
    batch = torch.arange(8)
    hard = torch.tensor([True] * 7 + [False])  # 7 hard in 4 slices of 2
    out = source_split(batch, hard, 4)
    counts = [int(p.sum()) for p in torch.isin(out, batch[hard]).tensor_split(4)]
    assert counts == [2, 2, 2, 1] and sorted(out.tolist()) == list(range(8))


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_sources_global_batch_is_the_same_set_at_any_world_size(world_size: int) -> None:
    task = make_task("digits", 0)
    cfg = parse_args(["task=digits", "shard=sources", "global_batch_size=32", "seed=3"])
    iid = parse_args(["task=digits", "shard=iid", "global_batch_size=32", "seed=3"])
    for step in (1, 7):
        batch = global_batch(cfg, task, step, world_size)
        assert sorted(batch.tolist()) == sorted(global_batch(iid, task, step, 1).tolist())
        ranks = [batch_indices(cfg, task, step, r, world_size) for r in range(world_size)]
        assert torch.equal(torch.cat(ranks), batch)
        hard = [
            int(torch.isin(task.group_train[i], torch.tensor(task.hard_groups)).sum())
            for i in ranks
        ]
        weights = [4, 2, 1, 0] * 2
        # Heavier sources never hold fewer hard examples; weight 0 holds none.
        assert all(h == 0 for h, w in zip(hard, weights, strict=False) if w == 0)
        assert hard[0] >= max(hard)


def test_sources_rank_pools_partition_the_training_set() -> None:
    task = make_task("digits", 0)
    cfg = parse_args(["task=digits", "shard=sources", "batch_size=8", "seed=1"])
    pools = [rank_pool(cfg, task, r, 4) for r in range(4)]
    every = torch.cat(pools)
    assert sorted(every.tolist()) == list(range(len(task.y_train)))
    is_hard = torch.isin(task.group_train, torch.tensor(task.hard_groups))
    shares = [is_hard[p].float().mean().item() for p in pools]
    assert shares[0] > shares[1] > shares[2] > shares[3] == 0.0
    step_batch = batch_indices(cfg, task, 5, 2, 4)
    assert len(step_batch) == 8 and torch.isin(step_batch, pools[2]).all()
