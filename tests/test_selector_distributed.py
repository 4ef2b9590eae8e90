"""The distributed mask equals the single-process selection on the concatenated batch."""

from __future__ import annotations

import math
import random
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ohem import HardExampleSelector
from dist_ohem.comm import get_rank
from dist_ohem.on_host import AUTO_BRACKET_MIN_KEYS
from dist_ohem.selection import SelectionRule, select_mask
from tests.parity import Case, global_losses, rank_slice, reference_mask
from tests.test_selection import floor_kwargs, rules

RULES = [
    {"keep": 0.3},
    {"keep": 0.1, "min_kept": 4},
    {"keep": 1.0},
    {"top_k": 5},
    {"top_k": 0},
    {"top_k": 1000},
    {"loss_thresh": 1.5, "min_kept": 3},
    {"loss_thresh": 10.0, "min_kept": 2},
    {"neg_pos_ratio": 3.0},
    {"neg_pos_ratio": 0.5, "min_kept": 2},
    # Floors: relative to K, per rank, per example (dim 0: here every instance).
    {"keep": 0.1, "min_kept_fraction": 0.25},
    {"top_k": 1, "min_kept": 2, "min_kept_per": "rank"},
    {"loss_thresh": 10.0, "min_kept": 1, "min_kept_per": "example", "min_kept_fraction": 0.1},
    {"neg_pos_ratio": 0.5, "min_kept_fraction": 0.5},
]


def make_cases(world_size: int, scope: str, strategy: str) -> list[Case]:
    rng = random.Random(f"{world_size}-{scope}-{strategy}")
    cases = []
    for i, rule in enumerate(RULES * 3):
        sizes = [rng.choice([0, 1, 3, 7, 12, 20]) for _ in range(world_size)]
        if i % 3 == 0:
            sizes[-1] = 0  # a rank that holds nothing
        dtype = torch.float64 if i % 4 == 1 else torch.float32
        nan_fraction = 0.1 if i % 5 == 2 else 0.0
        # "static": the read-free path of accelerators, taken on CPU by check="deferred".
        if strategy == "static":
            kwargs = dict(rule, scope=scope, check="deferred", seed=i)
        else:
            kwargs = dict(rule, scope=scope, strategy=strategy, seed=i)
        if nan_fraction:
            kwargs["nan"] = "ignore"
        cases.append(
            Case(seed=1000 + i, sizes=sizes, kwargs=kwargs, dtype=dtype, nan_fraction=nan_fraction)
        )
    return cases


def select_on_rank(cases: list[Case]) -> list[tuple]:
    """Worker: run each case's selector on this rank's slice."""
    rank = get_rank()
    outputs = []
    for case in cases:
        losses, valid, positive = (rank_slice(t, case.sizes, rank) for t in global_losses(case))
        result = HardExampleSelector(**case.kwargs)(losses, valid, positive)
        outputs.append(
            (
                result.mask,
                result.num_selected_global,
                result.selected_per_rank,
                result.num_valid_global,
                result.threshold,
                result.num_nan_global,
            )
        )
    return outputs


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("scope", "strategy"),
    [
        ("global", "gather"),
        ("global", "bracket"),
        ("global", "auto"),
        ("local", "gather"),
        ("random", "gather"),
        ("random", "bracket"),
        ("all", "gather"),
        ("global", "static"),
        ("local", "static"),
        ("random", "static"),
        ("all", "static"),
    ],
)
def test_distributed_mask_equals_single_process(ranks, world_size, scope, strategy):
    cases = make_cases(world_size, scope, strategy)
    per_rank = ranks.run(world_size, select_on_rank, cases)
    for i, case in enumerate(cases):
        losses, valid, positive = global_losses(case)
        expected = reference_mask(case.kwargs, case.sizes, losses, valid, positive)
        got = torch.cat([per_rank[r][i][0] for r in range(world_size)])
        where = f"case {i}: {case}"
        assert torch.equal(got, expected), where
        expected_per_rank = tuple(int(m.sum()) for m in expected.split(case.sizes))
        nan = torch.isnan(losses)
        for r in range(world_size):
            _, num_selected, per_rank_counts, num_valid, threshold, num_nan = per_rank[r][i]
            assert num_selected == int(expected.sum()), where
            assert per_rank_counts == expected_per_rank, where
            assert num_valid == int((valid & ~nan).sum()), where
            assert num_nan == int((valid & nan).sum()), where
            if scope == "global" and "neg_pos_ratio" not in case.kwargs:
                expected_threshold = losses[expected].min().item() if expected.any() else math.nan
                assert threshold == expected_threshold or (
                    math.isnan(threshold) and math.isnan(expected_threshold)
                ), where


