"""Bracket k-selection (Floyd-Rivest style): the top-m candidates from a sampled bracket.

The same problem as :mod:`dist_ohem.kselect` (the top-m candidates over the rank-major
concatenation of all ranks' vectors, ties to the lower global index), for dense mining
on the host path: a small sample of every rank bounds the m-th key, one pass over the
losses counts what lies above the bounds and extracts what lies inside, and only those
are resolved exactly (a histogram of them, then a gather of one bin). Bytes independent
of the vector length; it compares losses directly, so the full vector is never converted
to keys. A sample that misses falls back to :func:`dist_ohem.kselect.radix_select`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dist_ohem import comm, kselect, numpy_host
from dist_ohem.kselect import KSelection
from dist_ohem.selection import KEY_SENTINEL

__all__ = [
    "BRACKET_BINS",
    "SAMPLE_SIZE",
    "bracket_bounds",
    "bracket_margin",
    "bracket_select",
    "draw_sample",
    "extreme_keys",
]

#: Keys each rank contributes to the bracket's sample.
SAMPLE_SIZE = 16384
#: Half-width of the bracket in standard deviations of the sample's rank estimate: the
#: m-th key falls outside with probability ~5e-4 per call (then: full radix).
BRACKET_SIGMAS = 3.5
#: Bins of the histogram over the keys inside the bracket.
BRACKET_BINS = 2048
#: Keys of the final bin (all ranks) up to which they are gathered; above, radix.
FINAL_BIN_GATHER_MAX = 1 << 14
#: Room for the bracket's entries on each rank, in margins (:func:`bracket_margin`): the
#: bracket holds about two margins of entries over all ranks, so four leave room for the
#: sample's error. Fixed before the pass, so that extracting them needs no host sync; a
#: rank with more (heavy ties) makes every rank fall back to radix.
BRACKET_CAPACITY_MARGINS = 4.0
#: Entries per block of the numpy marking pass (cache-sized blocks: one read of each).
_MARK_BLOCK = 1 << 18
#: Key of +inf: its bit pattern read as an integer.
_KEY_OF_INF = {torch.int32: 0x7F800000, torch.int64: 0x7FF0000000000000}


def draw_sample(
    values: torch.Tensor, candidate: torch.Tensor | None, size: int | None = None
) -> torch.Tensor:
    """``(size,)`` keys (default SAMPLE_SIZE) of a fixed quasi-random sample of the entries.

    For ``n > size``, one entry per stratum of ``n / size`` consecutive entries, at
    offset ``frac(i * golden ratio)`` within stratum i: spread evenly, in increasing order
    (cache-friendly), and without a period that could alias with image rows. Every entry
    otherwise. Non-candidates and unused slots hold ``KEY_SENTINEL``. A function of ``n``
    and ``size`` only.
    """
    size = SAMPLE_SIZE if size is None else size
    numel = values.numel()
    if numel > size:
        strata = torch.arange(size, dtype=torch.float64, device=values.device)
        positions = ((strata + strata * 0.6180339887498949 % 1.0) * (numel / size)).long()
        sampled = kselect.keys_of(values[positions])
        sampled_candidate = None if candidate is None else candidate[positions]
        return kselect.pad_keys(sampled, sampled_candidate, size)
    return kselect.pad_keys(kselect.keys_of(values), candidate, size)


def bracket_bounds(
    samples: torch.Tensor,
    lengths: list[int],
    m: int,
    margin: float,
    extremes: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``(low, high)`` with ``#(key > high) < m <= #(key >= low)`` with high probability.

    Args:
        samples: ``(W, s)`` sampled keys from :func:`draw_sample` of every rank.
        lengths: every rank's number of entries (the sample of rank r stands for
            ``lengths[r] / min(lengths[r], s)`` entries each).
        m: rank of the wanted key; ``margin``: the bracket's half-width in entries
            (:func:`bracket_margin`).
        extremes: the smallest and largest key a candidate can have
            (:func:`extreme_keys`), used where the sample has no bound.

    Returns:
        0-dim int64 tensors on the samples' device (no host sync). Sorting the weighted
        sample descending, ``high`` is the last sampled key whose estimated count of keys
        at or above it is at most ``m - margin``, ``low`` the first with at least
        ``m + margin``. A missing end becomes the extreme key.
    """
    size = samples.shape[1]
    weights = [n / min(n, size) if n else 0.0 for n in lengths]
    sentinel = KEY_SENTINEL[samples.dtype]
    # Filled on the device, not copied from a host list: no host-device synchronization.
    per_key = torch.cat([samples.new_full((size,), w, dtype=torch.float64) for w in weights]).where(
        samples.reshape(-1) != sentinel, 0.0
    )
    # Ascending, then flipped: torch's CPU sort is several times slower descending.
    ordered, order = (part.flip(0) for part in samples.reshape(-1).sort())
    at_or_above = per_key[order].cumsum(0)
    high_index = torch.searchsorted(at_or_above, m - margin, right=True) - 1
    low_index = torch.searchsorted(at_or_above, m + margin)
    lowest, highest = extremes
    last = ordered.numel() - 1
    # The sentinels (non-candidates) come last and weigh 0, so the search may stop on
    # one: the bound is then the least sampled candidate, or the extreme if none.
    high_index = high_index.minimum((ordered != sentinel).sum() - 1)
    high = torch.where(high_index >= 0, ordered[high_index.clamp(0, last)], highest)
    low_key = ordered[low_index.clamp(0, last)]
    low = torch.where((low_index <= last) & (low_key != sentinel), low_key, lowest)
    return low.to(torch.int64), high.to(torch.int64)


