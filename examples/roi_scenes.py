"""Generated detection scenes for examples/roi_detection.py: images, boxes, proposals.

Each scene is a pure function of ``(seed, index)``: a noisy background with clutter
(bars, blobs), 1-4 objects of three classes at varied scales, and 1-3 look-alikes that
miss one defining part (hard negatives: a car without wheels, a person without a head,
a sign without its pole). The proposals imitate selective search: boxes jittered around
every object *and* every look-alike (a proposal method cannot tell them apart), plus
random boxes, ``NUM_PROPOSALS`` per image. A ``SceneMix`` sets the object and
look-alike counts: ``IID`` (the default above), ``HARD`` and ``EASY`` (the skewed shard
of bench/roi_quality.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

IMAGE_SIZE = 64
CLASSES = ("car", "person", "sign")  # label k + 1; label 0 is background
NUM_PROPOSALS = 1000
#: Share of the proposals jittered around objects and look-alikes; the rest are random.
JITTERED_SHARE = 0.4
_GRID_Y, _GRID_X = torch.meshgrid(
    torch.arange(IMAGE_SIZE) + 0.5, torch.arange(IMAGE_SIZE) + 0.5, indexing="ij"
)


@dataclass(frozen=True)
class SceneMix:
    """Inclusive ranges of the objects and look-alikes a scene draws (objects >= 1:
    every scene has an object). Fewer may appear when a box finds no free place."""

    objects: tuple[int, int]
    lookalikes: tuple[int, int]


#: The default scenes: 1-4 objects, 1-3 look-alikes.
IID = SceneMix(objects=(1, 4), lookalikes=(1, 3))
#: Crowded scenes with many hard negatives (placement caps what fits in 64 x 64 pixels).
HARD = SceneMix(objects=(4, 6), lookalikes=(3, 5))
#: One object, no look-alike.
EASY = SceneMix(objects=(1, 1), lookalikes=(0, 0))


@dataclass
class Scene:
    """One image with its ground truth and proposals (boxes are xyxy in pixels)."""

    image: torch.Tensor  # (3, IMAGE_SIZE, IMAGE_SIZE) float
    gt_boxes: torch.Tensor  # (G, 4), G >= 1: the first object always fits
    gt_labels: torch.Tensor  # (G,) int64 in 1..len(CLASSES)
    lookalike_boxes: torch.Tensor  # (D, 4) hard negatives, not objects
    proposals: torch.Tensor  # (NUM_PROPOSALS, 4)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _color(gen: torch.Generator, base: tuple[float, float, float] | None = None) -> torch.Tensor:
    """A random RGB colour in [0, 1], or ``base`` with a little variation."""
    if base is None:
        return torch.rand(3, generator=gen)
    return (torch.tensor(base) + 0.15 * torch.randn(3, generator=gen)).clamp(0, 1)


def _fill_rect(image: torch.Tensor, box: list[float], color: torch.Tensor) -> None:
    x1, y1, x2, y2 = box
    inside = (_GRID_X >= x1) & (_GRID_X < x2) & (_GRID_Y >= y1) & (_GRID_Y < y2)
    image[:, inside] = color[:, None]


def _fill_disc(image: torch.Tensor, cx: float, cy: float, r: float, color: torch.Tensor) -> None:
    inside = (_GRID_X - cx) ** 2 + (_GRID_Y - cy) ** 2 <= r * r
    image[:, inside] = color[:, None]


def _draw_car(image, gen, box, wheels: bool) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    body = _color(gen)
    _fill_rect(image, [x1, y1 + 0.45 * h, x2, y2 - 0.2 * h], body)  # body
    _fill_rect(image, [x1 + 0.25 * w, y1, x2 - 0.2 * w, y1 + 0.5 * h], body)  # cabin
    _fill_rect(image, [x1 + 0.32 * w, y1 + 0.1 * h, x2 - 0.27 * w, y1 + 0.4 * h], _color(gen))
    if wheels:
        r = 0.2 * h
        for cx in (x1 + 0.22 * w, x2 - 0.22 * w):
            _fill_disc(image, cx, y2 - r, r, torch.tensor([0.05, 0.05, 0.05]))


def _draw_person(image, gen, box, head: bool) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    shirt, legs = _color(gen), _color(gen, (0.2, 0.2, 0.45))
    _fill_rect(image, [x1, y1 + 0.28 * h, x2, y1 + 0.65 * h], shirt)
    _fill_rect(image, [x1 + 0.1 * w, y1 + 0.65 * h, x1 + 0.42 * w, y2], legs)
    _fill_rect(image, [x2 - 0.42 * w, y1 + 0.65 * h, x2 - 0.1 * w, y2], legs)
    if head:
        _fill_disc(image, (x1 + x2) / 2, y1 + 0.14 * h, 0.14 * h, _color(gen, (0.9, 0.7, 0.55)))


def _draw_sign(image, gen, box, pole: bool) -> None:
    x1, y1, x2, y2 = box
    r = (x2 - x1) / 2
    _fill_disc(image, x1 + r, y1 + r, r, _color(gen, (0.85, 0.1, 0.1)))
    _fill_disc(image, x1 + r, y1 + r, 0.6 * r, torch.tensor([0.95, 0.95, 0.95]))
    if pole:
        _fill_rect(image, [x1 + 0.8 * r, y1 + 2 * r, x1 + 1.2 * r, y2], _color(gen))


#: Per class: drawing function, (min, max) of the longer side, height / width.
_SHAPES = {
    1: (_draw_car, (14.0, 30.0), 0.55),
    2: (_draw_person, (12.0, 28.0), 2.3),
    3: (_draw_sign, (12.0, 24.0), 2.0),
}


def _place(gen: torch.Generator, label: int, taken: list[list[float]]) -> list[float] | None:
    """A box for ``label`` that overlaps no earlier object by more than a sliver."""
    _, (low, high), aspect = _SHAPES[label]
    for _ in range(20):
        side = _uniform(gen, low, high)
        w, h = (side, side * aspect) if aspect < 1 else (side / aspect, side)
        x1 = _uniform(gen, 0, IMAGE_SIZE - w)
        y1 = _uniform(gen, 0, IMAGE_SIZE - h)
        box = [x1, y1, x1 + w, y1 + h]
        if all(_overlap(box, other) < 0.15 for other in taken):
            return box
    return None


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection over the smaller box's area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _jitter(gen: torch.Generator, boxes: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` boxes around ``boxes`` (cycled): centre shifted and sides scaled at random."""
    source = boxes[torch.arange(count) % len(boxes)]
    size = source[:, 2:] - source[:, :2]
    centre = (source[:, :2] + source[:, 2:]) / 2 + 0.25 * size * torch.randn(
        count, 2, generator=gen
    )
    size = size * torch.exp(0.3 * torch.randn(count, 2, generator=gen))
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def _random_boxes(gen: torch.Generator, count: int) -> torch.Tensor:
    size = 4 + (IMAGE_SIZE / 2) * torch.rand(count, 2, generator=gen) ** 1.5
    top_left = (IMAGE_SIZE - size) * torch.rand(count, 2, generator=gen)
    return torch.cat([top_left, top_left + size], 1)


