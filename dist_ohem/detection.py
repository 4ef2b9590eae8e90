"""RoI mining, the OHEM paper's case (docs/DESIGN.md §10).

A region-based detector scores every RoI (proposal) of its images with a read-only RoI
head, removes near-duplicate RoIs by a greedy NMS that uses the loss as the score
(:func:`dedup_rois`), and back-propagates only the hardest surviving RoIs of the whole
distributed batch (:class:`RoISelector`). Boxes are ``(x1, y1, x2, y2)``; areas have no
``+1``. Pure PyTorch (torchvision's ops do not load with a CPU-only torch build).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ohem import comm
from dist_ohem.loss import masked_loss, normalization_scale, scaled
from dist_ohem.selection import hardness_key
from dist_ohem.selector import HardExampleSelector, SelectionResult

__all__ = ["RoISelection", "RoISelector", "box_iou", "dedup_rois"]

#: The sorted RoIs of an image are visited in blocks of this many: one IoU block of
#: ``block x remaining`` per step, and a fixed-point pass of at most ``block`` rounds
#: inside the block (few in practice), so the greedy NMS is exact and needs no Python
#: loop over individual RoIs.
DEDUP_BLOCK = 128


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes; area without ``+1``.

    Args:
        boxes_a: ``(..., n, 4)``.
        boxes_b: ``(..., m, 4)``, same leading dims (broadcast) and dtype.

    Returns:
        ``(..., n, m)`` IoU in the boxes' dtype: intersection / union, 0 where the union
        is 0 (two empty boxes).
    """
    x1a, y1a, x2a, y2a = (boxes_a[..., :, None, k] for k in range(4))
    x1b, y1b, x2b, y2b = (boxes_b[..., None, :, k] for k in range(4))
    # In place where possible: each temporary is a full (n, m) buffer.
    width = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)
    height = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    intersection = width.mul_(height)
    union = ((x2a - x1a) * (y2a - y1a) + (x2b - x1b) * (y2b - y1b)).sub_(intersection)
    # Where the union is 0 the intersection is 0 too: 0 / tiny = 0, never 0 / 0.
    return intersection.div_(union.clamp_(min=torch.finfo(union.dtype).tiny))


