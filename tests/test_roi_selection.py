"""RoISelector on gloo ranks equals one process on the concatenated RoIs (docs/DESIGN.md §4, §10).

Every rank builds the same global set of images (different RoI counts per image, integer
boxes with many duplicates, tied losses from repeated RoI features), keeps its own
images, scores every RoI with a tiny RoI head under no_grad, selects with
:class:`RoISelector`, and back-propagates the selected RoIs through the DDP-wrapped head
(two-pass) or all RoIs with the unselected weighted 0 (mask mode). The reference runs
the textbook greedy NMS (tests/test_detection.py) per image and label over the
concatenation, sorts the survivors itself and differentiates the mean loss of its own
top M.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import DistributedInputError
from dist_ohem.comm import get_rank, get_world_size
from dist_ohem.detection import RoISelector
from tests.test_detection import brute_force_nms

NUM_CLASSES = 3  # 0 = background
FEATURES = 6
TOLERANCE = 1e-6


@dataclass
class RoICase:
    """A global batch: ``images_per_rank`` images on each of ``world_size`` ranks."""

    seed: int
    world_size: int
    images_per_rank: int
    rois_per_image: int
    scope: str = "global"
    mode: str = "two_pass"
    invalid_rank: int | None = None  # every RoI of this rank is invalid: it selects none


def make_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, NUM_CLASSES * 5)  # class logits + class-specific deltas


def roi_losses(output: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-RoI Fast R-CNN loss: CE + smooth-L1 of the labelled class's deltas (fg only)."""
    logits, deltas = output[:, :NUM_CLASSES], output[:, NUM_CLASSES:].view(-1, NUM_CLASSES, 4)
    own = deltas[torch.arange(len(labels)), labels]
    box = F.smooth_l1_loss(own, targets, reduction="none").sum(1)
    return F.cross_entropy(logits, labels, reduction="none") + box * (labels > 0)


def global_images(case: RoICase) -> list[dict[str, torch.Tensor]]:
    """The images of all ranks, rank-major; image i has 1 to 12 RoIs."""
    gen = torch.Generator().manual_seed(case.seed)
    # Repeated features give tied losses; repeated boxes (some almost equal) overlap.
    shared = torch.randn(4, FEATURES, generator=gen)
    shared_boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 5], [2, 2, 6, 6], [1, 0, 5, 4]])
    images = []
    for _ in range(case.world_size * case.images_per_rank):
        n = int(torch.randint(1, 13, (1,), generator=gen))
        top_left = torch.randint(0, 6, (n, 2), generator=gen)
        boxes = torch.cat([top_left, top_left + torch.randint(1, 5, (n, 2), generator=gen)], 1)
        features = torch.randn(n, FEATURES, generator=gen)
        tied = torch.rand(n, generator=gen) < 0.4
        features[tied] = shared[torch.randint(0, 4, (int(tied.sum()),), generator=gen)]
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        labels[tied] = 1
        boxes[tied] = shared_boxes[torch.randint(0, 4, (int(tied.sum()),), generator=gen)]
        images.append(
            {
                "boxes": boxes.float(),
                "features": features,
                "labels": labels,
                "targets": torch.where(tied[:, None], 0.5, torch.randn(n, 4, generator=gen)),
            }
        )
    return images


