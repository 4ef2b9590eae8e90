"""Property tests of the pure selection code against an independent brute force."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ohem import HardExampleSelector
from dist_ohem.selection import (
    SelectionRule,
    exact_ceil,
    exact_floor,
    hardness_key,
    hardness_order,
    key_to_loss,
    random_keys,
    select_mask,
    top_m_mask,
)

INF = math.inf
# Few distinct values so that ties are the rule, not the exception.
TIE_HEAVY = [0.0, -0.0, 0.25, 1.0, 1.0, 2.5, INF, -1.0, 1e-30, 3.0]


def brute_force(losses, valid, positive, rule_kind, param, floor):
    """Selected indices by docs/DESIGN.md §3, written independently of dist_ohem.

    ``param`` is a Fraction for keep / neg_pos_ratio (exact arithmetic), an int for
    top_k, a float for loss_thresh. ``floor``: ``min_kept``, ``min_kept_per`` ("batch"
    or "example": times the examples, here every instance) and ``min_kept_fraction``
    (a Fraction of the valid count, rounded down).
    """
    usable = [i for i, x in enumerate(losses) if valid[i] and not math.isnan(x)]

    def hardest(indices, m):
        return sorted(indices, key=lambda i: (-losses[i], i))[:m]

    k = len(usable)
    unit = len(losses) if floor["min_kept_per"] == "example" else 1
    min_kept = max(floor["min_kept"] * unit, math.floor(floor["min_kept_fraction"] * k))
    if rule_kind == "keep":
        m = min(k, max(min_kept, math.ceil(param * k)))
        return set(hardest(usable, m))
    if rule_kind == "top_k":
        return set(hardest(usable, min(k, max(min_kept, param))))
    if rule_kind == "loss_thresh":
        above = [i for i in usable if losses[i] > param]
        return set(hardest(usable, max(len(above), min(k, min_kept))))
    positives = [i for i in usable if positive[i]]
    negatives = [i for i in usable if not positive[i]]
    if positives:
        m = min(len(negatives), math.floor(param * len(positives)))
    else:
        m = min(len(negatives), min_kept)
    return set(positives) | set(hardest(negatives, m))


@st.composite
def batches(draw, max_size=60):
    n = draw(st.integers(0, max_size))
    pool = (
        st.sampled_from(TIE_HEAVY)
        if draw(st.booleans())
        else st.floats(-1e6, 1e6, allow_nan=False, width=32)
    )
    values = draw(st.lists(pool, min_size=n, max_size=n))
    valid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if draw(st.booleans()):
        valid = [True] * n
    positive = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return (
        torch.tensor(values, dtype=dtype),
        torch.tensor(valid, dtype=torch.bool),
        torch.tensor(positive, dtype=torch.bool),
    )


@st.composite
def rules(draw):
    kind = draw(st.sampled_from(["keep", "top_k", "loss_thresh", "neg_pos_ratio"]))
    min_kept = draw(st.integers(0, 8))
    if kind in ("keep", "neg_pos_ratio"):
        denominator = draw(st.integers(1, 20))
        low = 1 if kind == "keep" else 0
        high = denominator if kind == "keep" else 4 * denominator
        param = Fraction(draw(st.integers(low, high)), denominator)
        value = float(param)
    elif kind == "top_k":
        param = value = draw(st.integers(0, 70))
    else:
        param = value = draw(st.sampled_from([*TIE_HEAVY, -INF, 0.7]))
    floor = {
        "min_kept": min_kept,
        "min_kept_per": draw(st.sampled_from(["batch", "batch", "example"])),
        "min_kept_fraction": draw(st.sampled_from([Fraction(0), Fraction(1, 16), Fraction(1, 3)])),
    }
    rule = SelectionRule(**{kind: value}, **floor_kwargs(floor))
    return rule, kind, param, floor


def floor_kwargs(floor: dict) -> dict:
    """The floor of :func:`rules` as selector keywords (the fraction as a float)."""
    return {**floor, "min_kept_fraction": float(floor["min_kept_fraction"])}


@given(batch=batches(), rule=rules())
def test_select_mask_matches_brute_force(batch, rule):
    losses, valid, positive = batch
    rule_obj, kind, param, floor = rule
    mask = select_mask(losses, rule_obj, valid, positive)
    expected = brute_force(losses.tolist(), valid.tolist(), positive.tolist(), kind, param, floor)
    assert set(mask.nonzero().squeeze(1).tolist()) == expected


@given(batch=batches(), rule=rules())
def test_single_process_selector_matches_brute_force_for_both_strategies(batch, rule):
    losses, valid, positive = batch
    rule_obj, kind, param, floor = rule
    expected = brute_force(losses.tolist(), valid.tolist(), positive.tolist(), kind, param, floor)
    for strategy in ("gather", "bracket"):
        selector = HardExampleSelector(
            **{kind: rule_obj.__getattribute__(kind)}, **floor_kwargs(floor), strategy=strategy
        )
        result = selector(losses, valid, positive)
        assert set(result.mask.nonzero().squeeze(1).tolist()) == expected
        assert result.num_selected_global == result.num_selected_local == len(expected)
        assert result.num_valid_global == int(valid.sum())


@given(batch=batches(), m=st.integers(0, 70))
def test_top_m_mask_takes_hardest_and_breaks_ties_by_index(batch, m):
    losses, valid, _ = batch
    mask = top_m_mask(hardness_key(losses), valid, m)
    values = losses.tolist()
    candidates = [i for i in range(len(values)) if valid[i]]
    expected = sorted(candidates, key=lambda i: (-values[i], i))[:m]
    assert mask.nonzero().squeeze(1).tolist() == sorted(expected)


@given(batch=batches())
def test_hardness_order_is_sort_by_loss_then_index(batch):
    losses, valid, _ = batch
    values = losses.tolist()
    expected = sorted((i for i in range(len(values)) if valid[i]), key=lambda i: (-values[i], i))
    assert hardness_order(losses, valid).tolist() == expected


@given(
    st.lists(st.floats(allow_nan=False, width=32), min_size=2, max_size=40),
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_hardness_key_preserves_order_and_round_trips(values, dtype):
    losses = torch.tensor(values, dtype=torch.float32).to(dtype)
    keys = hardness_key(losses)
    widened = losses.double().tolist()
    for i in range(len(values) - 1):
        assert (keys[i] < keys[i + 1]) == (widened[i] < widened[i + 1])
        assert (keys[i] == keys[i + 1]) == (widened[i] == widened[i + 1])
        assert key_to_loss(int(keys[i]), dtype) == widened[i]


def test_edge_cases_all_invalid_empty_all_equal_inf():
    rule = SelectionRule(keep=0.5, min_kept=3)
    assert not select_mask(torch.zeros(0), rule).any()
    assert not select_mask(torch.ones(5), rule, valid=torch.zeros(5, dtype=torch.bool)).any()
    # All equal: ties go to the lowest indices.
    assert select_mask(torch.ones(6), rule).tolist() == [True] * 3 + [False] * 3
    # +inf is the hardest, never an error.
    losses = torch.tensor([1.0, INF, 2.0, INF])
    assert select_mask(losses, SelectionRule(top_k=2)).tolist() == [False, True, False, True]
    # M = K.
    assert select_mask(losses, SelectionRule(keep=1.0)).all()
    assert select_mask(losses, SelectionRule(top_k=100)).all()


def test_exact_ceil_and_floor():
    assert exact_ceil(0.1 * 30) == 3
    assert exact_ceil(3.2) == 4
    assert exact_floor(0.7 * 10) == 7  # 7.000000000000001
    assert exact_floor(2.9999999999) == 3
    assert exact_floor(2.5) == 2
    assert exact_ceil(0.1 * 10**8) == 10**7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep": 0.0},
        {"keep": 1.5},
        {"keep": -0.1},
        {"top_k": -1},
        {"top_k": 2.5},
        {"keep": 0.5, "min_kept": -1},
        {"keep": 0.5, "top_k": 3},
        {},
        {"neg_pos_ratio": -1.0},
        {"loss_thresh": math.nan},
    ],
)
def test_bad_rules_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        HardExampleSelector(**kwargs)


def test_bad_scope_strategy_nan_raise_at_construction():
    for kwargs in ({"scope": "world"}, {"strategy": "fast"}, {"nan": "skip"}):
        with pytest.raises(ValueError, match="must be one of"):
            HardExampleSelector(keep=0.5, **kwargs)


def test_random_keys_are_uniform_and_deterministic():
    index = torch.arange(40)
    assert torch.equal(random_keys(index, 3, 1), random_keys(index, 3, 1))
    assert not torch.equal(random_keys(index, 3, 1), random_keys(index, 3, 2))
    assert not torch.equal(random_keys(index, 3, 1), random_keys(index, 4, 1))
    # Each index is picked about m/n of the time over many draws.
    draws, n, m = 2000, 40, 10
    hits = torch.zeros(n)
    for stream in range(draws):
        hits += top_m_mask(random_keys(index, 0, stream), torch.ones(n, dtype=torch.bool), m)
    expected = draws * m / n
    assert ((hits - expected).abs() < 5 * math.sqrt(expected)).all(), hits


def test_threshold_compares_exact_values_not_the_threshold_rounded_to_float32():
    losses = torch.tensor([1e-30, 0.0], dtype=torch.float32)  # float32(1e-30) > 1e-30
    assert select_mask(losses, SelectionRule(loss_thresh=1e-30)).tolist() == [True, False]
    result = HardExampleSelector(loss_thresh=1e-30)(losses)
    assert result.mask.tolist() == [True, False]


@settings(max_examples=300, deadline=None)
@given(
    factor=st.floats(0.0, 1.0, exclude_min=True) | st.sampled_from([0.1, 0.3, 1 / 3, 0.7]),
    count=st.integers(0, 2**40),
)
def test_exact_ceil_and_floor_on_the_device_equal_the_host(factor, count):
    """M is computed on the device by the same IEEE operations: the same integers."""
    product = factor * count
    on_device = torch.tensor(count).double() * factor
    assert int(exact_ceil(on_device)) == exact_ceil(product)
    assert int(exact_floor(on_device)) == exact_floor(product)
