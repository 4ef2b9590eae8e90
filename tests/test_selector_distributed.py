"""The distributed mask equals the single-process selection on the concatenated batch."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dist_ohem import HardExampleSelector
from dist_ohem.comm import get_rank
from tests.parity import Case, global_losses, rank_slice, reference_mask

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
        ("global", "radix"),
        ("global", "auto"),
        ("local", "gather"),
        ("random", "gather"),
        ("random", "radix"),
        ("all", "gather"),
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
    """Worker: gather and radix give bit-identical masks on large, tie-heavy float32 input."""
    rank = get_rank()
    gen = torch.Generator().manual_seed(seed)
    losses = torch.randn(sum(sizes), generator=gen).abs().round(decimals=2)
    local = rank_slice(losses, sizes, rank)
    masks = [
        HardExampleSelector(top_k=top_k, strategy=strategy)(local).mask
        for strategy in ("gather", "radix")
    ]
    return torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("world_size", [2, 4])
def test_gather_and_radix_masks_are_bit_identical(ranks, world_size):
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