def strategies_agree_on_rank(seed: int, sizes: list[int], top_k: int) -> bool:
    """Worker: every strategy gives the same mask on large, tie-heavy float32 input."""
    rank = get_rank()
    gen = torch.Generator().manual_seed(seed)
    losses = torch.randn(sum(sizes), generator=gen).abs().round(decimals=2)
    local = rank_slice(losses, sizes, rank)
    masks = [
        HardExampleSelector(top_k=top_k, strategy=strategy)(local).mask
        for strategy in ("gather", "bracket", "auto")
    ]
    return all(torch.equal(masks[0], mask) for mask in masks[1:])


@pytest.mark.parametrize("world_size", [2, 4])
def test_gather_and_bracket_masks_are_bit_identical(ranks, world_size):
    sizes = [5000 + 997 * r for r in range(world_size)]
    for top_k in (1, 333, 4000, sum(sizes) - 1):
        assert all(ranks.run(world_size, strategies_agree_on_rank, 7, sizes, top_k))


def random_scope_calls_on_rank(sizes: list[int], calls: int) -> list[torch.Tensor]:
    rank = get_rank()
    selector = HardExampleSelector(keep=0.25, scope="random", seed=5)
    losses = torch.ones(sizes[rank])
    return [selector(losses).mask for _ in range(calls)]


def test_random_scope_is_same_draw_as_single_process_and_changes_per_call(ranks):
    sizes = [10, 3, 17]
    per_rank = ranks.run(3, random_scope_calls_on_rank, sizes, 3)
    single = HardExampleSelector(keep=0.25, scope="random", seed=5)
    draws = [single(torch.ones(sum(sizes))).mask for _ in range(3)]
    for call in range(3):
        assert torch.equal(torch.cat([per_rank[r][call] for r in range(3)]), draws[call])
    assert not torch.equal(draws[0], draws[1])


# -- gather vs bracket vs the device path: property test over every rule -----------------------

#: Examples per world size: a twelfth of the profile's (25 under "ci", more under "heavy").
STRATEGY_EXAMPLES = max(25, settings.default.max_examples // 12)
SPECIAL = [0.0, -0.0, 1.0, 2.5, math.inf, -math.inf, 1e-30, -1e-30, 3.0e38]
STRATEGY_NAMES = ("gather", "bracket")


@st.composite
def distributed_batches(draw, world_size: int):
    """Global losses / valid / positive over uneven (possibly empty) ranks, and sizes."""
    sizes = draw(st.lists(st.integers(0, 30), min_size=world_size, max_size=world_size))
    n = sum(sizes)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["random", "tied", "duplicated"]))
    if kind == "random":
        width = 32 if dtype == torch.float32 else 64
        pool = st.floats(allow_nan=False, width=width) | st.sampled_from(SPECIAL)
    elif kind == "tied":
        pool = st.sampled_from(SPECIAL)
    else:  # two values over the whole batch: every boundary is a tie across ranks
        pool = st.sampled_from(draw(st.lists(st.sampled_from(SPECIAL), min_size=2, max_size=2)))
    losses = torch.tensor(draw(st.lists(pool, min_size=n, max_size=n)), dtype=dtype)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    if draw(st.booleans()):
        valid[:] = True
    positive = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    return sizes, losses, valid, positive


