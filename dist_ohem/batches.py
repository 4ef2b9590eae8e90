"""Batches of examples for two-pass mode: structure, rows, chunks and balancing.

A *batch* is a tensor, or a tuple / list / dict (nested allowed) of tensors that all
hold the examples on dim 0. :func:`dist_ohem.ohem_step` never looks inside beyond that:
it selects rows, splits them into chunks and moves them between ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dist_ohem import comm

__all__ = [
    "Batch",
    "balanced_shares",
    "batch_device",
    "batch_leaves",
    "batch_size",
    "call_model",
    "chunk_bounds",
    "chunks_for",
    "map_batch",
    "move_to_shares",
    "select_rows",
]

Batch = torch.Tensor | tuple | list | dict


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor of a tensor / tuple / list / dict batch, same structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((key, map_batch(fn, value)) for key, value in batch.items())
    if isinstance(batch, (tuple, list)):
        mapped = [map_batch(fn, value) for value in batch]
        return type(batch)(*mapped) if hasattr(batch, "_fields") else type(batch)(mapped)
    raise TypeError(
        f"a batch must be a tensor or a tuple/list/dict of tensors, got {type(batch).__name__}"
    )


def batch_leaves(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch, in :func:`map_batch` order."""
    leaves: list[torch.Tensor] = []
    map_batch(lambda t: leaves.append(t) or t, batch)
    return leaves


def batch_size(batch: Batch) -> int:
    """Examples in a batch (dim 0 of its first tensor)."""
    leaves = batch_leaves(batch)
    return int(leaves[0].shape[0]) if leaves else 0


def batch_device(batch: Batch) -> torch.device:
    """The device of a batch's first tensor (the default device for a batch without any)."""
    leaves = batch_leaves(batch)
    return leaves[0].device if leaves else torch.empty(0).device


def select_rows(batch: Batch, rows: torch.Tensor | slice) -> Batch:
    """The examples ``rows`` (an index tensor or a slice of dim 0) of every tensor of ``batch``."""
    if isinstance(rows, slice):
        return map_batch(lambda t: t[rows], batch)
    return map_batch(lambda t: t.index_select(0, rows.to(t.device)), batch)


def call_model(model: Any, inputs: Batch) -> Any:
    """``model(**inputs)`` (dict), ``model(*inputs)`` (tuple/list) or ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def chunk_bounds(num_examples: int, chunk_size: int, num_chunks: int) -> list[slice]:
    """``num_chunks`` consecutive slices of at most ``chunk_size`` examples covering
    ``range(num_examples)``; the slices past the end are empty (padding chunks).

    Requires ``num_chunks * chunk_size >= num_examples``.
    """
    return [
        slice(min(start, num_examples), min(start + chunk_size, num_examples))
        for start in range(0, num_chunks * chunk_size, chunk_size)
    ]


def chunks_for(rows_per_rank: list[int], chunk_size: int) -> int:
    """The chunks of at most ``chunk_size`` rows that every rank runs: enough for the rank
    with the most rows, at least 1 (a rank with none still joins the backward)."""
    return max(1, max(-(-rows // chunk_size) for rows in rows_per_rank))


def balanced_shares(total: int, world_size: int) -> list[int]:
    """Rank q's share of ``total`` examples: ``ceil`` for the first ``total % W`` ranks,
    ``floor`` for the others."""
    return [total // world_size + (1 if q < total % world_size else 0) for q in range(world_size)]


def move_to_shares(
    batch: Batch, owned_per_rank: list[int], group: object = None
) -> tuple[Batch, list[int]]:
    """One all-to-all: rank q ends with the q-th contiguous :func:`balanced_shares` slice of
    the examples of all ranks in global (rank-major) order.

    Args:
        batch: this rank's examples, ``owned_per_rank[rank]`` of them.
        owned_per_rank: every rank's count, identical on all ranks.

    Returns:
        ``(this rank's share, every rank's share count)``. When the counts are already
        balanced no rank communicates (they all know it from ``owned_per_rank``).
    """
    world_size = len(owned_per_rank)
    total = sum(owned_per_rank)
    share = balanced_shares(total, world_size)
    if owned_per_rank == share:
        return batch, share
    rank = comm.get_rank(group)
    owned_start = _prefix_sums(owned_per_rank)
    share_start = _prefix_sums(share)

    def overlap(src: int, dst: int) -> int:
        low = max(owned_start[src], share_start[dst])
        high = min(owned_start[src] + owned_per_rank[src], share_start[dst] + share[dst])
        return max(0, high - low)

    send_counts = [overlap(rank, q) for q in range(world_size)]
    recv_counts = [overlap(r, rank) for r in range(world_size)]
    packed, unpack = _pack_rows(batch_leaves(batch))
    received = comm.all_to_all_uneven(packed, send_counts, recv_counts, group)
    leaves = iter(unpack(received))
    return map_batch(lambda _: next(leaves), batch), share


def _prefix_sums(values: list[int]) -> list[int]:
    starts, running = [], 0
    for value in values:
        starts.append(running)
        running += value
    return starts


def _pack_rows(leaves: list[torch.Tensor]):
    """Pack tensors with a common dim 0 into one uint8 ``(N, bytes)`` matrix (row-aligned),
    so that one collective moves all of them; returns it and the inverse."""
    rows = leaves[0].shape[0]
    columns = [
        leaf.contiguous().reshape(rows, math.prod(leaf.shape[1:])).view(torch.uint8)
        for leaf in leaves
    ]
    widths = [c.shape[1] for c in columns]
    device = leaves[0].device
    packed = torch.cat([c.to(device) for c in columns], dim=1)

    def unpack(matrix: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for leaf, width in zip(leaves, widths, strict=True):
            part = matrix[:, start : start + width].contiguous().view(leaf.dtype)
            out.append(part.reshape(matrix.shape[0], *leaf.shape[1:]).to(leaf.device))
            start += width
        return out

    return packed, unpack
