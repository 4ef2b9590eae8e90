"""dedup_rois against a brute-force greedy NMS; box_iou and input errors (docs/DESIGN.md §10)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ohem import DistributedInputError
from dist_ohem.detection import DEDUP_BLOCK, RoISelector, box_iou, dedup_rois

#: Thresholds as exact fractions; dedup_rois gets the nearest double. With integer boxes in
#: float64 the IoU is one correctly rounded division, so an IoU equal to the threshold as a
#: fraction is equal as a double, and one above or below it stays so.
THRESHOLDS = [Fraction(0), Fraction(1, 4), Fraction(1, 3), Fraction(1, 2), Fraction(7, 10), 1]


def exact_iou(a: list[int], b: list[int]) -> Fraction:
    """IoU of two integer xyxy boxes as an exact fraction; 0 when the union is empty."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return Fraction(intersection, union) if union else Fraction(0)


def brute_force_nms(boxes, losses, image_ids, threshold, labels=None) -> list[bool]:
    """The textbook sequential greedy NMS: visit hardest first (ties: lower index), keep a
    RoI unless a kept RoI of the same image and label overlaps it by IoU > threshold."""
    order = sorted(range(len(boxes)), key=lambda i: (-losses[i], i))
    kept = [False] * len(boxes)
    for i in order:
        same_group = [
            j
            for j in range(len(boxes))
            if kept[j]
            and image_ids[j] == image_ids[i]
            and (labels is None or labels[j] == labels[i])
        ]
        kept[i] = all(exact_iou(boxes[i], boxes[j]) <= threshold for j in same_group)
    return kept


@st.composite
def roi_sets(draw, max_rois: int = 40):
    """Integer boxes on a small grid (many duplicates, nested and touching boxes, empty
    boxes), losses from a few values (ties, +inf, -0.0), 1-3 images, 1-3 labels."""
    n = draw(st.integers(0, max_rois))
    coordinate = st.integers(0, 6)
    boxes = []
    for _ in range(n):
        x1, y1 = draw(coordinate), draw(coordinate)
        boxes.append([x1, y1, x1 + draw(st.integers(0, 5)), y1 + draw(st.integers(0, 5))])
    loss_value = st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, -1.0, math.inf])
    losses = [draw(loss_value) for _ in range(n)]
    image_ids = [draw(st.integers(0, 2)) for _ in range(n)]
    labels = [draw(st.integers(0, 2)) for _ in range(n)] if draw(st.booleans()) else None
    threshold = draw(st.sampled_from(THRESHOLDS))
    return boxes, losses, image_ids, labels, threshold


def run_dedup(boxes, losses, image_ids, labels, threshold, dtype=torch.float64) -> list[bool]:
    return dedup_rois(
        torch.tensor(boxes, dtype=dtype).reshape(-1, 4),
        torch.tensor(losses, dtype=dtype),
        torch.tensor(image_ids, dtype=torch.int64),
        float(threshold),
        None if labels is None else torch.tensor(labels, dtype=torch.int64),
    ).tolist()


@given(roi_sets())
def test_dedup_equals_brute_force_greedy_nms(case) -> None:
    boxes, losses, image_ids, labels, threshold = case
    expected = brute_force_nms(boxes, losses, image_ids, threshold, labels)
    assert run_dedup(boxes, losses, image_ids, labels, threshold) == expected


@settings(max_examples=25)
@given(
    st.integers(0, 2**31 - 1), st.sampled_from([Fraction(3, 10), Fraction(1, 2), Fraction(7, 10)])
)
def test_dedup_spanning_blocks_equals_brute_force(seed: int, threshold: Fraction) -> None:
    """More RoIs than one block, in clusters and chains (boxes shifted step by step) so
    that suppression crosses block boundaries; float32 boxes."""
    gen = torch.Generator().manual_seed(seed)
    n = DEDUP_BLOCK + 60
    start = torch.randint(0, 40, (n, 2), generator=gen)
    chain = torch.arange(n).unsqueeze(1) % 30  # neighbours in the chain overlap strongly
    top_left = torch.where(torch.rand(n, 1, generator=gen) < 0.5, start, chain)
    size = torch.randint(3, 12, (n, 2), generator=gen)
    boxes = torch.cat([top_left, top_left + size], 1).tolist()
    losses = torch.randint(0, 20, (n,), generator=gen).float().tolist()
    image_ids = torch.randint(0, 2, (n,), generator=gen).tolist()
    expected = brute_force_nms(boxes, losses, image_ids, threshold)
    assert run_dedup(boxes, losses, image_ids, None, threshold) == expected


