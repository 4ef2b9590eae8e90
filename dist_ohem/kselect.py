"""Distributed k-selection, one family: the same top-m candidates on every rank.

Every function here solves one problem. Rank r holds a vector of keys (integer hardness
keys, :func:`dist_ohem.selection.hardness_key`, or random keys) and a candidate mask
(None = every entry is a candidate). Over the rank-major concatenation of all ranks'
vectors, select the ``m`` candidates with the largest keys, equal keys going to the lower
global index: :func:`dist_ohem.selection.top_m_mask` on the concatenated batch. All
ranks call with the same ``m``, ``0 <= m <= #candidates``.

Two kinds of algorithm, for the selector's two paths:

- **Host path** (CPU, counts read into Python), returning a :class:`KSelection`:
  :func:`gather_select` all-gathers the keys (one collective, bytes proportional to the
  largest rank's vector; :func:`select_gathered` is its second half, for keys that
  already travelled with the selector's row). :func:`radix_select` all-reduces
  histograms of key digits (bytes independent of the vector length): the fallback of
  :func:`dist_ohem.bracket.bracket_select`, which handles large vectors.
- **Device path** (no host read, static shapes), returning a :class:`SortedSelection`:
  :func:`hardness_sort` sorts each rank's keys once, :func:`top_m_sorted` finds the m-th
  key by radix rounds of ``searchsorted`` counts over the sorted keys.

Shared by both: :data:`RADIX_BITS` and :func:`tie_shares`, which hands the slots left at
the m-th key to its ties in global index order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ohem import comm, numpy_host
from dist_ohem.numpy_host import on_numpy
from dist_ohem.selection import KEY_SENTINEL, hardness_key, key_dtype_for

__all__ = [
    "RADIX_BITS",
    "HardnessOrder",
    "KSelection",
    "SortedSelection",
    "any_nan",
    "gather_select",
    "hardness_sort",
    "key_dtype_of",
    "keys_of",
    "pad_keys",
    "radix_select",
    "select_gathered",
    "shares_of",
    "tie_shares",
    "top_m_sorted",
]

#: Bits of the m-th key resolved per radix round: 2^11 parts, 3 rounds for 32-bit keys.
RADIX_BITS = 11
_KEY_MAX = {torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}
#: Loss dtype -> (numpy key dtype, its sign bit, its max): hardness_key's constants.
_NUMPY_KEY_DTYPES = {
    torch.float32: ("int32", 31, 0x7FFFFFFF),
    torch.float64: ("int64", 63, 0x7FFFFFFFFFFFFFFF),
}


# -- keys -----------------------------------------------------------------------------------


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


def any_nan(values: torch.Tensor) -> bool | torch.Tensor:
    """Whether ``values`` (non-empty) holds a NaN: one reduction (max propagates NaN).

    A Python bool on the numpy path (CPU), else a 0-dim bool tensor (no host sync).
    """
    if on_numpy(values):
        return bool(numpy_host.np.isnan(values.numpy().max()))
    return torch.isnan(values.amax())


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


# -- the tie hand-out, shared --------------------------------------------------------------


def tie_shares(
    bounds: torch.Tensor,
    m: int | torch.Tensor,
    group: dist.ProcessGroup | None,
    world_size: int,
    device: torch.device,
) -> torch.Tensor:
    """``(W,)`` int64: how many candidates every rank selects, given the m-th key.

    Args:
        bounds: ``(2,)`` int64, this rank's count of candidates above the m-th key and
            of those at or above it (the ties are the difference).
        m: the number to select over all ranks.
        world_size, device: of ``group`` and of ``bounds``.

    Rank r selects all of its candidates above the m-th key, then its ties while the
    ties of the ranks before it, and its own in index order, fit in what is left of
    ``m``: one all-gather of ``bounds``, and one product with a cached matrix.
    """
    return shares_of(comm.all_gather_equal(bounds, group), m, world_size, device)


def shares_of(
    gathered: torch.Tensor, m: int | torch.Tensor, world_size: int, device: torch.device
) -> torch.Tensor:
    """:func:`tie_shares` from every rank's ``bounds``, gathered: ``(W, 2)``."""
    above, at_or_above = gathered.unbind(1)
    # before[r] = sum_{s > r} above[s] + sum_{s < r} at_or_above[s]: the slots that the
    # ranks other than r take ahead of r's ties.
    before = (_tie_matrix(world_size, device) * gathered).sum((1, 2))
    return (m - before).clamp(above, at_or_above)


@functools.lru_cache(maxsize=16)
def _tie_matrix(world_size: int, device: torch.device) -> torch.Tensor:
    """``(W, W, 2)`` int64: ``[r, s, 0] = s > r`` (above) and ``[r, s, 1] = s < r``."""
    r, s = torch.meshgrid(*[torch.arange(world_size, device=device)] * 2, indexing="ij")
    return torch.stack([s > r, s < r], dim=2).to(torch.int64)


# -- host path -----------------------------------------------------------------------------


