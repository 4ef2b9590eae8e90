"""Read-free distributed k-selection: static shapes, the count to select on the device.

The same problem as :mod:`dist_ohem.kselect` (the top-m candidates over the rank-major
concatenation of all ranks' keys, larger key first, ties to the lower global index), for
tensors on an accelerator, where every read of a value into Python drains the device's
queue. Here nothing is read: ``m`` is a 0-dim device tensor, every collective has a
shape fixed by the key width and the world size, and the outcome stays on the device.

The algorithm is a radix search on sorted keys:

1. each rank sorts its keys once (non-candidates as the sentinel, below every key);
2. the m-th largest key ``k*`` is the largest ``v`` with ``#(key >= v) >= m`` over all
   ranks. Each round splits the interval known to hold it into ``2^RADIX_BITS`` equal
   parts, counts the keys at or above every split point by one ``searchsorted`` on the
   sorted keys, all-reduces these counts and keeps the highest part that still holds
   ``m`` keys: 3 rounds for 32-bit keys, 6 for 64-bit ones;
3. one all-gather of every rank's count above ``k*`` and of its ties hands the remaining
   ``m - #(key > k*)`` slots to the ties in global index order (with one rank, no
   all-gather: they go to the first ties).

With one rank the m-th largest key is read off the sorted keys by index instead (no
rounds). Bytes per call are independent of the number of keys; the sort is the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ohem import comm
from dist_ohem.selection import KEY_SENTINEL

__all__ = ["RADIX_BITS", "DeviceKSelection", "static_select"]

#: Bits of the m-th key resolved per round (2^11 - 1 split points, 3 rounds for int32 keys).
RADIX_BITS = 11


@dataclass
class DeviceKSelection:
    """The outcome of :func:`static_select`, all on the device.

    Attributes:
        picked: bool, one entry per local key; True = among the global top m.
        per_rank: ``(W,)`` int64, number picked on every rank (rank order).
        kth_key: 0-dim int64, key of the m-th largest candidate; the largest key of
            the dtype when ``m == 0``.
    """

    picked: torch.Tensor
    per_rank: torch.Tensor
    kth_key: torch.Tensor


def static_select(
    keys: torch.Tensor,
    candidate: torch.Tensor | None,
    m: torch.Tensor,
    group: dist.ProcessGroup | None,
    world_size: int,
    rank: int,
) -> DeviceKSelection:
    """Top-m candidates over all ranks of ``group``, without a host read.

    Args:
        keys: ``(n,)`` int32 or int64 hardness keys (or random keys); the dtype must be
            the same on every rank (it fixes the number of rounds).
        candidate: ``(n,)`` bool or None (every key is a candidate).
        m: 0-dim int64 on the keys' device, the same on every rank;
            ``0 <= m <= #candidates`` over all ranks.
        world_size, rank: of ``group`` (1 and 0 select over this rank's keys alone).

    Returns:
        :class:`DeviceKSelection`, identical on every rank but ``picked``, equal to
        :func:`dist_ohem.selection.top_m_mask` on the concatenated keys.
    """
    sentinel = KEY_SENTINEL[keys.dtype]
    if candidate is not None:
        keys = keys.where(candidate, sentinel)
    ordered = keys.sort().values  # ascending; the non-candidates first
    m = m.to(torch.int64)
    if world_size == 1:
        kth_key = _kth_largest_sorted(ordered, m)
    else:
        kth_key = _kth_largest_by_rounds(ordered, m, group)
    return _hand_out_ties(keys, kth_key, m, group, world_size, rank)


def _kth_largest_sorted(ordered: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The m-th largest of one rank's sorted keys (the dtype's max for ``m == 0``)."""
    top = torch.iinfo(ordered.dtype).max
    if ordered.numel() == 0:
        return m.new_full((), top)
    position = (ordered.numel() - m).clamp(0, ordered.numel() - 1)
    kth = ordered.index_select(0, position.view(1)).squeeze(0).to(torch.int64)
    return kth.where(m > 0, top)


def _kth_largest_by_rounds(
    ordered: torch.Tensor, m: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The largest ``v`` with ``#(key >= v) >= m`` over all ranks (the m-th largest key).

    Each round narrows an interval of ``2^bits`` keys known to hold it, down to one key.
    With ``m == 0`` every count qualifies and the search ends at the dtype's max.
    """
    bits = torch.iinfo(ordered.dtype).bits
    # Tracked as the interval's middle: offsets from it stay inside the dtype even for
    # 64-bit keys, whose full range has no int64 width.
    middle = m.new_zeros(())
    while bits > 0:
        width = min(RADIX_BITS, bits)
        step, half = 1 << (bits - width), 1 << (width - 1)
        parts = torch.arange(1 - half, half, device=ordered.device, dtype=torch.int64)
        points = (middle + parts * step).to(ordered.dtype)
        at_or_above = ordered.numel() - torch.searchsorted(ordered, points)
        at_or_above = comm.all_reduce_sum(at_or_above, group)
        # Counts fall with the split point: the parts that still hold m keys come first.
        low = middle + ((at_or_above >= m).sum() - half) * step
        middle = low + step // 2
        bits -= width
    return middle


def _hand_out_ties(
    keys: torch.Tensor,
    kth_key: torch.Tensor,
    m: torch.Tensor,
    group: dist.ProcessGroup | None,
    world_size: int,
    rank: int,
) -> DeviceKSelection:
    """Pick every key above ``kth_key`` and the first ties in global index order."""
    kth = kth_key.to(keys.dtype)
    above, is_tie = keys > kth, keys == kth
    if world_size == 1:
        taken_here, per_rank = m - above.sum(), m.view(1)
    else:
        counts = comm.all_gather_equal(torch.stack([above.sum(), is_tie.sum()]), group)
        above_per_rank, ties_per_rank = counts[:, 0], counts[:, 1]
        ties_before = ties_per_rank.cumsum(0) - ties_per_rank
        still_needed = m - above_per_rank.sum()
        taken = (still_needed - ties_before).clamp(min=0).minimum(ties_per_rank)
        taken_here, per_rank = taken[rank], above_per_rank + taken
    picked = above | (is_tie & (is_tie.cumsum(0) <= taken_here))
    return DeviceKSelection(picked, per_rank, kth_key)
