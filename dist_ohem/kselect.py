"""Distributed k-selection: the same top-m candidates on every rank, ties by global index.

Each function here solves one problem. Rank r holds keys ``keys_r`` (integer hardness
keys, see :func:`dist_ohem.selection.hardness_key`) and a candidate mask; over the
rank-major concatenation of all ranks' keys, select the ``m`` candidates with the
largest keys, equal keys going to the lower global index. Every rank gets its own part
of that mask, the selected count of every rank and the m-th largest key, identical to
:func:`dist_ohem.selection.top_m_mask` on the concatenated batch. All ranks call with
the same ``m``; ``0 < m < #candidates`` over the group.

The functions differ in what they move: ``gather_select`` all-gathers the keys (bytes
proportional to the keys), ``radix_select`` all-reduces histograms of key digits (bytes
independent of the number of keys).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ohem import comm
from dist_ohem.selection import KEY_SENTINEL, top_m_mask

__all__ = ["RADIX_BITS", "gather_select", "radix_select"]

#: Bits of the key resolved per radix round: 2^11 bins, 3 rounds for 32-bit keys.
RADIX_BITS = 11


def gather_select(
    keys: torch.Tensor,
    candidate: torch.Tensor,
    num_to_select: int,
    rank: int,
    numel_per_rank: list[int],
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, list[int], int]:
    """All-gather every key (non-candidates as a sentinel), select the same top-m everywhere."""
    sentinel = KEY_SENTINEL[keys.dtype]
    sent = torch.where(candidate, keys, torch.full_like(keys, sentinel))
    parts = comm.all_gather_uneven(sent, group, lengths=numel_per_rank)
    all_keys = torch.cat(parts)
    picked_all = top_m_mask(all_keys, all_keys != sentinel, num_to_select)
    per_rank_masks = picked_all.split(numel_per_rank)
    kth_key = int(all_keys[picked_all].min())
    return per_rank_masks[rank].clone(), [_count(part) for part in per_rank_masks], kth_key


def radix_select(
    keys: torch.Tensor,
    candidate: torch.Tensor,
    num_to_select: int,
    rank: int,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, list[int], int]:
    """Exact distributed k-selection without moving the keys.

    Each round all-reduces a 2^RADIX_BITS histogram of one digit of the key read as
    unsigned (``u = key + 2^(bits-1)``, same order), most significant digit first, among
    the still-undecided candidates and fixes that digit of the m-th largest key. After
    ``ceil(bits / RADIX_BITS)`` rounds the m-th key is known exactly; one all-gather of
    per-rank tie counts hands the remaining slots to the ties in global index order.
    Requires 0 < num_to_select < #candidates.

    Cost on n local keys: the first round reads every key in its own integer dtype
    (non-candidates go to an extra bin that is not sent); later rounds only touch the
    keys in the chosen bins. Bytes sent: the histograms, independent of n.
    """
    key_bits = torch.iinfo(keys.dtype).bits
    undecided: torch.Tensor | None = None  # None: every key, before the first round
    undecided_keys = keys
    still_needed = num_to_select
    kth_unsigned = 0
    high = key_bits
    while high > 0:
        low = max(0, high - RADIX_BITS)
        width = high - low
        if undecided is None:
            # Arithmetic shift: the top digit of the signed key is in [-2^(w-1), 2^(w-1)),
            # and adding 2^(w-1) makes it the top digit of u.
            digit = (keys >> low) + (1 << (width - 1))
            digit = torch.where(candidate, digit, 1 << width)
        else:  # below the top digit, u and the key have the same bits
            digit = (undecided_keys >> low) & ((1 << width) - 1)
        histogram = torch.bincount(digit, minlength=(1 << width) + 1)[: 1 << width]
        histogram = comm.all_reduce_sum(histogram.to(torch.int64), group)
        at_least = histogram.flip(0).cumsum(0).flip(0)  # at_least[d] = #(digit >= d)
        chosen = int((at_least >= still_needed).nonzero().max())
        still_needed -= int(at_least[chosen] - histogram[chosen])
        kth_unsigned |= chosen << low
        same = digit == chosen
        if undecided is None:
            undecided = same.nonzero().squeeze(1)
            undecided_keys = keys[undecided]
        else:
            undecided, undecided_keys = undecided[same], undecided_keys[same]
        high = low

    kth_key = kth_unsigned - (1 << (key_bits - 1))
    picked = candidate & (keys > kth_key)
    counts = torch.tensor([_count(picked), undecided.numel()], device=keys.device)
    rows = comm.exchange_rank_rows(counts, None, group)
    ties_before = rows[:, 1].cumsum(0) - rows[:, 1]
    ties_taken = (still_needed - ties_before).clamp(min=0).minimum(rows[:, 1])
    picked[undecided[: int(ties_taken[rank])]] = True
    return picked, (rows[:, 0] + ties_taken).tolist(), kth_key


def _count(mask: torch.Tensor) -> int:
    """Number of True entries of a bool tensor, as a Python int."""
    return int(torch.count_nonzero(mask))