def bracket_margin(lengths: list[int], m: int, num_candidates: int, size: int) -> float:
    """Half-width of the bracket in entries: BRACKET_SIGMAS standard deviations of the
    sample's estimate of a key's rank (``size`` sampled entries per rank) plus two sample
    weights. A function of host numbers only."""
    weights = [n / min(n, size) if n else 0.0 for n in lengths]
    fraction = m / num_candidates
    variance = fraction * (1 - fraction) * sum(n * n / size for n in lengths if n > size)
    return BRACKET_SIGMAS * math.sqrt(variance) + 2 * max(weights)


def extreme_keys(values: torch.Tensor) -> tuple[int, int]:
    """Smallest and largest key a candidate of ``values`` can have (no host sync).

    Losses: the keys of -inf and +inf (``key(-x) = -key(x) - 1``). Integer keys: all
    but the sentinel.
    """
    if values.is_floating_point():
        highest = _KEY_OF_INF[kselect.key_dtype_of(values)]
        return -highest - 1, highest
    return KEY_SENTINEL[values.dtype] + 1, torch.iinfo(values.dtype).max


def bracket_select(
    values: torch.Tensor,
    candidate: torch.Tensor | None,
    m: int,
    rank: int,
    lengths: list[int],
    num_candidates: int,
    group: dist.ProcessGroup | None,
    samples: torch.Tensor | None = None,
) -> KSelection:
    """Top-m by a sampled bracket: bytes independent of n, one full pass over the losses.

    Args:
        values: this rank's losses (float, compared directly: ``loss >= bound`` is
            ``key >= key(bound)``, and NaN is never inside) or integer keys.
        candidate: bool mask or None (every non-NaN entry).
        m, rank, lengths: as for the other algorithms; ``num_candidates`` over all ranks.
        samples: the ``(W, SAMPLE_SIZE)`` :func:`draw_sample` of every rank if it already
            travelled (with the selector's row); gathered here otherwise.

    Steps: bounds from the sample (:func:`bracket_bounds`); one pass marks every entry
    ``>= low`` and extracts those ``<= high`` (the bracket, at most
    BRACKET_CAPACITY_MARGINS margins of them); one all-gather of each rank's count above
    ``high``, bracket size and histogram (BRACKET_BINS bins) of the bracket's keys; the
    bin holding the m-th key is resolved by gathering its keys (or radix when more than
    FINAL_BIN_GATHER_MAX); entries of the bracket that lose are cleared from the mark.
    Host reads on a GPU: the histograms and the final bin's counts, nothing else.
    """
    if samples is None:
        samples = comm.all_gather_equal(draw_sample(values, candidate), group)
    margin = bracket_margin(lengths, m, num_candidates, samples.shape[1])
    low, high = bracket_bounds(samples, lengths, m, margin, extreme_keys(values))
    capacity = min(values.numel(), math.ceil(BRACKET_CAPACITY_MARGINS * margin))
    at_least_low, num_at_least_low, inside, num_inside = _mark_bracket(
        values, candidate, low, high, capacity
    )
    # On the torch path ``inside`` has ``capacity`` slots, the real entries first.
    real = torch.arange(inside.numel(), device=values.device) < num_inside
    inside_keys = kselect.keys_of(values.index_select(0, inside))
    bins = _bin_of(inside_keys, low, high)
    histogram = torch.zeros(BRACKET_BINS, dtype=torch.int64, device=values.device)
    histogram.index_add_(0, bins, real.long())
    rows, _ = comm.exchange_rank_rows(
        [num_at_least_low - num_inside, num_inside > inside.numel()], None, group, payload=histogram
    )

    above_per_rank = [row[0] for row in rows]
    bin_totals = [sum(column) for column in zip(*(row[2:] for row in rows), strict=True)]
    still_needed = m - sum(above_per_rank)
    overflowed = any(row[1] for row in rows)
    if overflowed or still_needed <= 0 or still_needed > sum(bin_totals):  # the sample missed
        return kselect.radix_select(kselect.keys_of(values), candidate, m, rank, group)
    final_bin = BRACKET_BINS - 1
    while still_needed > bin_totals[final_bin]:
        still_needed -= bin_totals[final_bin]
        final_bin -= 1
    for r, row in enumerate(rows):
        above_per_rank[r] += sum(row[3 + final_bin :])
    final_lengths = [row[2 + final_bin] for row in rows]

    # Its size is known from the histograms: no host sync to find the final bin's entries.
    in_final = ((bins == final_bin) & real).nonzero_static(size=final_lengths[rank]).squeeze(1)
    final_keys = inside_keys[in_final]
    if sum(final_lengths) <= FINAL_BIN_GATHER_MAX:
        final = kselect.gather_select(final_keys, None, still_needed, rank, final_lengths, group)
    else:  # a heavy bin: equal keys, or a bracket far wider than its sample predicts
        key_range = (int(low), int(high))
        final = kselect.radix_select(final_keys, None, still_needed, rank, group, key_range)
    won = bins > final_bin
    won[in_final] = final.picked
    # Every real bracket entry is marked: clearing the losers is a min with ``won``; the
    # unused slots (index 0) take a min with True, which changes nothing.
    at_least_low.view(torch.uint8).scatter_reduce_(0, inside, (won | ~real).byte(), "amin")
    per_rank = [a + b for a, b in zip(above_per_rank, final.per_rank, strict=True)]
    return KSelection(at_least_low, per_rank, final.kth_key)