def both_strategies_on_rank(sizes, losses, valid, positive, kwargs) -> list[tuple]:
    """Worker: this rank's result fields under each strategy (``STRATEGY_NAMES``)."""
    rank = get_rank()
    local = [rank_slice(t, sizes, rank) for t in (losses, valid, positive)]
    outputs = []
    for strategy in STRATEGY_NAMES:
        result = HardExampleSelector(**kwargs, strategy=strategy)(*local)
        outputs.append(
            (
                result.mask,
                result.num_selected_global,
                result.selected_per_rank,
                result.threshold,
                result.strategy,
            )
        )
    return outputs


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_strategies_are_bit_identical_for_every_rule(ranks, world_size):
    @settings(max_examples=STRATEGY_EXAMPLES, deadline=None)
    @given(
        batch=distributed_batches(world_size),
        rule=rules(),
        scope=st.sampled_from(["global", "global", "random"]),
    )
    def check(batch, rule, scope):
        sizes, losses, valid, positive = batch
        rule_obj, kind, _, floor = rule
        kwargs = {kind: getattr(rule_obj, kind), **floor_kwargs(floor), "scope": scope}
        args = (sizes, losses, valid, positive, kwargs)
        per_rank = ranks.run(world_size, both_strategies_on_rank, *args, timeout=30)
        expected = reference_mask(kwargs, sizes, losses, valid, positive)
        for i in range(len(STRATEGY_NAMES)):
            mask = torch.cat([per_rank[r][i][0] for r in range(world_size)])
            assert torch.equal(mask, expected), STRATEGY_NAMES[i]
        for outputs in per_rank:
            (_, *gather_fields, _) = outputs[0]
            for strategy, (_, *fields, used) in zip(STRATEGY_NAMES, outputs, strict=True):
                assert used == strategy
                assert fields[:2] == gather_fields[:2], strategy
                assert fields[2] == gather_fields[2] or (
                    math.isnan(fields[2]) and math.isnan(gather_fields[2])
                ), strategy

    check()


def collectives_on_rank(losses: torch.Tensor, kwargs: dict, positive=None) -> tuple:
    """Worker: (all-reduce calls, all-gather calls, mask) of a steady-state selection."""
    gather_name = next(
        name for name in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)
    )
    selector = HardExampleSelector(**kwargs)
    selector(losses, positive=positive)  # the first call agrees the config: eager
    with (
        mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce,
        mock.patch.object(dist, gather_name, wraps=getattr(dist, gather_name)) as all_gather,
    ):
        result = selector(losses, positive=positive)
    return all_reduce.call_count, all_gather.call_count, result.mask


def test_collectives_per_rule(ranks):
    """The device path: rows, 3 rounds (32-bit keys), ties, whatever the rule. The host
    path with gather: the row, its keys riding along; none more when the counts decide
    (a threshold with >= min_kept losses above it)."""
    losses = torch.arange(100.0)
    positive = losses < 10
    rules = [
        {"loss_thresh": 49.5, "min_kept": 20},  # 2 x 50 above t >= 20
        {"loss_thresh": 94.5, "min_kept": 20},  # 2 x 5 above t < 20: k-select
        {"neg_pos_ratio": 3.0},  # P = 20 from the row exchange; 60 of 180 negatives
        {"top_k": 7},
    ]
    for rule in rules:
        for check, expected in (("deferred", (3, 2)), ("eager", (0, 1))):
            kwargs = {**rule, "check": check}
            per_rank = ranks.run(2, collectives_on_rank, losses, kwargs, positive, timeout=30)
            reference = select_mask(
                torch.cat([losses, losses]), SelectionRule(**rule), positive=positive.repeat(2)
            )
            assert torch.equal(torch.cat([per_rank[0][2], per_rank[1][2]]), reference), kwargs
            assert [out[:2] for out in per_rank] == [expected] * 2, kwargs


def auto_strategy_on_rank(sizes: list[int]) -> str:
    """Worker: the strategy that ``"auto"`` resolved to for this rank's ``sizes[rank]`` losses."""
    rank = get_rank()
    return HardExampleSelector(top_k=3, strategy="auto")(torch.rand(sizes[rank])).strategy


def test_auto_picks_bracket_by_the_largest_rank(ranks):
    for largest, expected in (
        (AUTO_BRACKET_MIN_KEYS, "gather"),
        (AUTO_BRACKET_MIN_KEYS + 1, "bracket"),
    ):
        assert ranks.run(2, auto_strategy_on_rank, [5, largest], timeout=30) == [expected] * 2
