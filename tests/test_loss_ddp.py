"""docs/DESIGN.md §4 invariant: DDP gradients after OHEMLoss equal the single-process reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import OHEMLoss
from dist_ohem.comm import get_rank
from tests.parity import (
    IGNORE,
    NUM_CLASSES,
    classification_batch,
    make_mlp,
    rank_slice,
    reference_mask,
)

TOLERANCE = 1e-6


def make_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, NUM_CLASSES, 1))


def segmentation_batch(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 3, 5, 6, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (n, 5, 6), generator=gen)
    targets[torch.rand(n, 5, 6, generator=gen) < 0.2] = 255
    return inputs, targets


def batch_for(task: str, seed: int, n: int):
    if task == "dense":
        return segmentation_batch(seed, n)
    return classification_batch(seed, n, 0.2 if task == "ignore" else 0.0)


def criterion_for(task: str) -> nn.Module:
    return nn.CrossEntropyLoss(ignore_index=255) if task == "dense" else nn.CrossEntropyLoss()


def ddp_grads_on_rank(task: str, seed: int, sizes: list[int], kwargs: dict):
    """Worker: one DDP step with OHEMLoss on this rank's slice; returns grads and result."""
    rank = get_rank()
    model = make_conv() if task == "dense" else make_mlp()
    ddp = DDP(model)
    inputs, targets = (rank_slice(t, sizes, rank) for t in batch_for(task, seed, sum(sizes)))
    ohem = OHEMLoss(criterion_for(task), **kwargs)
    loss = ohem(ddp(inputs), targets, positive=targets > 0)
    loss.backward()
    return (
        [p.grad.clone() for p in model.parameters()],
        ohem.last.num_selected_local,
        ohem.last_mean_loss,
    )


def reference_grads(task: str, seed: int, sizes: list[int], kwargs: dict):
    """One process, concatenated batch: grad of the mean loss over the reference selection."""
    model = make_conv() if task == "dense" else make_mlp()
    inputs, targets = batch_for(task, seed, sum(sizes))
    ignore = 255 if task == "dense" else IGNORE
    losses = nn.functional.cross_entropy(
        model(inputs), targets, ignore_index=ignore, reduction="none"
    )
    valid, positive = targets != ignore, targets > 0
    mask = reference_mask(kwargs, sizes, losses.detach(), valid, positive)
    divisor = {
        "selected": int(mask.sum()),
        "valid": int(valid.sum()),
        "instances": valid.numel(),
        "positives": int((valid & positive).sum()),
    }[kwargs.get("normalizer", "selected")]
    (losses[mask].sum() / max(divisor, 1)).backward()
    mean = losses[mask].sum() / max(int(mask.sum()), 1)  # what last_mean_loss reports
    return [p.grad for p in model.parameters()], mask, float(mean.detach())


def assert_parity(ranks, world_size: int, task: str, sizes: list[int], kwargs: dict, seed=3):
    outputs = ranks.run(world_size, ddp_grads_on_rank, task, seed, sizes, kwargs)
    expected, mask, mean = reference_grads(task, seed, sizes, kwargs)
    for rank, (grads, num_local, last_mean_loss) in enumerate(outputs):
        assert num_local == int(rank_slice(mask, sizes, rank).sum())
        # The logged global mean: the same on every rank, 0.0 when nothing is selected.
        assert math.isclose(last_mean_loss, mean, rel_tol=1e-6, abs_tol=1e-7), rank
        for got, want in zip(grads, expected, strict=True):
            diff = (got - want).abs().max().item()
            assert diff <= TOLERANCE, f"rank {rank}: max |grad diff| {diff:.2e} for {kwargs}"


SIZES = {1: [13], 2: [9, 4], 3: [6, 0, 11], 4: [3, 8, 1, 5]}
RULES = [
    {"keep": 0.3},
    {"top_k": 5},
    {"loss_thresh": 1.4, "min_kept": 3},
    {"neg_pos_ratio": 1.0},
    {"keep": 0.5, "strategy": "bracket"},
]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(map(str, r.items())))
def test_ddp_gradients_equal_reference_for_each_rule(ranks, world_size, rule):
    assert_parity(ranks, world_size, "plain", SIZES[world_size], rule)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("rule", [{"keep": 0.4}, {"top_k": 6, "min_kept": 2}])