@functools.lru_cache(maxsize=4096)  # runs of one process (bench/roi_quality.py) share scenes
def make_scene(seed: int, index: int, mix: SceneMix = IID) -> Scene:
    """Scene ``index`` of the stream ``seed`` with ``mix``'s counts (deterministic; treat it
    as read-only). The image noise and clutter depend only on ``(seed, index)``."""
    if mix.objects[0] < 1 or mix.lookalikes[0] < 0:
        raise ValueError(f"a scene needs at least one object and no negative counts: {mix}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    image = (
        _color(gen)[:, None, None] * 0.5
        + 0.25
        + 0.08 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    )
    for _ in range(int(torch.randint(3, 7, (), generator=gen))):  # clutter
        x, y = _uniform(gen, 0, IMAGE_SIZE), _uniform(gen, 0, IMAGE_SIZE)
        if float(torch.rand((), generator=gen)) < 0.5:
            long, thin = _uniform(gen, 6, 24), _uniform(gen, 1, 3)
            w, h = (long, thin) if float(torch.rand((), generator=gen)) < 0.5 else (thin, long)
            _fill_rect(image, [x, y, x + w, y + h], _color(gen))
        else:
            _fill_disc(image, x, y, _uniform(gen, 1.5, 5), _color(gen))
    taken: list[list[float]] = []
    gt_boxes, gt_labels, lookalikes = [], [], []
    num_objects = int(torch.randint(mix.objects[0], mix.objects[1] + 1, (), generator=gen))
    num_lookalikes = int(torch.randint(mix.lookalikes[0], mix.lookalikes[1] + 1, (), generator=gen))
    for k in range(num_objects + num_lookalikes):
        label = int(torch.randint(1, len(CLASSES) + 1, (), generator=gen))
        box = _place(gen, label, taken)
        if box is None:
            continue
        taken.append(box)
        is_object = k < num_objects
        _SHAPES[label][0](image, gen, box, is_object)
        (gt_boxes if is_object else lookalikes).append(box)
        if is_object:
            gt_labels.append(label)
    gt = torch.tensor(gt_boxes).reshape(-1, 4)
    hard = torch.tensor(lookalikes).reshape(-1, 4)
    num_jittered = int(JITTERED_SHARE * NUM_PROPOSALS)
    anchors = torch.cat([gt, hard])  # never empty: there is at least one object
    jittered = _jitter(gen, anchors, num_jittered)
    proposals = torch.cat([jittered, _random_boxes(gen, NUM_PROPOSALS - len(jittered))])
    proposals = proposals.clamp(0, IMAGE_SIZE)
    proposals[:, 2:] = torch.maximum(proposals[:, 2:], proposals[:, :2] + 2).clamp(max=IMAGE_SIZE)
    proposals[:, :2] = torch.minimum(proposals[:, :2], proposals[:, 2:] - 2)
    return Scene(
        image=image.clamp(0, 1),
        gt_boxes=gt,
        gt_labels=torch.tensor(gt_labels, dtype=torch.int64),
        lookalike_boxes=hard,
        proposals=proposals,
    )
