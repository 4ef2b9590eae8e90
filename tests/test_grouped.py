"""Selection within groups (``per_group=True``) and the positive quota, against brute force.

Groups never span ranks, so at W > 1 each rank's groups are selected alone; the
normalization is still global. References are written from docs/DESIGN.md §3 and the
quota's definition (mmdetection's ``OHEMSampler``), not from the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import DistributedInputError, HardExampleSelector, OHEMLoss
from dist_ohem.comm import get_rank
from tests.parity import rank_slice
from tests.test_selection import TIE_HEAVY

TOLERANCE = 1e-6


def hardest(losses, indices, m):
    return sorted(indices, key=lambda i: (-losses[i], i))[: max(m, 0)]


def brute_force_groups(losses, valid, positive, groups, rule, floor_fraction, quota):
    """Selected indices: the rule within each group; with a quota, positives then
    negatives (floor(f * B) positives at most; the rest of B, capped by ub * max(1, kept))."""
    kind, param, min_kept = rule
    chosen = set()
    for g in sorted(set(groups)):
        members = [i for i in range(len(losses)) if groups[i] == g]
        usable = [i for i in members if valid[i] and not math.isnan(losses[i])]
        k = len(usable)
        floor = max(min_kept, math.floor(floor_fraction * k))
        if quota is not None:
            fraction, upper = quota
            budget = (
                max(floor, param) if kind == "top_k" else min(k, max(floor, math.ceil(param * k)))
            )
            pos = [i for i in usable if positive[i]]
            neg = [i for i in usable if not positive[i]]
            kept_pos = min(len(pos), math.floor(fraction * budget))
            wanted = budget - kept_pos
            if upper >= 0:
                wanted = min(wanted, math.floor(upper * max(1, kept_pos)))
            chosen |= set(hardest(losses, pos, kept_pos)) | set(hardest(losses, neg, wanted))
        elif kind == "keep":
            chosen |= set(hardest(losses, usable, min(k, max(floor, math.ceil(param * k)))))
        elif kind == "top_k":
            chosen |= set(hardest(losses, usable, min(k, max(floor, param))))
        else:  # loss_thresh
            above = [i for i in usable if losses[i] > param]
            chosen |= set(hardest(losses, usable, max(len(above), min(k, floor))))
    return chosen


@st.composite
def grouped_cases(draw):
    n = draw(st.integers(0, 40))
    pool = st.sampled_from([*TIE_HEAVY, math.nan]) | st.floats(-1e4, 1e4, width=32)
    losses = draw(st.lists(pool, min_size=n, max_size=n))
    valid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    positive = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    groups = draw(st.lists(st.integers(-2, 4), min_size=n, max_size=n))
    quota = None
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["keep", "top_k"]))
        quota = (
            float(Fraction(draw(st.integers(0, 4)), 4)),
            draw(st.sampled_from([-1.0, 0.5, 2.0])),
        )
    else:
        kind = draw(st.sampled_from(["keep", "top_k", "loss_thresh"]))
    param = {
        "keep": float(Fraction(draw(st.integers(1, 8)), 8)),
        "top_k": draw(st.integers(0, 12)),
        "loss_thresh": draw(st.sampled_from([0.25, 1.0, -1.0])),
    }[kind]
    rule = (kind, param, draw(st.integers(0, 5)))
    fraction = draw(st.sampled_from([0.0, 0.25]))
    return losses, valid, positive, groups, rule, fraction, quota


@given(case=grouped_cases(), check=st.sampled_from(["eager", "deferred"]))
def test_grouped_selection_matches_brute_force(case, check):
    losses, valid, positive, groups, rule, fraction, quota = case
    kind, param, min_kept = rule
    kwargs = {kind: param, "min_kept": min_kept, "min_kept_fraction": fraction}
    if quota is not None:
        kwargs.update(pos_fraction=quota[0], neg_pos_ub=quota[1])
    selector = HardExampleSelector(**kwargs, per_group=True, nan="ignore", check=check)
    tensors = (
        torch.tensor(losses, dtype=torch.float32),
        torch.tensor(valid, dtype=torch.bool),
        torch.tensor(positive, dtype=torch.bool),
        torch.tensor(groups, dtype=torch.int64),
    )
    for _ in range(2):  # the first call, then the steady state
        result = selector(tensors[0], tensors[1], tensors[2], groups=tensors[3])
    f32 = tensors[0].tolist()
    expected = brute_force_groups(f32, valid, positive, groups, rule, fraction, quota)
    assert set(result.mask.nonzero().squeeze(1).tolist()) == expected
    assert result.num_selected_global == len(expected) and result.strategy == "grouped"


def test_groups_are_required_exactly_when_per_group():
    with pytest.raises(DistributedInputError, match="per_group=True"):
        HardExampleSelector(top_k=2)(torch.rand(4), groups=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DistributedInputError, match="pass groups="):
        HardExampleSelector(top_k=2, per_group=True)(torch.rand(4))
    with pytest.raises(ValueError, match="per_group=True"):
        HardExampleSelector(top_k=2, pos_fraction=0.25)


def anchors(seed: int, images: int, per_image: int = 6):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(images, per_image, 8, generator=gen)
    labels = torch.randint(0, 4, (images, per_image), generator=gen)
    labels[torch.rand(images, per_image, generator=gen) < 0.15] = -100
    return features, labels


def model_for_anchors() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def grouped_grads_on_rank(sizes, cases):
    """Worker: one DDP step of a per-image OHEMLoss on this rank's images per case
    ``(selector kwargs, normalizer)``; the gradients of each."""
    rank = get_rank()
    features, labels = (rank_slice(t, sizes, rank) for t in anchors(7, sum(sizes)))
    grads = []
    for kwargs, normalizer in cases:
        model = model_for_anchors()
        ddp = DDP(model)
        ohem = OHEMLoss(nn.CrossEntropyLoss(reduction="none"), normalizer=normalizer, **kwargs)
        logits = ddp(features).permute(0, 2, 1)  # (N, C, A)
        groups = torch.arange(len(labels)).unsqueeze(1).expand_as(labels)
        ohem(logits, labels, labels > 0, groups=groups).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_per_image_gradients_equal_the_single_process_reference(ranks, world_size):
    """SSD- and mmdet-style per-image mining: each image's own selection, the loss
    divided by the global positives or selected count; uneven ranks, one with no image."""
    sizes = {1: [3], 2: [2, 3], 3: [1, 0, 4], 4: [2, 1, 0, 3]}[world_size]
    features, labels = anchors(7, sum(sizes))
    cases, references = [], []
    for kwargs, normalizer in (
        ({"neg_pos_ratio": 2.0}, "positives"),
        ({"top_k": 4, "pos_fraction": 0.25, "neg_pos_ub": 2.0}, "selected"),
    ):
        kwargs = {**kwargs, "per_group": True}
        reference = per_image_reference(features, labels, kwargs, normalizer)
        for check in ("eager", "deferred"):
            cases.append(({**kwargs, "check": check}, normalizer))
            references.append(reference)
    outputs = ranks.run(world_size, grouped_grads_on_rank, sizes, cases)
    for rank, per_case in enumerate(outputs):
        for case, grads, expected in zip(cases, per_case, references, strict=True):
            for got, want in zip(grads, expected, strict=True):
                diff = (got - want).abs().max().item()
                assert diff <= TOLERANCE, f"rank {rank} {case}: {diff:.2e}"


def per_image_reference(features, labels, kwargs, normalizer):
    """One process: each image's selection by brute force, the loss divided by the
    positives or the selected count; its gradients."""
    model = model_for_anchors()
    losses = nn.functional.cross_entropy(model(features).permute(0, 2, 1), labels, reduction="none")
    valid, positive = labels != -100, labels > 0
    chosen = set()
    for image in range(len(labels)):
        offset = image * labels.shape[1]
        image_losses = losses[image].detach().tolist()
        usable = [i for i in range(labels.shape[1]) if valid[image, i]]
        pos = [i for i in usable if positive[image, i]]
        neg = [i for i in usable if not positive[image, i]]
        if "neg_pos_ratio" in kwargs:
            picked = pos + hardest(image_losses, neg, min(len(neg), 2 * len(pos)))
        else:
            kept_pos = min(len(pos), math.floor(0.25 * 4))
            wanted = min(4 - kept_pos, math.floor(2.0 * max(1, kept_pos)))
            picked = hardest(image_losses, pos, kept_pos) + hardest(image_losses, neg, wanted)
        chosen |= {offset + i for i in picked}
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[sorted(chosen)] = True
    mask = mask.view_as(labels)
    divisor = int((valid & positive).sum()) if normalizer == "positives" else len(chosen)
    (losses[mask].sum() / max(divisor, 1)).backward()
    return [p.grad for p in model.parameters()]