def _bin_of(keys: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Bin of each key in ``[low, high]``: monotone in the key, in ``[0, BRACKET_BINS)``.

    Computed in float64 (int64 keys can span more than int64 differences hold); any
    monotone map identical on every rank keeps the selection exact.
    """
    span = (high.double() - low.double() + 1.0) / BRACKET_BINS
    bins = ((keys.double() - low.double()) / span).floor().long()
    return bins.clamp_(0, BRACKET_BINS - 1)


def _mark_bracket(
    values: torch.Tensor,
    candidate: torch.Tensor | None,
    low: torch.Tensor,
    high: torch.Tensor,
    capacity: int,
) -> tuple[torch.Tensor, int | torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """``(mark, #mark, inside, #inside)``: the mask of candidates ``>= low`` and the
    indices of the candidates in ``[low, high]``, with their counts.

    ``low`` and ``high`` are keys; for losses they are compared as the loss values they
    encode (exactly representable: they are sampled losses or +-inf). On the numpy path
    ``inside`` holds exactly the bracket's entries and the counts are ints. On the torch
    path the counts are 0-dim tensors and ``inside`` has ``capacity`` slots (the entries
    in index order, then zeros; truncated when there are more): no host sync.
    """
    low_value, high_value = (_key_to_value(key, values.dtype) for key in (low, high))
    if numpy_host.on_numpy(values):
        return _mark_bracket_numpy(
            values.numpy(),
            None if candidate is None else candidate.numpy(),
            low_value.item(),
            high_value.item(),
        )
    at_least_low = values >= low_value
    if candidate is not None:
        at_least_low &= candidate
    in_bracket = at_least_low & (values <= high_value)
    inside = in_bracket.nonzero_static(size=capacity, fill_value=0).squeeze(1)
    return at_least_low, torch.count_nonzero(at_least_low), inside, in_bracket.count_nonzero()


def _mark_bracket_numpy(array, candidate, low: float, high: float):
    """:func:`_mark_bracket` on numpy arrays, block by block so each block is read once."""
    np = numpy_host.np
    low, high = np.array([low, high], dtype=array.dtype)
    at_least_low = np.empty(array.size, dtype=bool)
    in_bracket = np.empty(min(array.size, _MARK_BLOCK), dtype=bool)
    inside, count = [], 0
    for start in range(0, array.size, _MARK_BLOCK):
        block = array[start : start + _MARK_BLOCK]
        mark, bracket = at_least_low[start : start + block.size], in_bracket[: block.size]
        np.greater_equal(block, low, out=mark)
        if candidate is not None:
            np.logical_and(mark, candidate[start : start + block.size], out=mark)
        count += np.count_nonzero(mark)
        np.less_equal(block, high, out=bracket)
        np.logical_and(bracket, mark, out=bracket)
        inside.append(bracket.nonzero()[0] + start)
    inside = np.concatenate(inside) if inside else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(at_least_low), int(count), torch.from_numpy(inside), inside.size


def _key_to_value(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0-dim tensor of ``dtype`` whose key is ``key`` (inverse of keys_of, on device)."""
    if not dtype.is_floating_point:
        return key.to(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    int_dtype = torch.int64 if wide == torch.float64 else torch.int32
    bits = key.to(int_dtype)
    bits = torch.where(bits >= 0, bits, bits ^ torch.iinfo(int_dtype).max)
    return bits.view(wide).to(dtype)
