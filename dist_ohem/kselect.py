"""Distributed k-selection: the same top-m candidates on every rank, ties by global index.

Every function here solves one problem. Rank r holds a vector of keys (integer hardness
keys, :func:`dist_ohem.selection.hardness_key`; or, for the bracket, the losses
themselves) and a candidate mask (None = every entry is a candidate). Over the
rank-major concatenation of all ranks' vectors, select the ``m`` candidates with the
largest keys, equal keys going to the lower global index. Every rank gets a
:class:`KSelection`: its own part of that mask, the selected count of every rank and
the m-th largest key, identical to :func:`dist_ohem.selection.top_m_mask` on the
concatenated batch. All ranks call with the same ``m``, ``1 <= m <= #candidates``.

The algorithms differ in what they move and read:

- :func:`gather_select` all-gathers the keys: one collective, bytes proportional to the
  largest rank's vector. :func:`select_gathered` is its second half, for keys that
  already travelled (the selector sends them with its per-rank row).
- :func:`radix_select` all-reduces histograms of key digits, most significant first,
  then all-gathers per-rank tie counts: bytes independent of the vector length, one
  histogram pass per 11 bits of key.
- :func:`dist_ohem.bracket.bracket_select` (its own module, built on these two) bounds
  the m-th key from a small sample of every rank and resolves only the keys inside.

On CPU the passes over the full vector use numpy when it is installed (the same IEEE
comparisons, several times faster than torch's CPU kernels for bool outputs and index
extraction); torch ops otherwise and on other devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ohem import comm
from dist_ohem.selection import KEY_SENTINEL, hardness_key, key_dtype_for

try:
    import numpy as _numpy
except ImportError:  # optional: the torch path computes the same, slower on CPU
    _numpy = None

__all__ = [
    "RADIX_BITS",
    "KSelection",
    "any_nan",
    "gather_select",
    "key_dtype_of",
    "keys_of",
    "on_numpy",
    "pad_keys",
    "radix_select",
    "select_gathered",
]

#: Bits of the key resolved per radix round: 2^11 bins, 3 rounds for 32-bit keys.
RADIX_BITS = 11
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int32, torch.int64)
#: Loss dtype -> (numpy key dtype, its sign bit, its max): hardness_key's constants.
_NUMPY_KEY_DTYPES = {
    torch.float32: ("int32", 31, 0x7FFFFFFF),
    torch.float64: ("int64", 63, 0x7FFFFFFFFFFFFFFF),
}


@dataclass
class KSelection:
    """The outcome of one distributed k-selection, identical on every rank but ``picked``.

    Attributes:
        picked: bool, one entry per local key; True = among the global top m.
        per_rank: number picked on every rank (rank order), summing to m.
        kth_key: key of the m-th largest candidate (the least hard picked one).
    """

    picked: torch.Tensor
    per_rank: list[int]
    kth_key: int


def select_gathered(keys: torch.Tensor, m: int, rank: int, lengths: list[int]) -> KSelection:
    """Top-m over keys that every rank already holds, without a host sync until the end.

    Args:
        keys: ``(W, capacity)`` integer keys, row r = rank r's keys in its local order,
            non-candidates and the padding past ``lengths[r]`` set to ``KEY_SENTINEL``.
        m: ``1 <= m <= #candidates``.
        rank: this rank; ``lengths``: each rank's number of keys.
    """
    if on_numpy(keys):
        return _select_gathered_numpy(keys.numpy(), m, rank, lengths)
    flat = keys.reshape(-1)
    # The sentinel is below every key, so the m-th largest entry is the m-th candidate.
    kth = flat.kthvalue(flat.numel() - m + 1).values
    above = flat > kth
    ties = flat == kth
    # A tie is picked while the ties before it, itself included, fit in m - #above.
    picked = (above | (ties & (ties.cumsum(0) + above.sum() <= m))).view_as(keys)
    counts = torch.cat([picked.sum(1), kth.view(1).to(torch.int64)]).tolist()
    return KSelection(picked[rank, : lengths[rank]], counts[:-1], counts[-1])


def _select_gathered_numpy(keys, m: int, rank: int, lengths: list[int]) -> KSelection:
    """:func:`select_gathered` on a numpy ``(W, capacity)`` array (the same picks)."""
    flat = keys.reshape(-1)
    kth = _numpy.partition(flat, flat.size - m)[flat.size - m]
    picked = flat > kth
    # The first m - #above ties in global order fill the remaining slots (ndarray methods:
    # the numpy-level wrappers cost more than the work on a small batch).
    ties = (flat == kth).nonzero()[0]
    picked[ties[: m - int(picked.sum())]] = True
    picked = picked.reshape(keys.shape)
    per_rank = picked.sum(1).tolist()
    return KSelection(torch.from_numpy(picked[rank, : lengths[rank]]), per_rank, int(kth))


def gather_select(
    keys: torch.Tensor,
    candidate: torch.Tensor | None,
    m: int,
    rank: int,
    lengths: list[int],
    group: dist.ProcessGroup | None,
) -> KSelection:
    """All-gather every rank's keys (non-candidates as the sentinel), then select_gathered.

    ``lengths``: every rank's number of keys (identical on all ranks). Bytes sent per
    rank: ``max(lengths)`` keys.
    """
    return select_gathered(
        comm.all_gather_equal(pad_keys(keys, candidate, max(lengths)), group), m, rank, lengths
    )


def pad_keys(keys: torch.Tensor, candidate: torch.Tensor | None, capacity: int) -> torch.Tensor:
    """``(capacity,)`` keys: non-candidates and the entries past ``len(keys)`` = sentinel."""
    if candidate is None and keys.numel() == capacity:
        return keys
    padded = keys.new_full((capacity,), KEY_SENTINEL[keys.dtype])
    if candidate is None:
        padded[: keys.numel()] = keys
    else:
        padded[: keys.numel()] = keys.where(candidate, KEY_SENTINEL[keys.dtype])
    return padded


def radix_select(
    keys: torch.Tensor,
    candidate: torch.Tensor | None,
    m: int,
    rank: int,
    group: dist.ProcessGroup | None,
    key_range: tuple[int, int] | None = None,
) -> KSelection:
    """Exact distributed k-selection without moving the keys.

    Each round all-reduces a 2^RADIX_BITS histogram of one digit of ``u``, the key as an
    unsigned offset (``u = key + 2^(bits-1)`` for the full signed range, ``key - low`` for
    ``key_range=(low, high)`` that holds every candidate key; ignored when wider than
    2^62), most significant digit
    first, among the still-undecided candidates, and fixes that digit of the m-th largest
    key. After ``ceil(bits / RADIX_BITS)`` rounds (none when ``low == high``) the m-th key
    is known exactly; one all-gather of per-rank tie counts hands the remaining slots to
    the ties in global index order.

    Cost on n local keys: the first round reads every key (non-candidates go to an extra
    bin that is not sent); later rounds only touch the keys in the chosen bins. Bytes
    sent: the histograms and the tie counts, independent of n.
    """
    if key_range is not None and key_range[1] - key_range[0] >= 1 << 62:
        key_range = None  # offsets from its low end would overflow int64
    if key_range is None:
        key_bits = torch.iinfo(keys.dtype).bits
        values, bias = keys, 1 << (key_bits - 1)
    else:
        low, high = key_range
        key_bits = (high - low).bit_length()
        values, bias = keys.to(torch.int64) - low, 0
    undecided: torch.Tensor | None = None  # None: every key, before the first round
    undecided_values = values
    still_needed = m
    kth_unsigned = 0
    high_bit = key_bits
    while high_bit > 0:
        low_bit = max(0, high_bit - RADIX_BITS)
        width = high_bit - low_bit
        if undecided is None:
            # Arithmetic shift: the top digit of a signed key is in [-2^(w-1), 2^(w-1)),
            # and adding 2^(w-1) (bias >> low_bit) makes it the top digit of u.
            digit = (values >> low_bit) + (bias >> low_bit)
            if candidate is not None:
                digit = torch.where(candidate, digit, 1 << width)
        else:  # below the top digit, u and the key have the same bits
            digit = (undecided_values >> low_bit) & ((1 << width) - 1)
        histogram = torch.bincount(digit, minlength=(1 << width) + 1)[: 1 << width]
        histogram = comm.all_reduce_sum(histogram.to(torch.int64), group)
        at_least = histogram.flip(0).cumsum(0).flip(0)  # at_least[d] = #(digit >= d)
        chosen = int((at_least >= still_needed).nonzero().max())
        still_needed -= int(at_least[chosen] - histogram[chosen])
        kth_unsigned |= chosen << low_bit
        same = digit == chosen
        if undecided is None:
            undecided = same.nonzero().squeeze(1)
            undecided_values = values[undecided]
        else:
            undecided, undecided_values = undecided[same], undecided_values[same]
        high_bit = low_bit
    if undecided is None:  # zero-width range: every candidate ties
        undecided = _positions(candidate, keys.numel(), keys.device)

    kth_key = kth_unsigned - bias if key_range is None else kth_unsigned + key_range[0]
    picked = keys > kth_key
    if candidate is not None:
        picked &= candidate
    return _hand_out_ties(picked, undecided, still_needed, rank, kth_key, group)


def _hand_out_ties(
    picked: torch.Tensor,
    ties: torch.Tensor,
    still_needed: int,
    rank: int,
    kth_key: int,
    group: dist.ProcessGroup | None,
) -> KSelection:
    """Add the first ``still_needed`` ties (global index order) to ``picked``: one all-gather."""
    counts = [picked.sum(), ties.numel()]
    rows, _ = comm.exchange_rank_rows(counts, None, group, device=picked.device)
    taken, ties_before = [], 0
    for _, num_ties in rows:
        taken.append(max(0, min(num_ties, still_needed - ties_before)))
        ties_before += num_ties
    picked[ties[: taken[rank]]] = True
    return KSelection(picked, [row[0] + t for row, t in zip(rows, taken, strict=True)], kth_key)


def _positions(mask: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
    """Indices of the True entries of ``mask`` (all indices for None)."""
    if mask is None:
        return torch.arange(numel, device=device)
    return mask.nonzero().squeeze(1)


# -- keys ---------------------------------------------------------------------------------


def keys_of(values: torch.Tensor) -> torch.Tensor:
    """Hardness keys of losses; integer values (random keys) are their own keys."""
    if not values.is_floating_point():
        return values
    if on_numpy(values) and values.dtype in _NUMPY_KEY_DTYPES:
        # hardness_key's bit operations in numpy: several times faster on CPU.
        int_dtype, sign_bit, int_max = _NUMPY_KEY_DTYPES[values.dtype]
        bits = (values.detach().numpy() + 0.0).view(int_dtype)  # -0.0 -> +0.0, a copy
        bits ^= (bits >> sign_bit) & int_max
        return torch.from_numpy(bits)
    return hardness_key(values)


def key_dtype_of(values: torch.Tensor) -> torch.dtype:
    """Dtype of :func:`keys_of` for ``values``."""
    return key_dtype_for(values.dtype) if values.is_floating_point() else values.dtype


def on_numpy(values: torch.Tensor) -> bool:
    """Whether ``values`` take the numpy path: CPU, a numpy dtype, numpy installed."""
    return _numpy is not None and values.device.type == "cpu" and values.dtype in _NUMPY_DTYPES


def any_nan(values: torch.Tensor) -> bool | torch.Tensor:
    """Whether ``values`` (non-empty) holds a NaN: one reduction (max propagates NaN).

    A Python bool on the numpy path (CPU), else a 0-dim bool tensor (no host sync).
    """
    if on_numpy(values):
        return bool(_numpy.isnan(values.numpy().max()))
    return torch.isnan(values.amax())