def concat(images: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {key: torch.cat([image[key] for image in images]) for key in images[0]}
    batch["image_ids"] = torch.cat(
        [torch.full((len(image["labels"]),), i) for i, image in enumerate(images)]
    )
    return batch


def select_and_backward(case: RoICase) -> tuple[list[torch.Tensor], list[bool], int]:
    """Worker: this rank's images through RoISelector and the DDP head; grads and mask."""
    rank, world_size = get_rank(), get_world_size()
    assert world_size == case.world_size
    per_rank = case.images_per_rank
    batch = concat(global_images(case)[rank * per_rank : (rank + 1) * per_rank])
    head = make_head()
    ddp = DDP(head)
    valid = torch.full_like(batch["labels"], rank != case.invalid_rank, dtype=torch.bool)
    selector = RoISelector(case.rois_per_image, per_rank, scope=case.scope)
    with torch.no_grad():
        scores = roi_losses(head(batch["features"]), batch["labels"], batch["targets"])
    selection = selector(scores, batch["boxes"], batch["image_ids"], batch["labels"], valid)
    if case.mode == "mask":
        losses = roi_losses(ddp(batch["features"]), batch["labels"], batch["targets"])
        selection.loss(losses).backward()
    else:
        idx = selection.train_indices
        losses = roi_losses(
            ddp(batch["features"][idx]), batch["labels"][idx], batch["targets"][idx]
        )
        selection.loss_of_selected(losses).backward()
    grads = [p.grad.clone() for p in head.parameters()]
    return grads, selection.mask.tolist(), selection.result.num_selected_global


def reference(case: RoICase) -> tuple[list[torch.Tensor], list[bool]]:
    """One process: brute-force NMS per image and label, own top-M, grad of the mean."""
    images = global_images(case)
    batch = concat(images)
    head = make_head()
    with torch.no_grad():
        scores = roi_losses(head(batch["features"]), batch["labels"], batch["targets"]).tolist()
    rank_of = [i // case.images_per_rank for i in batch["image_ids"].tolist()]
    kept = brute_force_nms(
        batch["boxes"].long().tolist(),
        scores,
        batch["image_ids"].tolist(),
        Fraction(7, 10),
        batch["labels"].tolist(),
    )
    candidates = [i for i, k in enumerate(kept) if k and rank_of[i] != case.invalid_rank]
    budget = case.rois_per_image * case.images_per_rank
    if case.scope == "local":
        chosen = []
        for rank in range(case.world_size):
            mine = [i for i in candidates if rank_of[i] == rank]
            chosen += sorted(mine, key=lambda i: (-scores[i], i))[:budget]
    else:
        chosen = sorted(candidates, key=lambda i: (-scores[i], i))[: budget * case.world_size]
    mask = [i in chosen for i in range(len(scores))]
    index = torch.tensor(sorted(chosen), dtype=torch.int64)
    losses = roi_losses(
        head(batch["features"][index]), batch["labels"][index], batch["targets"][index]
    )
    (losses.sum() / max(len(chosen), 1)).backward()
    return [p.grad.clone() for p in head.parameters()], mask


CASES = [
    RoICase(seed=1, world_size=2, images_per_rank=1, rois_per_image=2),
    RoICase(seed=2, world_size=2, images_per_rank=2, rois_per_image=3, mode="mask"),
    RoICase(seed=3, world_size=3, images_per_rank=1, rois_per_image=2),
    RoICase(seed=4, world_size=3, images_per_rank=2, rois_per_image=1, invalid_rank=1),
    RoICase(seed=5, world_size=3, images_per_rank=1, rois_per_image=3, scope="local"),
    RoICase(seed=6, world_size=2, images_per_rank=1, rois_per_image=50),  # M = K
    RoICase(seed=7, world_size=1, images_per_rank=3, rois_per_image=2),
    RoICase(seed=8, world_size=4, images_per_rank=1, rois_per_image=2, mode="mask"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c.world_size}-s{c.seed}-{c.scope}")
def test_distributed_roi_selection_equals_reference(ranks, case: RoICase) -> None:
    outputs = ranks.run(case.world_size, select_and_backward, case, timeout=60)
    expected_grads, expected_mask = reference(case)
    mask = [m for _, rank_mask, _ in outputs for m in rank_mask]
    assert mask == expected_mask
    assert {m for _, _, m in outputs} == {sum(expected_mask)}
    for grads, _, _ in outputs:  # DDP averaged them: identical on every rank
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, atol=TOLERANCE, rtol=0)


def bad_box_on_rank_1() -> str:
    rank = get_rank()
    boxes = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3]])
    if rank == 1:
        boxes[1, 2] = 0.0  # x2 < x1
    selector = RoISelector(rois_per_image=1, images_per_rank=1)
    try:
        selector(torch.tensor([1.0, 2.0]), boxes, torch.zeros(2, dtype=torch.int64))
    except DistributedInputError as exc:
        return str(exc)
    return "no error"


def test_bad_box_on_one_rank_raises_on_every_rank(ranks) -> None:
    messages = ranks.run(2, bad_box_on_rank_1, timeout=60)
    assert messages[0] == messages[1]
    assert "rank 1: dedup_rois: 1 box(es) have x2 < x1" in messages[0]