@dataclass
class KSelection:
    """The outcome of a host-path k-selection, identical on every rank but ``picked``.

    Attributes:
        picked: bool, one entry per local key; True = among the global top m.
        per_rank: number picked on every rank (rank order), summing to m.
        kth_key: key of the m-th largest candidate (the least hard picked one).
    """

    picked: torch.Tensor
    per_rank: list[int]
    kth_key: int


def select_gathered(keys: torch.Tensor, m: int, rank: int, lengths: list[int]) -> KSelection:
    """Top-m (``1 <= m <= #candidates``) over keys that every rank already holds.

    Args:
        keys: ``(W, capacity)`` integer keys, row r = rank r's keys in its local order,
            non-candidates and the padding past ``lengths[r]`` set to ``KEY_SENTINEL``.
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
    np = numpy_host.np
    flat = keys.reshape(-1)
    kth = np.partition(flat, flat.size - m)[flat.size - m]
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


def radix_select(
    keys: torch.Tensor,
    candidate: torch.Tensor | None,
    m: int,
    rank: int,
    group: dist.ProcessGroup | None,
    key_range: tuple[int, int] | None = None,
) -> KSelection:
    """Exact distributed k-selection without moving the keys (``1 <= m``).

    Each round all-reduces a 2^RADIX_BITS histogram of one digit of ``u``, the key as an
    unsigned offset (``u = key + 2^(bits-1)`` for the full signed range, ``key - low`` for
    ``key_range=(low, high)`` that holds every candidate key; ignored when wider than
    2^62), most significant digit first, among the still-undecided candidates, and fixes
    that digit of the m-th largest key. After ``ceil(bits / RADIX_BITS)`` rounds (none
    when ``low == high``) the m-th key is known exactly; :func:`tie_shares` hands the
    remaining slots to its ties.

    Cost on n local keys: the first round reads every key (non-candidates go to an extra
    bin that is not sent); later rounds only touch the keys in the chosen bins. Bytes
    sent: the histograms and the tie counts, independent of n.
    """
    if key_range is not None and key_range[1] - key_range[0] >= 1 << 62:
        key_range = None  # offsets from its low end would overflow int64
    values, bias, key_bits = _unsigned_offsets(keys, key_range)
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
    num_above = picked.sum()
    bounds = torch.stack([num_above, num_above + undecided.numel()])
    per_rank = tie_shares(bounds, m, group, comm.get_world_size(group), keys.device).tolist()
    picked[undecided[: per_rank[rank] - int(num_above)]] = True
    return KSelection(picked, per_rank, kth_key)


def _unsigned_offsets(
    keys: torch.Tensor, key_range: tuple[int, int] | None
) -> tuple[torch.Tensor, int, int]:
    """``(values, bias, bits)``: ``u = values + bias`` is the key's unsigned offset."""
    if key_range is None:
        key_bits = torch.iinfo(keys.dtype).bits
        return keys, 1 << (key_bits - 1), key_bits
    low, high = key_range
    return keys.to(torch.int64) - low, 0, (high - low).bit_length()


