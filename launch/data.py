"""Data order: the examples of each rank at each step, a pure function of the config,
the step, the rank and W (no sampler state, so a resumed run sees the same data)."""

from __future__ import annotations

import torch

from launch.config import Config, ConfigError
from launch.tasks import Task


def batch_indices(cfg: Config, task: Task, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's examples at ``step`` (1-based), as indices into the training set.

    Usually rank r's contiguous slice of :func:`global_batch` (rank-major, the first
    ``N mod W`` ranks one example more: N=64 at W=3 gives 22/21/21). With
    ``global_batch_size`` that global batch depends on (seed, step) alone, so a run at any
    world size trains on the same examples in the same global order.
    ``shard="skewed"`` or ``"sources"`` with ``batch_size`` instead: each rank draws
    ``batch_size`` examples a step from its own shard (:func:`rank_pool`), in epochs of
    that shard.
    """
    if not draws_from_own_shard(cfg):
        return global_batch(cfg, task, step, world_size).tensor_split(world_size)[rank]
    pool = rank_pool(cfg, task, rank, world_size)
    epoch, position = pool_position(cfg, len(pool), cfg.batch_size, step, f"rank {rank}")
    order = epoch_order(cfg, len(pool), epoch, pool_id=1 + rank)
    return pool[order[position * cfg.batch_size : (position + 1) * cfg.batch_size]]


def global_batch(cfg: Config, task: Task, step: int, world_size: int) -> torch.Tensor:
    """The (N,) training-set indices of ``step`` over all ranks, in rank-major order.

    Each epoch is a fresh permutation of the training set (seeded by seed and epoch), cut
    into batches of N = :func:`examples_per_step` (the last partial one dropped). With
    ``shard="skewed"`` (only with ``global_batch_size``) the same examples are reordered,
    the task's hard groups first (stable), so the lowest ranks hold the batch's hard
    examples: a non-iid split of an iid global batch, the same set at any W. With
    ``shard="sources"`` the batch's hard examples are dealt to the ranks in the shares of
    :data:`SOURCE_WEIGHTS` (:func:`source_split`), the same set at any W.
    """
    size = examples_per_step(cfg, world_size)
    epoch, position = pool_position(cfg, len(task.y_train), size, step, "the global batch")
    batch = epoch_order(cfg, len(task.y_train), epoch, pool_id=0)
    batch = batch[position * size : (position + 1) * size]
    if cfg.shard == "skewed":
        hard = torch.isin(task.group_train[batch], torch.tensor(task.hard_groups))
        batch = torch.cat([batch[hard], batch[~hard]])
    elif cfg.shard == "sources":
        hard = torch.isin(task.group_train[batch], torch.tensor(task.hard_groups))
        batch = source_split(batch, hard, world_size)
    return batch


#: ``shard="sources"``: rank r reads data source r mod 4, and source s holds
#: SOURCE_WEIGHTS[s] / 7 of the hard examples (the easy ones fill the rest): with the
#: digits' ~14% tail share, about 33/17/8/0% of a rank's examples are hard.
SOURCE_WEIGHTS = (4, 2, 1, 0)


def source_weights(world_size: int) -> list[int]:
    """The hard-example weight of each rank's source under ``shard="sources"``."""
    return [SOURCE_WEIGHTS[rank % len(SOURCE_WEIGHTS)] for rank in range(world_size)]


def source_split(batch: torch.Tensor, hard: torch.Tensor, world_size: int) -> torch.Tensor:
    """``batch`` reordered rank-major so that rank r's slice (``tensor_split``) holds its
    source's share of the ``hard`` examples: quotas by largest remainder over
    :func:`source_weights`, a rank's overflow (more than its slice) going to the ranks
    with room, heaviest source first. Deterministic; order kept within hard and easy."""
    sizes = [len(part) for part in torch.arange(len(batch)).tensor_split(world_size)]
    weights = source_weights(world_size)
    num_hard = int(hard.sum())
    exact = [num_hard * w / sum(weights) for w in weights]
    quota = [int(q) for q in exact]
    by_remainder = sorted(range(world_size), key=lambda r: (-(exact[r] - quota[r]), r))
    for rank in by_remainder[: num_hard - sum(quota)]:
        quota[rank] += 1
    overflow = sum(max(0, q - size) for q, size in zip(quota, sizes, strict=True))
    quota = [min(q, size) for q, size in zip(quota, sizes, strict=True)]
    for rank in sorted(range(world_size), key=lambda r: (-weights[r], r)):
        extra = min(overflow, sizes[rank] - quota[rank])
        quota[rank] += extra
        overflow -= extra
    hard_index, easy_index = batch[hard].tolist(), batch[~hard].tolist()
    order: list[int] = []
    for q, size in zip(quota, sizes, strict=True):
        order += hard_index[:q] + easy_index[: size - q]
        del hard_index[:q], easy_index[: size - q]
    return torch.tensor(order, dtype=batch.dtype)