def test_iou_exactly_at_threshold_is_not_suppressed() -> None:
    # IoU([0,0,10,10], [0,0,7,10]) = 70 / 100 = 0.7 exactly.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 7, 10], [0, 0, 6.9, 10]])
    losses = torch.tensor([3.0, 2.0, 1.0])
    kept = dedup_rois(boxes, losses, torch.zeros(3, dtype=torch.int64), 0.7)
    # RoI 1 stays (IoU with RoI 0 is 0.7, not above it); RoI 2 goes: IoU 69/70 with RoI 1.
    assert kept.tolist() == [True, True, False]
    assert float(box_iou(boxes[:1], boxes[1:2])) == pytest.approx(0.7)


def test_duplicates_keep_the_harder_then_the_lower_index() -> None:
    boxes = torch.tensor([[1.0, 1, 5, 5]] * 4)
    losses = torch.tensor([1.0, 2.0, 2.0, 0.5])
    kept = dedup_rois(boxes, losses, torch.zeros(4, dtype=torch.int64))
    assert kept.tolist() == [False, True, False, False]


def test_labels_and_images_separate_the_groups() -> None:
    boxes = torch.tensor([[0.0, 0, 4, 4]] * 4)
    losses = torch.ones(4)
    image_ids = torch.tensor([0, 0, 1, 1])
    assert dedup_rois(boxes, losses, image_ids).tolist() == [True, False, True, False]
    labels = torch.tensor([0, 1, 0, 0])
    assert dedup_rois(boxes, losses, image_ids, labels=labels).tolist() == [
        True,
        True,
        True,
        False,
    ]


def test_empty_input() -> None:
    kept = dedup_rois(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert kept.shape == (0,) and kept.dtype == torch.bool


def test_box_iou_matches_exact_fractions() -> None:
    gen = torch.Generator().manual_seed(0)
    top_left = torch.randint(0, 8, (30, 2), generator=gen)
    boxes = torch.cat([top_left, top_left + torch.randint(0, 6, (30, 2), generator=gen)], 1)
    iou = box_iou(boxes.double(), boxes.double())
    expected = [[float(exact_iou(a, b)) for b in boxes.tolist()] for a in boxes.tolist()]
    assert iou.tolist() == expected


@pytest.mark.parametrize(
    ("boxes", "losses", "image_ids", "message"),
    [
        ([[0.0, 0, 1, 1], [2, 0, 1, 1]], [1.0, 2.0], [0, 0], "x2 < x1 or y2 < y1, first RoI 1"),
        ([[0.0, 3, 1, 1]], [1.0], [0], "x2 < x1 or y2 < y1"),
        ([[0.0, 0, math.nan, 1]], [1.0], [0], "NaN or infinite coordinates"),
        ([[0.0, 0, 1, 1]], [math.nan], [0], "NaN loss"),
        ([[0.0, 0, 1]], [1.0], [0], "shape (R, 4)"),
        ([[0.0, 0, 1, 1]], [1.0, 2.0], [0], "losses must have shape (1,)"),
        ([[0.0, 0, 1, 1]], [1.0], [0, 1], "image_ids must have shape (1,)"),
    ],
)
def test_bad_input_raises_a_clear_error(boxes, losses, image_ids, message) -> None:
    with pytest.raises(ValueError, match=rf"{message.replace('(', '[(]').replace(')', '[)]')}"):
        dedup_rois(torch.tensor(boxes), torch.tensor(losses), torch.tensor(image_ids))


def test_bad_types_and_threshold_raise() -> None:
    boxes, losses = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1.0])
    with pytest.raises(TypeError, match="image_ids must be an integer tensor"):
        dedup_rois(boxes, losses, torch.tensor([0.0]))
    with pytest.raises(TypeError, match="boxes must be a floating tensor"):
        dedup_rois(boxes.long(), losses, torch.tensor([0]))
    with pytest.raises(ValueError, match="iou_threshold must be a number in"):
        dedup_rois(boxes, losses, torch.tensor([0]), iou_threshold=1.5)


def test_single_process_selector_raises_on_bad_boxes() -> None:
    selector = RoISelector(rois_per_image=2, images_per_rank=1)
    with pytest.raises(DistributedInputError, match="x2 < x1"):
        selector(torch.ones(1), torch.tensor([[3.0, 0, 1, 1]]), torch.tensor([0]))
