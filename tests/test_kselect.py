"""dist_ohem.kselect: every algorithm and path against single-process references.

The references are :func:`dist_ohem.selection.top_m_mask` / ``select_mask`` (the pure
definitions, property-tested against brute force in test_selection.py) on the
concatenated batch, or a sort written here. Small module constants (sample size, bins,
gather limit) force the rare paths: brackets that miss, heavy final bins resolved by
radix, zero-width key ranges.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ohem import HardExampleSelector, bracket, kselect, numpy_host
from dist_ohem.comm import all_gather_equal, get_rank
from dist_ohem.selection import (
    KEY_SENTINEL,
    SelectionRule,
    hardness_key,
    hardness_key_of,
    key_dtype_for,
    key_from_descending,
    select_mask,
    top_m_mask,
)
from tests.parity import rank_slice

SPECIAL = [0.0, -0.0, 1.0, 2.5, math.inf, -math.inf, 1e-30, -1e-30, 3.0e38]
GATHER_NAME = next(n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n))


@contextmanager
def small_constants(
    sample: int = 16, bins: int = 4, final_gather: int = 8, capacity: float = 4.0, block: int = 8
) -> Iterator[None]:
    """Shrink the bracket's constants so that small inputs reach every path (``capacity``
    0 or 1: bracket entries that overflow their room on the torch path; ``block``: the
    numpy marking pass in several blocks)."""
    names = (
        "SAMPLE_SIZE",
        "BRACKET_BINS",
        "FINAL_BIN_GATHER_MAX",
        "BRACKET_CAPACITY_MARGINS",
        "_MARK_BLOCK",
    )
    saved = [getattr(bracket, name) for name in names]
    for name, value in zip(names, (sample, bins, final_gather, capacity, block), strict=True):
        setattr(bracket, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(bracket, name, value)


@contextmanager
def torch_ops_only() -> Iterator[None]:
    """Run kselect's passes and comm's rows with torch ops (the host path without numpy)."""
    with mock.patch.object(numpy_host, "np", None):
        yield


def reference(values: torch.Tensor, candidate: torch.Tensor | None, m: int) -> tuple:
    """(mask, kth key) by sorting: larger key first, ties to the lower index."""
    keys = kselect.keys_of(values).tolist()
    usable = [
        i
        for i in range(len(keys))
        if (candidate is None or candidate[i]) and not math.isnan(float(values[i]))
    ]
    chosen = sorted(usable, key=lambda i: (-keys[i], i))[:m]
    mask = torch.zeros(len(keys), dtype=torch.bool)
    mask[chosen] = True
    return mask, min(keys[i] for i in chosen)


@st.composite
def vectors(draw, min_size: int = 1, max_size: int = 400):
    """Losses (float32/float64, tie-heavy or not, +-inf, +-0) and an optional candidate mask."""
    n = draw(st.integers(min_size, max_size))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["random", "tied", "equal"]))
    if kind == "random":
        pool = st.floats(allow_nan=False, width=32) | st.sampled_from(SPECIAL)
    elif kind == "tied":
        pool = st.sampled_from(SPECIAL)
    else:
        pool = st.just(draw(st.sampled_from(SPECIAL)))
    values = torch.tensor(draw(st.lists(pool, min_size=n, max_size=n)), dtype=dtype)
    candidate = None
    if draw(st.booleans()):
        candidate = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        if not candidate.any():
            candidate[0] = True
    return values, candidate


@settings(max_examples=80, deadline=None)
@given(
    batch=vectors(),
    data=st.data(),
    numpy_path=st.booleans(),
    capacity=st.sampled_from([0.0, 1.0, 4.0]),
)
def test_single_rank_algorithms_match_the_sort(batch, data, numpy_path, capacity):
    values, candidate = batch
    num_candidates = values.numel() if candidate is None else int(candidate.sum())
    m = data.draw(st.integers(1, num_candidates))
    expected_mask, expected_kth = reference(values, candidate, m)
    keys = hardness_key(values)
    n = values.numel()
    numpy_or_not = mock.patch.object(numpy_host, "np", numpy_host.np if numpy_path else None)
    with small_constants(capacity=capacity), numpy_or_not:
        results = {
            "gather": kselect.gather_select(keys, candidate, m, 0, [n], None),
            "radix": kselect.radix_select(keys, candidate, m, 0, None),
            "bracket": bracket.bracket_select(values, candidate, m, 0, [n], num_candidates, None),
        }
    for name, result in results.items():
        assert torch.equal(result.picked, expected_mask), name
        assert result.per_rank == [m], name
        assert result.kth_key == expected_kth, name


@settings(max_examples=50, deadline=None)
@given(batch=vectors())
def test_keys_of_orders_like_the_losses_on_both_paths(batch):
    values, _ = batch
    keys = kselect.keys_of(values)
    with torch_ops_only():
        assert torch.equal(kselect.keys_of(values), keys)
    assert keys.dtype == (torch.int64 if values.dtype == torch.float64 else torch.int32)
    pairs = sorted(zip(values.tolist(), keys.tolist(), strict=True))
    for (loss_a, key_a), (loss_b, key_b) in itertools.pairwise(pairs):
        assert (key_a < key_b) if loss_a < loss_b else (key_a == key_b)


@settings(max_examples=50, deadline=None)
@given(batch=vectors(min_size=2), data=st.data())
def test_radix_on_a_key_range_holding_every_key(batch, data):
    values, _ = batch
    keys = hardness_key(values).to(torch.int64)
    m = data.draw(st.integers(1, keys.numel()))
    low, high = int(keys.min()), int(keys.max())
    low -= data.draw(st.integers(0, 5))
    result = kselect.radix_select(keys, None, m, 0, None, key_range=(low, high))
    assert torch.equal(result.picked, top_m_mask(keys, torch.ones_like(keys, dtype=torch.bool), m))


@settings(max_examples=50, deadline=None)
@given(batch=vectors(), data=st.data())
def test_bracket_bounds_are_sampled_keys_or_extremes_and_ordered(batch, data):
    values, candidate = batch
    num_candidates = values.numel() if candidate is None else int(candidate.sum())
    m = data.draw(st.integers(1, num_candidates))
    samples = bracket.draw_sample(values, candidate, 16).unsqueeze(0)
    extremes = bracket.extreme_keys(values)
    margin = bracket.bracket_margin([values.numel()], m, num_candidates, 16)
    low, high = bracket.bracket_bounds(samples, [values.numel()], m, margin, extremes)
    allowed = set(samples.flatten().tolist()) - {KEY_SENTINEL[samples.dtype]}
    assert int(low) in allowed | {extremes[0]}
    assert int(high) in allowed | {extremes[1]}
    assert int(low) <= int(high)


def test_a_sampled_sentinel_is_never_a_bound():
    # CI's counterexample: 22 equal losses, 5 candidates, m = 5; the 16-key sample drew
    # one candidate, and the upper bound landed on a sentinel, below the lower bound.
    values = torch.zeros(22)
    candidate = torch.zeros(22, dtype=torch.bool)
    candidate[[2, 8, 15, 19, 21]] = True
    samples = bracket.draw_sample(values, candidate, 16).unsqueeze(0)
    assert int((samples != KEY_SENTINEL[samples.dtype]).sum()) == 1
    margin = bracket.bracket_margin([22], 5, 5, 16)
    low, high = bracket.bracket_bounds(samples, [22], 5, margin, bracket.extreme_keys(values))
    assert int(high) == int(hardness_key(torch.zeros(1))) and int(low) <= int(high)


def test_a_wrong_sample_misses_and_falls_back_to_radix():
    values = torch.arange(1000.0)
    for fake in (torch.full((256,), 10.0), torch.full((256,), 990.0)):  # bracket far off
        samples = hardness_key(fake).unsqueeze(0)
        with mock.patch.object(kselect, "radix_select", wraps=kselect.radix_select) as radix:
            result = bracket.bracket_select(values, None, 100, 0, [1000], 1000, None, samples)
        assert radix.call_count == 1
        assert result.picked.nonzero().squeeze(1).tolist() == list(range(900, 1000))


# -- distributed ------------------------------------------------------------------------


def bracket_on_rank(sizes, values, candidate, m, samples_from, numpy_path, capacity) -> tuple:
    """Worker: this rank's bracket selection; ``samples_from`` = other data to sample (a
    deliberately wrong sample) or None; ``capacity``: BRACKET_CAPACITY_MARGINS."""
    rank = get_rank()
    local = rank_slice(values, sizes, rank)
    local_candidate = None if candidate is None else rank_slice(candidate, sizes, rank)
    num_candidates = values.numel() if candidate is None else int(candidate.sum())
    patch = mock.patch.object(numpy_host, "np", numpy_host.np if numpy_path else None)
    with small_constants(capacity=capacity), patch:
        samples = None
        if samples_from is not None:
            wrong = bracket.draw_sample(rank_slice(samples_from, sizes, rank), None)
            samples = all_gather_equal(wrong.to(kselect.key_dtype_of(local)), None)
        result = bracket.bracket_select(
            local, local_candidate, m, rank, sizes, num_candidates, None, samples
        )
    return result.picked, result.per_rank, result.kth_key


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_bracket_matches_the_sort_on_uneven_and_empty_ranks(ranks, world_size):
    @settings(max_examples=12, deadline=None)
    @given(
        sizes=st.lists(st.integers(0, 120), min_size=world_size, max_size=world_size),
        data=st.data(),
        numpy_path=st.booleans(),
        wrong_sample=st.booleans(),
        capacity=st.sampled_from([0.0, 1.0, 4.0]),
    )
    def check(sizes, data, numpy_path, wrong_sample, capacity):
        n = sum(sizes)
        if n == 0:
            sizes[0] = n = 5
        values, candidate = data.draw(vectors(min_size=n, max_size=n))
        num_candidates = n if candidate is None else int(candidate.sum())
        m = data.draw(st.integers(1, num_candidates))
        samples_from = torch.randn(n).abs() * 1e3 if wrong_sample else None
        outputs = ranks.run(
            world_size,
            bracket_on_rank,
            sizes,
            values,
            candidate,
            m,
            samples_from,
            numpy_path,
            capacity,
            timeout=30,
        )
        expected_mask, expected_kth = reference(values, candidate, m)
        assert torch.equal(torch.cat([out[0] for out in outputs]), expected_mask)
        expected_per_rank = [int(part.sum()) for part in expected_mask.split(sizes)]
        for _, per_rank, kth in outputs:
            assert per_rank == expected_per_rank
            assert kth == expected_kth

    check()


def calls_on_rank(sizes_per_call, strategy, dtypes) -> list:
    """Worker: one selector, several calls whose sizes and dtypes change: the payload
    predicted from one call may not fit the next."""
    rank = get_rank()
    selector = HardExampleSelector(keep=0.3, strategy=strategy)
    masks = []
    with small_constants(sample=8):
        for call, (sizes, dtype) in enumerate(zip(sizes_per_call, dtypes, strict=True)):
            gen = torch.Generator().manual_seed(call)
            losses = torch.randint(0, 20, (sum(sizes),), generator=gen).to(dtype)
            masks.append(selector(rank_slice(losses, sizes, rank)).mask)
    return masks


@pytest.mark.parametrize("strategy", ["gather", "bracket", "auto"])
def test_payload_survives_changing_sizes_and_dtypes(ranks, strategy):
    sizes_per_call = [[5, 7], [5, 7], [40, 3], [0, 9], [60, 61], [3, 3], [64, 0]]
    dtypes = [torch.float32] * 3 + [torch.float64] * 2 + [torch.float32] * 2
    with mock.patch("dist_ohem.on_host.AUTO_BRACKET_MIN_KEYS", 32):
        outputs = ranks.run(2, calls_on_rank, sizes_per_call, strategy, dtypes, timeout=30)
    for call, (sizes, dtype) in enumerate(zip(sizes_per_call, dtypes, strict=True)):
        gen = torch.Generator().manual_seed(call)
        losses = torch.randint(0, 20, (sum(sizes),), generator=gen).to(dtype)
        expected = select_mask(losses, SelectionRule(keep=0.3))
        assert torch.equal(torch.cat([outputs[0][call], outputs[1][call]]), expected), call


class CollectiveMeter:
    """Counts this rank's collectives and the bytes it hands to them."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._patches = [
            mock.patch.object(dist, name, side_effect=self._counter(getattr(dist, name), pos))
            for name, pos in ((GATHER_NAME, 1), ("all_reduce", 0))
        ]

    def _counter(self, original, position):
        def counted(*args, **kwargs):
            self.calls += 1
            self.bytes += args[position].numel() * args[position].element_size()
            return original(*args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveMeter:
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for patch in self._patches:
            patch.stop()


def steady_state_on_rank(num_keys: int, strategy: str, calls: int) -> list[tuple[int, int]]:
    """Worker: (collectives, bytes sent) of each of ``calls`` calls on fresh losses."""
    selector = HardExampleSelector(keep=0.1, strategy=strategy)
    counts = []
    for call in range(calls):
        losses = torch.rand(num_keys, generator=torch.Generator().manual_seed(call))
        with CollectiveMeter() as meter:
            selector(losses)
        counts.append((meter.calls, meter.bytes))
    return counts


def test_gather_needs_one_collective_per_call_once_the_capacity_is_known(ranks):
    per_rank = ranks.run(2, steady_state_on_rank, 256, "gather", 3, timeout=30)
    for counts in per_rank:
        assert [calls for calls, _ in counts] == [2, 1, 1]


def test_bracket_bytes_do_not_grow_with_the_number_of_losses(ranks):
    small, large = (
        ranks.run(2, steady_state_on_rank, num_keys, "bracket", 2, timeout=60)[0][1]
        for num_keys in (20_000, 400_000)
    )
    # Row + sample, histograms, final bin: three collectives in the steady state.
    assert small[0] == large[0] == 3
    # The final bin's gather varies a little with the data; the rest is fixed.
    fixed = 8 * 11 + 4 * bracket.SAMPLE_SIZE + 8 * (bracket.BRACKET_BINS + 3)
    for _, sent in (small, large):
        assert fixed <= sent <= fixed + 4 * bracket.FINAL_BIN_GATHER_MAX
    assert large[1] < 1.2 * small[1]


def nan_at_invalid_positions_on_rank() -> tuple:
    losses = torch.tensor([1.0, math.nan, 3.0, 2.0])
    valid = torch.tensor([True, False, True, True])
    result = HardExampleSelector(top_k=2, strategy="bracket")(losses, valid)
    return result.mask, result.num_valid_global


def test_nan_where_invalid_does_not_raise(ranks):
    for mask, num_valid in ranks.run(2, nan_at_invalid_positions_on_rank, timeout=30):
        assert mask.tolist() == [False, False, True, False]
        assert num_valid == 6


@settings(max_examples=80, deadline=None)
@given(batch=vectors(), data=st.data())
def test_sorted_select_matches_the_sort(batch, data):
    """The device path's k-selection: the first m of the hardness order (one rank), and
    the m-th key found by the radix rounds that several ranks run (their sums local)."""
    values, candidate = batch
    num_candidates = values.numel() if candidate is None else int(candidate.sum())
    m = data.draw(st.integers(0, num_candidates))
    key_dtype = key_dtype_for(values.dtype)
    ranked = hardness_key_of(values, values.dtype, descending=True)
    positions = torch.arange(values.numel())
    hard = kselect.hardness_sort(ranked, candidate, key_dtype, positions, positions.device)
    result = kselect.top_m_sorted(hard, torch.tensor(m), None, 1, 0)
    by_rounds = kselect._mth_smallest(hard, torch.tensor(m), None)
    if m:
        expected_mask, expected_kth = reference(values, candidate, m)
        kth = (key_from_descending(k) for k in (result.kth_ranked, by_rounds))
        assert [int(k) for k in kth] == [expected_kth] * 2
    else:
        expected_mask = torch.zeros(values.numel(), dtype=torch.bool)
    assert torch.equal(result.picked, expected_mask)
    assert result.per_rank.tolist() == [m]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=5),
    data=st.data(),
)
def test_tie_shares_hand_ties_out_in_rank_order(counts, data):
    """From every rank's above/tie counts (one row per rank): the ranks before take their
    ties first, each rank at most all of its own."""
    above = [a for a, _ in counts]
    ties = [t for _, t in counts]
    m = data.draw(st.integers(sum(above), sum(above) + sum(ties)))
    gathered = torch.tensor([[a, a + t] for a, t in counts])
    shares = kselect.shares_of(gathered, m, len(counts), torch.device("cpu"))
    left, expected = m - sum(above), []
    for a, t in counts:
        expected.append(a + min(t, left))
        left -= min(t, left)
    assert shares.tolist() == expected