def dedup_rois(
    boxes: torch.Tensor,
    losses: torch.Tensor,
    image_ids: torch.Tensor,
    iou_threshold: float = 0.7,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy NMS in hardness order, per image (and per label): which RoIs survive.

    Within each image (and each label, when ``labels`` is given) the RoIs are visited
    hardest first: higher loss first, equal losses in increasing index order. A RoI is
    kept unless its IoU with an already kept RoI of the same group is
    ``> iou_threshold``; a suppressed RoI suppresses nothing. Exactly the classic
    sequential greedy NMS, computed block-wise on the pairwise IoU matrix.

    Args:
        boxes: ``(R, 4)`` floating xyxy boxes, finite, ``x2 >= x1`` and ``y2 >= y1``.
        losses: ``(R,)`` floating per-RoI losses (the score; ``+inf`` is the hardest,
            NaN is an error). Detached.
        image_ids: ``(R,)`` integer image of each RoI.
        iou_threshold: in ``[0, 1]``; 1 keeps every RoI.
        labels: optional ``(R,)`` integer label of each RoI (e.g. the assigned class):
            RoIs of different labels never suppress each other.

    Returns:
        ``(R,)`` bool, True = kept.

    Raises:
        ValueError: a bad RoI or argument (named in the message).
        TypeError: an argument of the wrong type (named in the message).
    """
    _check_rois(boxes, losses, image_ids, labels, iou_threshold)
    num_rois = boxes.shape[0]
    kept = torch.zeros(num_rois, dtype=torch.bool, device=boxes.device)
    if num_rois == 0:
        return kept
    # One row per image, RoIs in hardness order (a stable sort keeps ties in index
    # order); labels, when given, only mask the pairs: rows stay image-sized, not padded
    # to the largest (image, label) group.
    _, image = torch.unique(image_ids, return_inverse=True)
    order = torch.sort(hardness_key(losses.detach()), descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]
    image_of = image[order]
    counts = torch.bincount(image_of)
    position = torch.arange(num_rois, device=boxes.device) - (counts.cumsum(0) - counts)[image_of]
    num_images, longest = counts.numel(), int(counts.max())
    padded = boxes.new_zeros(num_images, longest, 4)
    padded[image_of, position] = boxes.detach()[order]
    label_rows = None
    if labels is not None:
        label_rows = torch.zeros(num_images, longest, dtype=labels.dtype, device=labels.device)
        label_rows[image_of, position] = labels[order]
    suppressed = torch.ones(num_images, longest, dtype=torch.bool, device=boxes.device)
    suppressed[image_of, position] = False  # padding counts as suppressed: never kept
    kept_padded = torch.zeros_like(suppressed)
    for start in range(0, longest, DEDUP_BLOCK):
        stop = min(start + DEDUP_BLOCK, longest)
        overlap = box_iou(padded[:, start:stop], padded[:, start:]) > iou_threshold
        if label_rows is not None:
            overlap &= label_rows[:, start:stop, None] == label_rows[:, None, start:]
        # earlier[g, i, j]: in-block RoI i comes before j and would suppress it if kept.
        earlier = overlap[:, :, : stop - start].triu(diagonal=1)
        candidate = ~suppressed[:, start:stop]
        # Fixed point of "kept = candidate and no kept earlier RoI overlaps it": the
        # system is triangular, so it has one solution, the greedy one, reached after
        # at most block + 1 rounds (each round fixes at least one more RoI).
        block_kept = candidate
        while True:
            hit = (earlier & block_kept[:, :, None]).any(1)
            updated = candidate & ~hit
            if torch.equal(updated, block_kept):
                break
            block_kept = updated
        kept_padded[:, start:stop] = block_kept
        suppressed[:, start:] |= (overlap & block_kept[:, :, None]).any(1)
    kept[order] = kept_padded[image_of, position]
    return kept


def _check_rois(
    boxes: object,
    losses: object,
    image_ids: object,
    labels: object,
    iou_threshold: float,
) -> None:
    _check_shapes(boxes, losses, image_ids, labels)
    if not (isinstance(iou_threshold, (int, float)) and 0.0 <= iou_threshold <= 1.0):
        raise ValueError(f"iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
    bad = (~torch.isfinite(boxes)).any(1)
    if bad.any():
        index = int(bad.nonzero()[0])
        raise ValueError(
            f"{int(bad.sum())} box(es) have NaN or infinite coordinates, first RoI {index}: "
            f"{boxes[index].tolist()}"
        )
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        index = int(inverted.nonzero()[0])
        raise ValueError(
            f"{int(inverted.sum())} box(es) have x2 < x1 or y2 < y1, first RoI {index}: "
            f"{boxes[index].tolist()}; boxes are (x1, y1, x2, y2)"
        )
    nan = torch.isnan(losses)
    if nan.any():
        raise ValueError(
            f"{int(nan.sum())} NaN loss(es), first RoI {int(nan.nonzero()[0])}; NaN has no "
            "place in the hardness order: fix the loss or leave those RoIs out"
        )


def _check_shapes(boxes: object, losses: object, image_ids: object, labels: object) -> None:
    """Types and shapes: ``(R, 4)`` floating boxes, ``(R,)`` losses, ids and labels."""
    if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
        raise TypeError(f"boxes must be a floating tensor, got {_describe(boxes)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape (R, 4) as x1, y1, x2, y2, got {tuple(boxes.shape)}"
        )
    num_rois = boxes.shape[0]
    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
        raise TypeError(f"losses must be a floating tensor, got {_describe(losses)}")
    for name, ids in (("image_ids", image_ids), ("labels", labels)):
        if ids is None and name == "labels":
            continue
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {_describe(ids)}")
    for name, tensor in (("losses", losses), ("image_ids", image_ids), ("labels", labels)):
        if tensor is not None and tuple(tensor.shape) != (num_rois,):
            raise ValueError(
                f"{name} must have shape ({num_rois},), one entry per box, got "
                f"{tuple(tensor.shape)}"
            )


def _describe(value: object) -> str:
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


@dataclass
class RoISelection:
    """The RoIs one rank back-propagates, and how to weight them (docs/DESIGN.md §4).

    Attributes:
        mask: ``(R,)`` bool, the selected RoIs owned by this rank.
        kept: ``(R,)`` bool, the valid RoIs that survived :func:`dedup_rois` (the
            candidates of the selection).
        result: the :class:`SelectionResult` (M, K = surviving RoIs of all ranks, ...).
        grad_average: ``c = W`` (True) or 1 in the normalization ``c / M``.
        group: the process group of the selection.
    """

    mask: torch.Tensor
    kept: torch.Tensor
    result: SelectionResult
    grad_average: bool = True
    group: dist.ProcessGroup | None = None

    @property
    def scale(self) -> torch.Tensor:
        """``c / M``: the factor of the sum of this rank's selected losses (0-dim, float64)."""
        return normalization_scale(self.result, "mean", self.grad_average, self.group)

    @property
    def indices(self) -> torch.Tensor:
        """Indices of the selected RoIs, ``(num_selected_local,)`` int64, increasing."""
        return self.mask.nonzero().squeeze(1)

    @property
    def train_indices(self) -> torch.Tensor:
        """The RoIs to run through the head with grad: :attr:`indices`, or RoI 0 alone
        when this rank selected none (it then trains with weight 0, so that its backward
        and the gradient all-reduce still run; empty only when the rank has no RoI)."""
        indices = self.indices
        return indices if indices.numel() or self.mask.numel() == 0 else indices.new_zeros(1)

    def loss_of_selected(self, selected_losses: torch.Tensor) -> torch.Tensor:
        """``c / M`` times the sum of the losses of :attr:`train_indices` (two-pass mode).

        Args:
            selected_losses: ``(len(train_indices),)`` per-RoI losses with grad, in the
                order of :attr:`train_indices`.

        Returns:
            scalar to back-propagate; 0 (still connected to the graph) when this rank
            selected nothing.
        """
        expected = self.train_indices.numel()
        if tuple(selected_losses.shape) != (expected,):
            raise ValueError(
                f"selected_losses must have shape ({expected},), one loss per entry of "
                f"train_indices, got {tuple(selected_losses.shape)}"
            )
        weight = self.scale.where(self.result.on_device.num_selected_local > 0, 0.0)
        return scaled(selected_losses.sum(), weight)

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """``c / M`` times the sum of the selected entries of ``losses`` (mask mode:
        every RoI went through the head with grad, the unselected ones weigh 0).

        Args:
            losses: ``(R,)`` per-RoI losses with grad.
        """
        if tuple(losses.shape) != tuple(self.mask.shape):
            raise ValueError(
                f"losses must have shape {tuple(self.mask.shape)}, one per RoI, got "
                f"{tuple(losses.shape)}"
            )
        return masked_loss(losses, self.result, "mean", self.grad_average, self.group)


class RoISelector:
    """Hardest RoIs of the whole distributed batch, after hardness-ordered dedup.

    The paper's OHEM for region-based detectors (Shrivastava et al. 2016): score every
    RoI with a read-only head, :func:`dedup_rois` per image and label at IoU 0.7, keep
    the ``rois_per_image x images`` hardest survivors. ``scope="global"`` (default) keeps
    the top ``rois_per_image * images_per_rank * W`` over all ranks' RoIs,
    ``"local"`` each rank's own top ``rois_per_image * images_per_rank``, ``"random"``
    the global count uniformly at random among the survivors (identical on all ranks),
    ``"all"`` every survivor. Ties go to the lower global index (rank-major, docs/DESIGN.md §2).

    Args:
        rois_per_image: B, RoIs back-propagated per image (the paper's 64 or 128 / 2).
        images_per_rank: images each rank holds per step (the same on every rank).
        iou_threshold: dedup IoU (suppress when IoU > it); None: no dedup, every valid
            RoI is a candidate.
        scope: as for :class:`HardExampleSelector`.
        strategy: as for :class:`HardExampleSelector`.
        group: as for :class:`HardExampleSelector`.
        seed: as for :class:`HardExampleSelector`.
        grad_average: the engine averages gradients over ranks (DDP does): ``c = W``.

    Call ``selector(losses, boxes, image_ids, labels=None, valid=None)`` on every rank,
    once per step. Bad input on any rank (a NaN loss, an inverted box, a wrong shape)
    raises the same :class:`DistributedInputError` on every rank.
    """

    def __init__(
        self,
        rois_per_image: int,
        images_per_rank: int,
        *,
        iou_threshold: float | None = 0.7,
        scope: str = "global",
        strategy: str = "gather",
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
        grad_average: bool = True,
    ) -> None:
        for name, value in (
            ("rois_per_image", rois_per_image),
            ("images_per_rank", images_per_rank),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if iou_threshold is not None and not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1] or None, got {iou_threshold!r}")
        per_rank = int(rois_per_image) * int(images_per_rank)
        top_k = per_rank if scope == "local" else per_rank * comm.get_world_size(group)
        self.selector = HardExampleSelector(
            top_k=top_k, scope=scope, strategy=strategy, group=group, seed=seed
        )
        self.rois_per_image = int(rois_per_image)
        self.images_per_rank = int(images_per_rank)
        self.iou_threshold = iou_threshold
        self.grad_average = grad_average
        self._caller_config = ("RoISelector", self.rois_per_image, iou_threshold, grad_average)

    def __call__(
        self,
        losses: torch.Tensor,
        boxes: torch.Tensor,
        image_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> RoISelection:
        """Dedup this rank's RoIs, then select across the group.

        Args:
            losses: ``(R,)`` per-RoI losses of the read-only scoring pass (detached).
            boxes: ``(R, 4)`` xyxy RoIs; image_ids, labels: ``(R,)`` integer.
            valid: optional ``(R,)`` bool; False = never selected, never suppresses.

        Returns:
            :class:`RoISelection`.
        """
        try:
            kept = self._dedup(losses, boxes, image_ids, labels, valid)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by fail()
            like = losses if isinstance(losses, torch.Tensor) else None
            message = f"dedup_rois: {exc}"
            result = self.selector.fail(message, like, caller_config=self._caller_config)
            # Deferred checks: nothing selected here, every rank raises at the next call.
            nothing = torch.zeros_like(result.mask)
            return RoISelection(nothing, nothing, result, self.grad_average, self.selector.group)
        result = self.selector(losses.detach(), valid=kept, caller_config=self._caller_config)
        return RoISelection(result.mask, kept, result, self.grad_average, self.selector.group)

    def _dedup(
        self,
        losses: torch.Tensor,
        boxes: torch.Tensor,
        image_ids: torch.Tensor,
        labels: torch.Tensor | None,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """The candidates: valid RoIs that survive the dedup, ``(R,)`` bool."""
        _check_shapes(boxes, losses, image_ids, labels)
        if valid is None:
            valid = torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
        elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {_describe(valid)}")
        elif tuple(valid.shape) != tuple(losses.shape):
            raise ValueError(
                f"valid must have the shape of losses {tuple(losses.shape)}, got "
                f"{tuple(valid.shape)}"
            )
        if self.iou_threshold is None:
            return valid.clone()
        kept = torch.zeros_like(valid)
        kept[valid] = dedup_rois(
            boxes[valid],
            losses.detach()[valid],
            image_ids[valid],
            self.iou_threshold,
            None if labels is None else labels[valid],
        )
        return kept