def test_ddp_gradients_with_ignore_index(ranks, world_size, rule):
    assert_parity(ranks, world_size, "ignore", SIZES[world_size], rule)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep": 0.3, "scope": "local"},
        {"keep": 0.3, "scope": "random", "seed": 11},
        {"scope": "all"},
        {"neg_pos_ratio": 2.0, "scope": "local"},
    ],
)
def test_ddp_gradients_for_other_scopes(ranks, world_size, kwargs):
    assert_parity(ranks, world_size, "ignore", SIZES[world_size], kwargs)


@pytest.mark.parametrize("world_size", [2, 4])
def test_dense_per_pixel_ohem_with_ignore_index(ranks, world_size):
    sizes = [2] * (world_size - 1) + [1]
    for kwargs in (
        {"keep": 0.25, "min_kept": 10},
        {"keep": 0.25, "strategy": "bracket"},
        # mmseg / PaddleSeg style: every pixel with loss > t, at least min_kept of them;
        # first with enough pixels above t (the counts decide), then with too few (k-select).
        {"loss_thresh": 1.5, "min_kept": 10, "strategy": "bracket"},
        {"loss_thresh": 1.8, "min_kept": 40, "strategy": "bracket"},
    ):
        assert_parity(ranks, world_size, "dense", sizes, kwargs)


def test_ranks_with_nothing_selected_or_no_data_finish(ranks):
    # top_k=1 over 4 ranks: three ranks select nothing; one rank holds no data at all.
    assert_parity(ranks, 4, "plain", [5, 0, 7, 2], {"top_k": 1})
    assert_parity(ranks, 4, "plain", [5, 0, 7, 2], {"top_k": 0})


def test_loss_value_and_sum_reduction_single_process():
    torch.manual_seed(0)
    logits = torch.randn(10, NUM_CLASSES, requires_grad=True)
    targets = torch.randint(0, NUM_CLASSES, (10,))
    per = nn.functional.cross_entropy(logits, targets, reduction="none")
    top = per.detach().topk(3).values
    mean_loss = OHEMLoss(nn.CrossEntropyLoss(), top_k=3)(logits, targets)
    sum_loss = OHEMLoss(nn.CrossEntropyLoss(), top_k=3, reduction="sum")(logits, targets)
    torch.testing.assert_close(mean_loss.detach(), top.mean())
    torch.testing.assert_close(sum_loss.detach(), top.sum())


def test_user_criterion_is_not_modified_and_callables_work():
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    ohem = OHEMLoss(criterion, keep=0.5)
    logits, targets = torch.randn(6, 3), torch.randint(0, 3, (6,))
    ohem(logits, targets)
    assert criterion.reduction == "mean"
    assert "_per_instance" not in dict(ohem.named_modules())

    def per_sample_l1(prediction, target):
        return (prediction - target).abs().sum(dim=1)

    loss = OHEMLoss(per_sample_l1, top_k=2)(torch.zeros(5, 2), torch.arange(10.0).view(5, 2))
    assert loss.item() == pytest.approx((17 + 13) / 2)


def test_selector_and_kwargs_are_exclusive():
    from dist_ohem import HardExampleSelector

    with pytest.raises(ValueError, match="either selector"):
        OHEMLoss(nn.MSELoss(), selector=HardExampleSelector(keep=0.5), keep=0.5)
    with pytest.raises(ValueError, match="reduction"):
        OHEMLoss(nn.MSELoss(), reduction="none", keep=0.5)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("normalizer", ["valid", "instances", "positives"])
def test_each_normalizer_on_both_paths(ranks, world_size, normalizer):
    """mmseg divides by N·H·W or the non-ignored count, SSD by the positives: the same
    global counts on the host and the device path; a rank with no pixel included."""
    sizes = [2] * (world_size - 1) + [1 if world_size == 1 else 0]
    for check in ("eager", "deferred"):
        kwargs = {"loss_thresh": 1.5, "min_kept": 10, "normalizer": normalizer, "check": check}
        assert_parity(ranks, world_size, "dense", sizes, kwargs)