def examples_per_step(cfg: Config, world_size: int) -> int:
    """N, every rank's examples of one step together: ``global_batch_size``, or
    ``batch_size`` x W."""
    return cfg.global_batch_size or cfg.batch_size * world_size


def draws_from_own_shard(cfg: Config) -> bool:
    """Whether each rank draws from its own shard (``shard="skewed"`` or ``"sources"`` with
    ``batch_size``) rather than taking a slice of the global batch."""
    return cfg.shard in ("skewed", "sources") and not cfg.global_batch_size


def epoch_order(cfg: Config, pool_size: int, epoch: int, pool_id: int) -> torch.Tensor:
    """The permutation of a pool of ``pool_size`` examples in ``epoch`` (pool 0: the whole
    training set; 1 + r: rank r's own shard)."""
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + pool_id)
    return torch.randperm(pool_size, generator=generator)


def rank_pool(cfg: Config, task: Task, rank: int, world_size: int) -> torch.Tensor:
    """The training examples ``rank`` draws from.

    "iid": every example, shared by all W ranks. "skewed" (non-iid, the case where global
    and local selection differ most): every example of the task's hard groups (detection:
    positives and hard negatives; digits: the tail classes) is on rank 0; the other
    examples are split evenly over the W ranks. "sources": rank r reads its own source, and
    the sources hold the hard examples in the shares of :func:`source_weights` (4:2:1:0
    repeating), the easy examples split evenly.
    """
    every = torch.arange(len(task.y_train))
    if cfg.shard == "iid":
        return every
    hard = torch.isin(task.group_train, torch.tensor(task.hard_groups))
    easy = every[~hard][
        torch.randperm(int((~hard).sum()), generator=torch.Generator().manual_seed(cfg.seed))
    ]
    own = easy.tensor_split(world_size)[rank]
    if cfg.shard == "sources":
        hard_index = every[hard][
            torch.randperm(int(hard.sum()), generator=torch.Generator().manual_seed(cfg.seed + 1))
        ]
        weights = torch.tensor(source_weights(world_size))
        bounds = (weights.cumsum(0) * len(hard_index)).div(weights.sum(), rounding_mode="floor")
        start = int(bounds[rank - 1]) if rank else 0
        return torch.cat([hard_index[start : int(bounds[rank])], own])
    return torch.cat([every[hard], own]) if rank == 0 else own


def data_position(
    cfg: Config, task: Task, step: int, rank: int, world_size: int
) -> tuple[int, int]:
    """(epoch, batch within the epoch) of ``step`` on ``rank``, both 0-based."""
    if draws_from_own_shard(cfg):
        pool_size = len(rank_pool(cfg, task, rank, world_size))
        return pool_position(cfg, pool_size, cfg.batch_size, step, f"rank {rank}")
    size = examples_per_step(cfg, world_size)
    return pool_position(cfg, len(task.y_train), size, step, "the global batch")


def pool_position(
    cfg: Config, pool_size: int, per_step: int, step: int, drawer: str
) -> tuple[int, int]:
    """(epoch, batch within the epoch) of ``step`` for ``drawer``, which takes ``per_step``
    examples a step from a pool of ``pool_size``."""
    steps_per_epoch = pool_size // per_step
    if steps_per_epoch == 0:
        key = "global_batch_size" if cfg.global_batch_size else "batch_size"
        raise ConfigError(
            f"{drawer} draws {per_step} examples a step from {pool_size} training examples "
            f"of task {cfg.task} (shard={cfg.shard}): not one step's worth; lower {key}"
        )
    return divmod(step - 1, steps_per_epoch)


def check_batches(cfg: Config, task: Task, world_size: int) -> None:
    """Raise the same ``ConfigError`` on every rank when some rank's batches cannot be
    drawn at this world size (every rank checks every rank, no collective needed)."""
    if cfg.global_batch_size and cfg.global_batch_size < world_size:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is smaller than the world size "
            f"{world_size}: every rank needs at least one example a step; set "
            f"global_batch_size >= {world_size} or run on fewer ranks"
        )
    for rank in range(world_size):
        data_position(cfg, task, 1, rank, world_size)
