"""Data order: the examples of each rank at each step, a pure function of the config,
the step and the rank (no sampler state, so a resumed run sees the same data)."""

from __future__ import annotations

import torch

from launch.config import Config, ConfigError
from launch.tasks import Task


def batch_indices(cfg: Config, task: Task, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's examples at ``step`` (1-based): a pure function of (seed, step, rank, W).

    ``shard="iid"``: each epoch is a fresh permutation of the training set, cut into global
    batches of ``batch_size * W`` (the last partial one dropped); rank r takes the r-th
    slice. ``shard="skewed"``: each rank draws ``batch_size`` examples a step from its own
    shard (:func:`rank_pool`), in epochs of that shard. No sampler state exists: the data
    position is the step, so a resumed run sees the same data as an uninterrupted one.
    """
    pool, ranks_drawing, slot = rank_pool(cfg, task, rank, world_size)
    epoch, position = pool_position(cfg, len(pool), ranks_drawing, step, rank)
    pool_id = 0 if cfg.shard == "iid" else 1 + rank
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + pool_id)
    order = torch.randperm(len(pool), generator=generator)
    start = (position * ranks_drawing + slot) * cfg.batch_size
    return pool[order[start : start + cfg.batch_size]]


def rank_pool(cfg: Config, task: Task, rank: int, world_size: int) -> tuple[torch.Tensor, int, int]:
    """The training examples ``rank`` draws from, how many ranks share them, its slot.

    "iid": every example, shared by all W ranks. "skewed" (non-iid, the case where global
    and local selection differ most): every example of the task's hard groups (detection:
    positives and hard negatives; digits: the tail classes) is on rank 0; the other
    examples are split evenly over the W ranks.
    """
    every = torch.arange(len(task.y_train))
    if cfg.shard == "iid":
        return every, world_size, rank
    hard = torch.isin(task.group_train, torch.tensor(task.hard_groups))
    easy = every[~hard][
        torch.randperm(int((~hard).sum()), generator=torch.Generator().manual_seed(cfg.seed))
    ]
    own = easy.tensor_split(world_size)[rank]
    return (torch.cat([every[hard], own]) if rank == 0 else own), 1, 0


def data_position(
    cfg: Config, task: Task, step: int, rank: int, world_size: int
) -> tuple[int, int]:
    """(epoch, batch within the epoch) of ``step`` on ``rank``, both 0-based."""
    pool, ranks_drawing, _ = rank_pool(cfg, task, rank, world_size)
    return pool_position(cfg, len(pool), ranks_drawing, step, rank)


def pool_position(
    cfg: Config, pool_size: int, ranks_drawing: int, step: int, rank: int
) -> tuple[int, int]:
    """(epoch, batch within the epoch) of ``step`` in a pool of ``pool_size`` examples
    that ``ranks_drawing`` ranks draw ``batch_size`` each from per step."""
    steps_per_epoch = pool_size // (cfg.batch_size * ranks_drawing)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"rank {rank} draws from {pool_size} training examples of task {cfg.task} "
            f"(shard={cfg.shard}), fewer than {cfg.batch_size * ranks_drawing} a step; "
            "lower batch_size"
        )
    return divmod(step - 1, steps_per_epoch)
