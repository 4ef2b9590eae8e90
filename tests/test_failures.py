"""docs/DESIGN.md §7: bad input on one rank makes every rank raise the same error, never hang."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import DistributedInputError, HardExampleSelector, OHEMLoss, ohem_step
from dist_ohem.comm import get_rank, get_world_size


def error_on_every_rank(make_call, *args) -> str:
    """Worker: run ``make_call(rank, world_size, *args)``; return the error message it raised."""
    try:
        make_call(get_rank(), get_world_size(), *args)
    except DistributedInputError as exc:
        return str(exc)
    return "no error"


def nan_on_rank_1(rank, world_size):
    losses = torch.rand(6)
    if rank == 1:
        losses[[1, 4]] = math.nan
    HardExampleSelector(keep=0.5)(losses)


def wrong_valid_shape_on_last_rank(rank, world_size):
    losses = torch.rand(5)
    valid = torch.ones(4 if rank == world_size - 1 else 5, dtype=torch.bool)
    HardExampleSelector(top_k=2)(losses, valid)


def config_differs_on_rank_1(rank, world_size):
    HardExampleSelector(keep=0.25 if rank == 1 else 0.5)(torch.rand(4))


def balance_differs_on_rank_1(rank, world_size):
    """Without the check, rank 1 alone would enter the balancing all-to-all: a hang."""
    model = DDP(nn.Linear(3, 2))  # held until backward: see tests/test_step_ddp.py
    inputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    selector = HardExampleSelector(keep=0.5)
    ohem_step(model, inputs, targets, nn.CrossEntropyLoss(), selector, balance=rank == 1)


def reduction_differs_on_rank_2(rank, world_size):
    criterion = OHEMLoss(nn.CrossEntropyLoss(), keep=0.5, reduction="sum" if rank == 2 else "mean")
    criterion(torch.randn(3, 3), torch.tensor([0, 1, 2]))


def missing_positive_on_rank_0(rank, world_size):
    losses = torch.rand(4)
    positive = None if rank == 0 else losses > 0.5
    HardExampleSelector(neg_pos_ratio=3)(losses, positive=positive)


def dtype_differs_on_rank_1(rank, world_size):
    HardExampleSelector(keep=0.5)(
        torch.rand(4, dtype=torch.float64 if rank == 1 else torch.float32)
    )


def calls_out_of_step(rank, world_size):
    selector = HardExampleSelector(keep=0.5)
    selector.num_calls = rank  # as if rank r had called it r times more
    selector(torch.rand(4))


def criterion_fails_on_rank_1(rank, world_size):
    targets = torch.tensor([0, 1, 2])
    if rank == 1:
        targets[0] = 7  # out of range for 3 classes
    OHEMLoss(nn.CrossEntropyLoss(), keep=0.5)(torch.randn(3, 3), targets)


@pytest.mark.parametrize(
    ("world_size", "make_call", "expected"),
    [
        (3, nan_on_rank_1, ["rank 1: 2 NaN loss", "nan='ignore'"]),
        (2, nan_on_rank_1, ["rank 1: 2 NaN loss"]),
        (3, wrong_valid_shape_on_last_rank, ["rank 2: `valid` has shape (4,)", "(5,)"]),
        (4, config_differs_on_rank_1, ["selector configuration differs", "rank(s) [1]"]),
        (2, balance_differs_on_rank_1, ["selector configuration differs", "balance"]),
        (3, reduction_differs_on_rank_2, ["selector configuration differs", "rank(s) [2]"]),
        (2, missing_positive_on_rank_0, ["rank 0: neg_pos_ratio needs `positive=`"]),
        (3, dtype_differs_on_rank_1, ["loss dtype", "rank(s) [1]"]),
        (3, calls_out_of_step, ["number of selector calls", "rank(s) [1, 2]"]),
        (2, criterion_fails_on_rank_1, ["rank 1: the criterion raised IndexError"]),
    ],
)
def test_bad_input_on_one_rank_raises_same_error_everywhere(ranks, world_size, make_call, expected):
    messages = ranks.run(world_size, error_on_every_rank, make_call, timeout=30)
    assert len(set(messages)) == 1, messages
    for fragment in expected:
        assert fragment in messages[0], messages[0]


def test_nan_raise_single_process_and_nan_ignore_counts():
    losses = torch.tensor([1.0, math.nan, 3.0, math.inf, math.nan])
    with pytest.raises(ValueError, match="2 NaN loss"):
        HardExampleSelector(keep=0.5)(losses)
    result = HardExampleSelector(keep=0.5, nan="ignore")(losses)
    assert result.num_nan_global == 2
    assert result.num_valid_global == 3
    assert result.mask.tolist() == [False, False, True, True, False]
    assert result.threshold == 3.0


def test_shape_and_type_errors_single_process():
    selector = HardExampleSelector(keep=0.5)
    with pytest.raises(ValueError, match="`positive` has shape"):
        selector(torch.rand(3), positive=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating-point"):
        selector(torch.arange(3))
