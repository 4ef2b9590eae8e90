"""The device path (accelerators; ``check="deferred"`` on CPU) against the host path.

The two paths share the exchange and the checks but select differently: the host path
reads the rows and runs gather or bracket, the device path reads nothing and, with one
rank, sends no row at all. Every field of the result must agree, for every rule, dtype,
tie pattern, NaN and ±inf; and what deferred checking holds back must still raise, at
the next call or at ``check()``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dist_ohem import DistributedInputError, HardExampleSelector
from dist_ohem.comm import get_rank
from dist_ohem.selection import SelectionRule, select_mask
from tests.parity import rank_slice
from tests.test_selection import TIE_HEAVY, rules

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def fields(result) -> tuple:
    threshold = result.threshold
    return (
        result.mask.tolist(),
        result.num_valid_global,
        result.num_selected_global,
        result.num_selected_local,
        result.selected_per_rank,
        result.num_nan_global,
        result.num_instances_global,
        "nan" if math.isnan(threshold) else threshold,
    )


@st.composite
def losses_with_nan(draw, max_size=50):
    n = draw(st.integers(0, max_size))
    pool = st.sampled_from([*TIE_HEAVY, math.nan]) | st.floats(-1e4, 1e4, width=16)
    dtype = draw(st.sampled_from(DTYPES))
    losses = torch.tensor(draw(st.lists(pool, min_size=n, max_size=n))).to(dtype)
    valid = None
    if draw(st.booleans()):
        valid = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    positive = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    return losses.reshape(draw(st.sampled_from([(n,), (1, n)]))), valid, positive


@given(batch=losses_with_nan(), rule=rules(), scope=st.sampled_from(["global", "local", "all"]))
def test_one_rank_device_path_gives_the_host_paths_result(batch, rule, scope):
    losses, valid, positive = batch
    rule_obj = rule[0]
    kwargs = {name: value for name, value in vars(rule_obj).items() if value is not None}
    if valid is not None:
        valid = valid.reshape(losses.shape)
    positive = positive.reshape(losses.shape) if rule_obj.needs_positive else None
    results = []
    for check in ("eager", "deferred"):
        selector = HardExampleSelector(**kwargs, scope=scope, nan="ignore", check=check)
        for _ in range(3):  # the first call is eager on both paths; then the steady state
            result = selector(losses, valid, positive)
        results.append(fields(result))
    assert results[0] == results[1]
    if scope != "all":
        expected = select_mask(losses.float(), rule_obj, valid, positive)
        assert torch.equal(torch.tensor(results[1][0]).reshape(losses.shape), expected)


def test_one_rank_deferred_nan_raises_at_the_next_call_and_at_check():
    selector = HardExampleSelector(keep=0.5, check="deferred")
    selector(torch.rand(8))
    bad = torch.tensor([3.0, math.nan, 1.0, 2.0])
    result = selector(bad)  # completes; the NaN instance is not selected
    assert result.mask.tolist() == [True, False, False, True]
    with pytest.raises(DistributedInputError, match="1 NaN loss"):
        selector(torch.rand(8))
    selector(bad)
    with pytest.raises(DistributedInputError, match="1 NaN loss"):
        selector.check()
    selector.check()  # nothing left


def test_one_rank_deferred_bad_input_and_fail_raise_at_the_next_call():
    selector = HardExampleSelector(top_k=2, check="deferred")
    selector(torch.rand(6))
    result = selector(torch.rand(6), valid=torch.ones(5, dtype=torch.bool))
    assert not result.mask.any() and result.mask.shape == (6,)
    with pytest.raises(DistributedInputError, match="`valid` has shape"):
        selector(torch.rand(6))
    selector.fail("the criterion raised", torch.rand(6))
    with pytest.raises(DistributedInputError, match="the criterion raised"):
        selector.check()


def strategy_on_rank(sizes: list[int], losses: torch.Tensor) -> torch.Tensor:
    """Worker: ranks that differ only in ``strategy`` (no effect on the device path)."""
    rank = get_rank()
    selector = HardExampleSelector(keep=0.3, strategy=("gather", "bracket")[rank], check="deferred")
    local = rank_slice(losses, sizes, rank)
    masks = [selector(local).mask for _ in range(3)]
    selector.check()
    return masks[-1]


def test_device_path_does_not_compare_the_host_strategy(ranks):
    sizes = [7, 12]
    losses = torch.tensor([1.0, 2.0, 2.0, 0.5] * 5)[: sum(sizes)]
    masks = ranks.run(2, strategy_on_rank, sizes, losses, timeout=30)
    assert torch.equal(torch.cat(masks), select_mask(losses, SelectionRule(keep=0.3)))


def test_radix_is_gone_with_a_pointer_to_bracket():
    with pytest.raises(ValueError, match="'bracket'"):
        HardExampleSelector(keep=0.5, strategy="radix")
