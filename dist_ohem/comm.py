"""The only module that calls ``torch.distributed``.

Every function takes an explicit ``group`` (``None`` = the default group) and degrades to
a local no-op when there is no initialized process group or the group has one rank, so
the library runs unchanged in a plain single-process script.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

from dist_ohem import numpy_host

__all__ = [
    "DistributedInputError",
    "LateRead",
    "all_gather_equal",
    "all_gather_uneven",
    "all_reduce_max",
    "all_reduce_sum",
    "all_reduce_sum_",
    "all_to_all_uneven",
    "exchange_rank_rows",
    "gather_rows",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "log_rank0",
    "raise_flagged",
    "raise_together",
    "to_device",
]

logger = logging.getLogger("dist_ohem")


class DistributedInputError(ValueError):
    """Bad input on at least one rank, raised identically on every rank of the group."""


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialized and ``group`` spans more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group``; 1 without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank within ``group``; 0 without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def log_rank0(message: str, *args: object, level: int = logging.INFO) -> None:
    """Log through the ``dist_ohem`` logger on global rank 0 only."""
    if get_rank() == 0:
        logger.log(level, message, *args)


def exchange_rank_rows(
    columns: Sequence[int | torch.Tensor],
    error: str | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    device: torch.device | None = None,
    payload: torch.Tensor | None = None,
    listed: int | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """All-gather one fixed-length int64 row per rank, failing together on any rank's error.

    This is the collective "did any rank fail?" check: an error flag travels with the
    row, and when any rank set it, every rank gathers all error messages and raises the
    same :class:`DistributedInputError`, instead of the healthy ranks waiting in a
    collective that the failing rank never joins.

    Args:
        columns: the row's leading entries: Python ints, or 0-dim tensors on ``device``
            (placed on the device without a host sync).
        error: this rank's error message, or None.
        device: where the row is built (default: the payload's device, else CPU).
        payload: optional 1-D tensor appended to the row (cast to int64).
        listed: how many leading entries to return as Python ints (default all). The
            flag check reads them in the same device-to-host copy: one per call.

    Every rank must send a row of the same length.

    Returns:
        ``(listed_rows, rows)``: the first ``listed`` entries of every rank's row as
        Python lists (rank order) and the ``(W, length)`` int64 tensor, row r from rank r.
    """
    rows = gather_rows(columns, error, group, device=device, payload=payload)
    width = rows.shape[1] if listed is None else 1 + listed
    # One device-to-host copy; on CPU through numpy, whose tolist is several times faster.
    head = (rows.numpy() if numpy_host.on_numpy(rows) else rows)[:, :width]
    return raise_flagged(head.tolist(), error, group), rows[:, 1:]


def raise_flagged(
    rows: list[list[int]], error: str | None, group: dist.ProcessGroup | None = None
) -> list[list[int]]:
    """``rows`` read from :func:`gather_rows` without their flag column; first, if any
    rank flagged an error, every rank raises all messages (:func:`raise_together`)."""
    if any(row[0] for row in rows):
        raise_together(error, group)
    return [row[1:] for row in rows]


def gather_rows(
    columns: Sequence[int | torch.Tensor],
    error: str | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    device: torch.device | None = None,
    payload: torch.Tensor | None = None,
) -> torch.Tensor:
    """The all-gather of :func:`exchange_rank_rows` without reading anything back.

    Returns the ``(W, 1 + len(columns) + len(payload))`` int64 rows on ``device``: column
    0 is each rank's error flag, then its columns and payload. Nothing is raised here;
    the caller reads the flags when it chooses (at once, or later through
    :class:`LateRead`), with :func:`raise_flagged`.
    """
    if device is None:
        device = torch.device("cpu") if payload is None else payload.device
    row = _build_row(columns, int(error is not None), payload, device)
    return all_gather_equal(row, group)


class LateRead:
    """A device tensor on its way to host memory, read when the caller is ready.

    On CUDA the copy goes to pinned memory without blocking the host, and an event marks
    its end: :meth:`tolist` waits for that event only, typically long passed by then (a
    whole training step later), instead of draining the device's queue at once. A CPU
    tensor is read directly; a meta tensor has no values, and reads as zeros.
    """

    def __init__(self, tensor: torch.Tensor, device: torch.device | None = None) -> None:
        """``device``: the tensor's, when the caller knows it (saves reading it)."""
        self._event = None
        device_type = (device or tensor.device).type
        if device_type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif device_type == "meta":
            self._host = torch.zeros(tensor.shape, dtype=tensor.dtype)
        else:
            self._host = tensor

    def tolist(self) -> list:
        """The tensor's values as (nested) Python lists."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def _build_row(
    columns: Sequence[int | torch.Tensor],
    flag: int,
    payload: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``[flag, *columns, *payload]`` as one int64 tensor on ``device``, without a host sync."""
    host = [flag] + [0 if isinstance(c, torch.Tensor) else c for c in columns]
    width = len(host) + (0 if payload is None else payload.numel())
    if device.type == "cpu" and numpy_host.np is not None:  # a few microseconds less per call
        buffer = numpy_host.np.empty(width, dtype=numpy_host.np.int64)
        buffer[: len(host)] = host
        if payload is not None:
            buffer[len(host) :] = payload.numpy()
        row = torch.from_numpy(buffer)
    else:
        row = to_device(host, device)
        if payload is not None:
            row = torch.cat([row, payload.long()])
    for position, column in enumerate(columns, start=1):
        if isinstance(column, torch.Tensor):
            row[position] = column
    return row


def raise_together(error: str | None, group: dist.ProcessGroup | None = None) -> NoReturn:
    """Raise every rank's error message on every rank; all ranks of ``group`` must call it.

    For a failure that all ranks detected from the same exchanged data: each rank passes
    its own message (None if it has none), and all raise the same
    :class:`DistributedInputError` listing the messages by rank.
    """
    messages: list[str | None] = [error]
    if is_distributed(group):
        messages = [None] * get_world_size(group)
        dist.all_gather_object(messages, error, group=group)
    raise DistributedInputError(
        "; ".join(f"rank {rank}: {msg}" for rank, msg in enumerate(messages) if msg)
    )


def all_gather_equal(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``(W, *tensor.shape)``: every rank's contiguous ``tensor`` (same shape and dtype on
    all ranks)."""
    if not is_distributed(group):
        return tensor.unsqueeze(0)
    world_size, shape = get_world_size(group), tensor.shape
    gathered = tensor.new_empty((world_size * shape[0], *shape[1:]))  # gloo: concatenated
    _all_gather_concat(gathered, tensor, group)
    return gathered.view(world_size, *shape)


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of ``values`` on ``device``; on CUDA copied from pinned memory without
    blocking the host (a plain ``torch.tensor(values, device=...)`` synchronizes)."""
    host = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (returned; the input is not modified)."""
    total = tensor.clone()
    if is_distributed(group):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum ``tensor`` over the ranks of ``group`` in place (a fresh tensor of the caller's)."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def all_reduce_max(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise max of ``tensor`` over the ranks of ``group`` (returned; input unchanged)."""
    result = tensor.clone()
    if is_distributed(group):
        dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
    return result


def all_gather_uneven(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    lengths: list[int] | None = None,
) -> list[torch.Tensor]:
    """All-gather tensors whose dim 0 differs across ranks.

    Gloo needs equal sizes, so each rank pads to the longest, gathers, and trims.
    Pass ``lengths`` (every rank's dim 0, identical on all ranks) when already known to
    skip the extra collective that gathers them.

    Args:
        tensor: ``(n_r, *rest)``; ``rest`` and dtype identical on all ranks.

    Returns:
        W tensors, entry r of shape ``(n_r, *rest)`` from rank r.
    """
    if not is_distributed(group):
        return [tensor]
    world_size = get_world_size(group)
    if lengths is None:
        local_length = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        all_lengths = local_length.new_empty(world_size)
        _all_gather_concat(all_lengths, local_length, group)
        lengths = all_lengths.tolist()
    max_length = max(lengths)
    padded = tensor.new_zeros((max_length, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = tensor.new_empty((world_size * max_length, *tensor.shape[1:]))
    _all_gather_concat(gathered, padded, group)
    return [gathered[r * max_length : r * max_length + length] for r, length in enumerate(lengths)]


def _all_gather_concat(
    output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None
) -> None:
    """``output`` = the ranks' contiguous ``tensor``, concatenated along dim 0 (equal sizes
    on all ranks)."""
    # torch >= 2.10 names it all_gather_single and deprecates all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def all_to_all_uneven(
    tensor: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Send rows ``tensor[sum(send_counts[:q]) : ...]`` to rank q; receive from every rank.

    Args:
        tensor: ``(sum(send_counts), *rest)``.
        send_counts: rows this rank sends to each rank.
        recv_counts: rows this rank receives from each rank (what they send to it).

    Returns:
        ``(sum(recv_counts), *rest)``, rows ordered by source rank.
    """
    if not is_distributed(group):
        return tensor.clone()
    output = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    dist.all_to_all_single(
        output,
        tensor.contiguous(),
        output_split_sizes=recv_counts,
        input_split_sizes=send_counts,
        group=group,
    )
    return output
