"""SelectionResult: the outcome of one selection, its counts read back lazily (DESIGN §8, §13)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_ohem.selection import key_to_loss

__all__ = ["NO_KEY", "DeviceCounts", "SelectionResult", "host_counts", "pack_counts"]

NO_KEY = 2**63 - 1  # the threshold key of "nothing chosen by hardness"

# Positions in the packed counts vector; the selected count of every rank follows.
_VALID, _SELECTED, _LOCAL, _NAN, _INSTANCES, _POSITIVE, _KTH_KEY, _PER_RANK = range(8)


@dataclass(frozen=True)
class DeviceCounts:
    """The counts of a :class:`SelectionResult` as tensors on the mask's device.

    For code that must not wait for the device (a loss's normalization, say): reading
    these never copies to the host. 0-dim int64 tensors, ``selected_per_rank`` ``(W,)``.
    """

    num_valid_global: torch.Tensor
    num_selected_global: torch.Tensor
    num_selected_local: torch.Tensor
    selected_per_rank: torch.Tensor
    num_nan_global: torch.Tensor
    num_instances_global: torch.Tensor
    num_positive_global: torch.Tensor


def pack_counts(
    num_valid: torch.Tensor,
    num_nan: torch.Tensor,
    num_instances: torch.Tensor,
    num_positive: torch.Tensor,
    kth_key: torch.Tensor,
    selected_per_rank: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """The int64 vector a :class:`SelectionResult` reads from, from 0-dim int64 device
    tensors (``kth_key``: ``NO_KEY`` for none) and the ``(W,)`` selected counts: three
    operations on the device, nothing read."""
    head = [
        num_valid,
        selected_per_rank.sum(),
        selected_per_rank[rank],
        num_nan,
        num_instances,
        num_positive,
        kth_key,
    ]
    return torch.cat([torch.stack(head), selected_per_rank])


def host_counts(
    num_valid: int,
    num_selected_local: int,
    num_nan: int,
    num_instances: int,
    num_positive: int,
    kth_key: int | None,
    selected_per_rank: list[int],
) -> list[int]:
    """:func:`pack_counts` as a Python list, for counts already on the host."""
    head = [num_valid, sum(selected_per_rank), num_selected_local, num_nan, num_instances]
    return [*head, num_positive, NO_KEY if kth_key is None else kth_key, *selected_per_rank]


class SelectionResult:
    """Outcome of one selection (DESIGN.md §8).

    ``mask`` is a tensor on the losses' device. The count fields are Python numbers,
    read from the device in one copy the first time any of them is read, then cached: a
    call that never reads them never waits for the device. :attr:`on_device` has the
    same counts as device tensors.

    Attributes:
        mask: bool, same shape as the local ``losses``; True = selected, owned here.
        num_valid_global: K, valid instances over all ranks.
        num_selected_global: M, selected instances over all ranks (the mean's divisor).
        num_selected_local: selected instances on this rank (``mask.sum()``).
        selected_per_rank: selected count of every rank, identical on all ranks.
        threshold: loss of the least hard selected candidate (the M-th in hardness
            order; for ``neg_pos_ratio`` the least hard selected negative). For
            ``scope="local"`` this rank's own; NaN when nothing was chosen by hardness
            (no candidate selected, scope ``"random"`` / ``"all"``, or per group).
        strategy: how the selection was reached: ``"gather"`` or ``"bracket"`` (the
            host path's algorithms), ``"static"`` (the read-free algorithm of
            :func:`dist_ohem.kselect.top_m_sorted`, taken on accelerators and by
            ``check="deferred"``), ``"grouped"`` (within groups: ``per_group``) or
            ``"none"`` (no exchange of losses: scope ``"local"`` / ``"all"``).
        scope: the selector's scope.
        num_nan_global: NaN losses over all ranks (invalid under ``nan="ignore"``).
        num_instances_global: all instances over all ranks, valid or not.
        num_positive_global: valid instances marked ``positive`` over all ranks (0
            when no ``positive`` mask was given).
    """

    def __init__(
        self,
        mask: torch.Tensor,
        counts: torch.Tensor | list[int] | Callable[[], torch.Tensor],
        *,
        strategy: str,
        scope: str,
        loss_dtype: torch.dtype,
    ) -> None:
        """``counts`` from :func:`pack_counts` (a tensor, or a function computing it when
        first needed) or :func:`host_counts` (a list)."""
        self.mask = mask
        self.strategy = strategy
        self.scope = scope
        on_host = isinstance(counts, list)
        self._pack = counts if callable(counts) else None
        self._counts = None if on_host or callable(counts) else counts
        self._host = counts if on_host else None
        self._loss_dtype = loss_dtype

    def __repr__(self) -> str:
        counts = "not read yet" if self._host is None else f"M={self.num_selected_global}"
        return (
            f"SelectionResult(strategy={self.strategy!r}, scope={self.scope!r}, "
            f"local={tuple(self.mask.shape)}, {counts})"
        )

    @property
    def on_device(self) -> DeviceCounts:
        """The counts as tensors on the mask's device (no host read)."""
        c = self._packed()
        return DeviceCounts(
            c[_VALID],
            c[_SELECTED],
            c[_LOCAL],
            c[_PER_RANK:],
            c[_NAN],
            c[_INSTANCES],
            c[_POSITIVE],
        )

    def _packed(self) -> torch.Tensor:
        if self._counts is None and self._pack is not None:
            self._counts = self._pack()
        elif self._counts is None:
            self._counts = torch.tensor(self._host, dtype=torch.int64, device=self.mask.device)
        return self._counts

    def _read(self) -> list[int]:
        if self._host is None:  # one device-to-host copy for every count
            self._host = self._packed().tolist()
        return self._host

    @property
    def num_valid_global(self) -> int:
        return self._read()[_VALID]

    @property
    def num_selected_global(self) -> int:
        return self._read()[_SELECTED]

    @property
    def num_selected_local(self) -> int:
        return self._read()[_LOCAL]

    @property
    def selected_per_rank(self) -> tuple[int, ...]:
        return tuple(self._read()[_PER_RANK:])

    @property
    def num_nan_global(self) -> int:
        return self._read()[_NAN]

    @property
    def num_instances_global(self) -> int:
        return self._read()[_INSTANCES]

    @property
    def num_positive_global(self) -> int:
        return self._read()[_POSITIVE]

    @property
    def threshold(self) -> float:
        key = self._read()[_KTH_KEY]
        return math.nan if key == NO_KEY else key_to_loss(key, self._loss_dtype)