def _positions(mask: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
    """Indices of the True entries of ``mask`` (all indices for None)."""
    if mask is None:
        return torch.arange(numel, device=device)
    return mask.nonzero().squeeze(1)


# -- device path ---------------------------------------------------------------------------


@dataclass
class HardnessOrder:
    """One rank's keys in hardness order, on the device.

    Attributes:
        ranked: ``(n,)`` descending keys (the keys' order reversed: ``~key``, or
            :func:`dist_ohem.selection.hardness_key_of` with ``descending=True``),
            ascending: the hardest first, equal keys in index order, the non-candidates
            last (as the dtype's max, which no descending key reaches).
        order: ``(n,)`` int64, the local index of each entry of ``ranked``.
        positions: ``(n,)`` ``arange(n)``.
        key_dtype, device: of the keys.
    """

    ranked: torch.Tensor
    order: torch.Tensor
    positions: torch.Tensor
    key_dtype: torch.dtype
    device: torch.device


class SortedSelection:
    """The outcome of :func:`top_m_sorted`, all on the device.

    Attributes:
        picked: bool, one entry per local key; True = among the global top m.
        per_rank: ``(W,)`` int64, number picked on every rank (rank order).
        kth_ranked: 0-dim, the descending key of the m-th largest candidate
            (meaningless when ``m == 0``).

    With one rank ``per_rank`` and ``kth_ranked`` are derived when first read: a call
    that never reads them never computes them.
    """

    def __init__(
        self,
        picked: torch.Tensor,
        m: torch.Tensor,
        hard: HardnessOrder,
        per_rank: torch.Tensor | None = None,
        kth_ranked: torch.Tensor | None = None,
    ) -> None:
        self.picked = picked
        self._m, self._hard = m, hard
        self._per_rank, self._kth_ranked = per_rank, kth_ranked

    @functools.cached_property
    def per_rank(self) -> torch.Tensor:
        return self._m.view(1) if self._per_rank is None else self._per_rank

    @functools.cached_property
    def kth_ranked(self) -> torch.Tensor:
        if self._kth_ranked is not None or self._hard.positions.numel() == 0:
            return self._m if self._kth_ranked is None else self._kth_ranked
        return self._hard.ranked.take((self._m - 1).clamp(min=0))


def hardness_sort(
    ranked: torch.Tensor,
    candidate: torch.Tensor | None,
    key_dtype: torch.dtype,
    positions: torch.Tensor,
    device: torch.device,
) -> HardnessOrder:
    """One stable sort of this rank's keys into hardness order (:class:`HardnessOrder`).

    Args:
        ranked: ``(n,)`` descending key of every entry (see :class:`HardnessOrder`), of
            ``key_dtype``.
        candidate: ``(n,)`` bool or None (every entry).
        positions: ``arange(n)`` on ``device``, the keys' device, cached by the caller.
    """
    if candidate is not None:
        ranked = ranked.where(candidate, _KEY_MAX[key_dtype])
    ranked, order = ranked.sort(stable=True)
    return HardnessOrder(ranked, order, positions, key_dtype, device)


def top_m_sorted(
    hard: HardnessOrder,
    m: torch.Tensor,
    group: dist.ProcessGroup | None,
    world_size: int,
    rank: int,
) -> SortedSelection:
    """Top-m candidates over all ranks of ``group``, without a host read.

    Args:
        hard: this rank's :func:`hardness_sort`; the key dtype must be the same on every
            rank (it fixes the number of rounds).
        m: 0-dim int64 on the keys' device, the same on every rank.
        world_size, rank: of ``group`` (1 and 0 select over this rank's keys alone).

    With one rank the selection is the first ``m`` entries of the hardness order. With
    more, the m-th smallest descending key over all ranks is found in rounds: each splits the
    interval known to hold it into ``2^RADIX_BITS`` parts, counts the entries at or
    below each split point by one ``searchsorted`` on ``ranked``, all-reduces these
    counts and keeps the first part that reaches ``m`` (3 rounds for 32-bit keys, 6 for
    64-bit). :func:`tie_shares` then gives each rank its count, and a rank selects that
    many first entries of its order. Every collective's shape depends only on the key
    width and W.
    """
    if world_size == 1:
        return SortedSelection(_first_in_order(hard, m), m, hard)
    kth_ranked = _mth_smallest(hard, m, group)
    below_and_at = _below_and_at(hard.device)
    bounds = torch.searchsorted(hard.ranked, kth_ranked + below_and_at, right=True)
    per_rank = tie_shares(bounds, m, group, world_size, hard.device)
    picked = _first_in_order(hard, per_rank[rank])
    return SortedSelection(picked, m, hard, per_rank, kth_ranked)


def _mth_smallest(
    hard: HardnessOrder, m: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The smallest ``v`` with ``#(ranked <= v) >= m`` over all ranks (0-dim int64).

    Each round splits ``[low, low + 2^b)``, known to hold it, into ``2^w`` parts of
    ``step = 2^(b - w)``; the count at or below the end of each part, summed over the
    ranks, is below ``m`` for the parts entirely before it, so their number is the part
    that holds it.
    """
    low = None
    for points, step, lows in _radix_rounds(torch.iinfo(hard.key_dtype).bits, hard.device):
        at_or_below = torch.searchsorted(
            hard.ranked, points if low is None else low + points, right=True
        )
        comm.all_reduce_sum_(at_or_below, group)
        part = torch.searchsorted(at_or_below, m)
        low = lows.take(part) if low is None else low.add(part, alpha=step)
    return low


@functools.lru_cache(maxsize=16)
def _radix_rounds(
    bits: int, device: torch.device
) -> tuple[tuple[torch.Tensor, int, torch.Tensor | None], ...]:
    """Per round of :func:`_mth_smallest`: the ends of its parts (absolute in the first
    round, from the dtype's min; relative to ``low`` after), the part width, and in the
    first round the low end of every part. Made on the device (a tensor copied from the
    host would wait for it), as offsets from the middle part: int64 holds them even for
    64-bit keys, whose full range it does not."""
    lowest, rounds, remaining = -(1 << (bits - 1)), [], bits
    while remaining > 0:
        width = min(RADIX_BITS, remaining)
        step, half = 1 << (remaining - width), 1 << (width - 1)
        start = lowest if not rounds else 0
        middle = start + half * step  # the low end of the middle part
        parts = torch.arange(-half, half, device=device) * step
        ends = parts[1:] + (middle - 1)
        rounds.append((ends, step, parts + middle if not rounds else None))
        remaining -= width
    return tuple(rounds)


@functools.lru_cache(maxsize=16)
def _below_and_at(device: torch.device) -> torch.Tensor:
    """Added to the m-th descending key: the points that count the entries below and at it."""
    return torch.arange(-1, 1, device=device)


def _first_in_order(hard: HardnessOrder, count: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries ``hard.order[:count]`` (static shapes: a scatter)."""
    first = hard.positions < count
    return torch.empty_like(first).scatter_(0, hard.order, first)
