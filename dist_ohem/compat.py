"""Drop-in presets for the OHEM losses people already use, global across ranks.

Each constructor returns an :class:`~dist_ohem.OHEMLoss` called like the peer's loss,
whose ``.last.mask`` has the shape of the per-instance losses. With one process it
selects what the peer selects and returns the peer's loss value, except for the
departures each docstring names (ties always go to the lower index, as everywhere in
``dist_ohem``). With several ranks it selects over the whole distributed batch where the
peer selects over one GPU's batch, and keeps per-image mining per image; the gradient
after the engine's averaging is the preset's on the concatenated batch.

=====================  ===========================================================
preset                 the peer's code
=====================  ===========================================================
:func:`mmseg_ohem`     mmsegmentation ``OHEMPixelSampler`` + ``CrossEntropyLoss``
:func:`paddleseg_ohem` PaddleSeg ``OhemCrossEntropyLoss``
:func:`hrnet_ohem`     HRNet-Semantic-Segmentation ``OhemCrossEntropy``
:func:`bisenet_ohem`   BiSeNet ``OhemCELoss``
:func:`ssd_hard_negatives`  torchvision SSD's hard negative mining (classification)
:func:`mmdet_ohem`     mmdetection ``OHEMSampler`` (per-image positive quota)
=====================  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_ohem.loss import OHEMLoss

__all__ = [
    "PresetLoss",
    "bisenet_ohem",
    "hrnet_ohem",
    "mmdet_ohem",
    "mmseg_ohem",
    "paddleseg_ohem",
    "ssd_hard_negatives",
]


class PresetLoss(OHEMLoss):
    """An :class:`~dist_ohem.OHEMLoss` with a peer's call form: the positives and the
    groups (images) come from the targets, or from an extra argument.

    ``forward(input, target, *extra)``: ``positive_of(input, target)`` and
    ``groups_of(input, target, *extra)`` give the selector's ``positive=`` and
    ``groups=`` (None where the preset has none).
    """

    def __init__(
        self,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        positive_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        groups_of: Callable[..., torch.Tensor] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(criterion, **kwargs)
        self._positive_of = positive_of
        self._groups_of = groups_of

    def forward(self, input: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor):
        """The loss to back-propagate on this rank, as :meth:`OHEMLoss.forward`."""
        positive = None if self._positive_of is None else self._positive_of(input, target)
        groups = None if self._groups_of is None else self._groups_of(input, target, *extra)
        return super().forward(input, target, positive, groups=groups)


def _pixel_ce(ignore_index: int) -> nn.Module:
    """Per-pixel cross-entropy of ``(N, C, H, W)`` logits and ``(N, H, W)`` labels."""
    return nn.CrossEntropyLoss(ignore_index=ignore_index, reduction="none")


def mmseg_ohem(
    thresh: float | None = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
    **kwargs: object,
) -> OHEMLoss:
    """mmsegmentation's ``OHEMPixelSampler(thresh, min_kept)`` with ``CrossEntropyLoss``.

    ``loss = criterion(seg_logit (N, C, H, W), seg_label (N, H, W))``. Keeps every pixel
    whose target-class probability is below ``thresh``, but at least ``min_kept`` per
    image (``min_kept * N`` of the least probable; over all ranks at W > 1: ``min_kept``
    times every rank's images); ``thresh=None``: the ``min_kept * N`` pixels of highest
    loss. The loss is the sum over the kept pixels divided by N·H·W (every pixel,
    ignored ones included, over all ranks), or with ``avg_non_ignore=True`` by the
    non-ignored pixels. ``kwargs`` go to :class:`~dist_ohem.OHEMLoss` (``check``,
    ``group``, ...).

    Departures, each with its reason:

    - When pixels tie at the cut, mmseg keeps fewer than ``min_kept * N`` (its cut is a
      value, strictly below); here exactly that many, ties to the lower index: the
      count the parameter names.
    - When ``min_kept * N`` reaches the valid count, mmseg drops the most confident
      pixel(s) unless ``thresh`` is above them; here every valid pixel is kept.
    - With ``avg_non_ignore=True`` mmseg adds float32 eps to the divisor; not here.
    - Probabilities are compared with ``thresh`` in float64, not in the logits' dtype:
      a probability equal to ``thresh`` rounded down to that dtype (float32 included)
      is kept here and dropped by mmseg.
    """
    common = {"min_kept": min_kept, "min_kept_per": "example"}
    normalizer = "valid" if avg_non_ignore else "instances"
    if thresh is None:  # every pixel above +inf: none; so the floor, by loss
        rule = {"loss_thresh": math.inf, **common}
        return OHEMLoss(_pixel_ce(ignore_index), normalizer=normalizer, **rule, **kwargs)
    return OHEMLoss(
        _pixel_ce(ignore_index), normalizer=normalizer, prob_thresh=thresh, **common, **kwargs
    )


def paddleseg_ohem(
    thresh: float = 0.7, min_kept: int = 10000, ignore_index: int = 255, **kwargs: object
) -> OHEMLoss:
    """PaddleSeg's ``OhemCrossEntropyLoss(thresh, min_kept, ignore_index)``.

    ``loss = criterion(logit (N, C, H, W), label (N, H, W))``: every pixel whose
    target-class probability is below ``thresh``, but at least ``min_kept`` per GPU batch
    (``min_kept * W`` over the distributed batch) of the least probable; the mean over
    the kept pixels.

    Departures:

    - PaddleSeg's cut is the ``min_kept``-th smallest probability, kept strictly below:
      ``min_kept - 1`` pixels (fewer with ties). Here ``min_kept``, ties to the lower
      index: the count the parameter names.
    - With ``min_kept=0`` PaddleSeg mines nothing (keeps every valid pixel); here the
      threshold alone applies.
    - PaddleSeg divides by the kept count plus ``1e-5 * N*H*W``, to avoid a division by
      zero; here by the kept count (at least 1), so the loss of a small kept set is not
      shrunk.
    - Probabilities are compared with ``thresh`` in float64, not in the logits' dtype:
      a probability equal to ``thresh`` rounded down to that dtype (float32 included)
      is kept here and dropped by PaddleSeg.
    """
    return OHEMLoss(
        _pixel_ce(ignore_index),
        prob_thresh=thresh,
        min_kept=min_kept,
        min_kept_per="rank",
        **kwargs,
    )


def hrnet_ohem(
    thres: float = 0.7, min_kept: int = 100000, ignore_label: int = -1, **kwargs: object
) -> OHEMLoss:
    """HRNet-Semantic-Segmentation's ``OhemCrossEntropy(ignore_label, thres, min_kept)``.

    ``loss = criterion(score (N, C, H, W), target (N, H, W))`` (score and target of the
    same size): every pixel whose target-class probability is below ``thres``, but at
    least ``max(1, min_kept)`` per GPU batch (times W over the distributed batch) of the
    least probable; the mean over the kept pixels.

    Departures:

    - HRNet's cut is a value (strictly below): with ties there it keeps fewer pixels,
      none at all when every pixel is equally easy (its loss is then NaN). Here exactly
      the count, ties to the lower index.
    - When ``min_kept`` reaches the valid count HRNet drops the most confident
      pixel(s); here every valid pixel is kept.
    - An all-ignored batch raises ``IndexError`` in HRNet; here it selects nothing and
      the loss is 0.
    - Probabilities are compared with ``thres`` in float64, not in the logits' dtype:
      a probability equal to ``thres`` rounded down to that dtype (float32 included)
      is kept here and dropped by HRNet.
    """
    return OHEMLoss(
        _pixel_ce(ignore_label),
        prob_thresh=thres,
        min_kept=max(1, min_kept),
        min_kept_per="rank",
        **kwargs,
    )


def bisenet_ohem(thresh: float = 0.7, ignore_lb: int = 255, **kwargs: object) -> OHEMLoss:
    """BiSeNet's ``OhemCELoss(thresh, ignore_lb)``.

    ``loss = criterion(logits (N, C, H, W), labels (N, H, W))``: every pixel whose loss
    is above ``-log(thresh)`` (the float32 value BiSeNet compares with), but at least
    ``n_valid // 16`` of the highest-loss pixels (the valid count over all ranks); the
    mean over the kept pixels.

    Departures:

    - When fewer than ``n_valid // 16`` pixels are above the threshold, BiSeNet takes its
      top losses over every pixel, ignored ones (loss 0) included; here only valid
      pixels are ranked, and it matters only when there are fewer valid pixels of
      positive loss than ``n_valid // 16``.
    - When nothing is kept (all pixels ignored, or fewer than 16 valid ones and none
      hard) BiSeNet returns NaN; here 0.
    """
    loss_thresh = float(-torch.log(torch.tensor(thresh, dtype=torch.float32)))
    return OHEMLoss(
        _pixel_ce(ignore_lb), loss_thresh=loss_thresh, min_kept_fraction=1 / 16, **kwargs
    )


def _anchor_ce(cls_logits: torch.Tensor, cls_targets: torch.Tensor) -> torch.Tensor:
    """``(N, A)`` cross-entropy of ``(N, A, C)`` logits and ``(N, A)`` class targets."""
    return F.cross_entropy(cls_logits.transpose(1, 2), cls_targets, reduction="none")


def _images(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The image index of every anchor of ``(N, A)`` targets."""
    return torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(target)


def ssd_hard_negatives(
    neg_to_pos_ratio: float = 3.0, per_image: bool = True, **kwargs: object
) -> PresetLoss:
    """torchvision SSD's hard negative mining (the classification loss).

    ``loss = criterion(cls_logits (N, A, C), cls_targets (N, A))``, background class 0:
    every foreground anchor, plus in each image the hardest ``neg_to_pos_ratio * P_i``
    background anchors (P_i its foreground anchors); the sum divided by the foreground
    anchors of the whole batch (over all ranks), at least 1. ``per_image=False`` mines
    the negatives over the whole distributed batch instead.

    Departures:

    - torchvision takes ``ceil(ratio * P_i)`` negatives, here ``floor`` (snapped): the
      same for the default ratio 3 and any integer ratio.
    - When ``ratio * P_i`` exceeds image i's background anchors, torchvision picks
      foreground anchors as negatives too and counts their loss twice; here each
      anchor counts once.
    """
    return PresetLoss(
        _anchor_ce,
        positive_of=lambda cls_logits, cls_targets: cls_targets > 0,
        groups_of=_images if per_image else None,
        neg_pos_ratio=neg_to_pos_ratio,
        per_group=per_image,
        normalizer="positives",
        ignore_index=-100,
        **kwargs,
    )


def mmdet_ohem(
    num: int = 512, pos_fraction: float = 0.25, neg_pos_ub: float = -1, **kwargs: object
) -> PresetLoss:
    """mmdetection's ``OHEMSampler(num, pos_fraction, neg_pos_ub)`` with the head's
    classification cross-entropy over the sampled RoIs.

    ``loss = criterion(cls_score (R, C), labels (R,), image_index (R,))``, background
    label ``C - 1``, label -1 ignored: in each image, the hardest
    ``min(#positives, floor(num * pos_fraction))`` foreground RoIs, then the hardest
    background RoIs up to ``num`` (at most ``floor(neg_pos_ub * max(1, positives
    kept))`` of them with ``neg_pos_ub >= 0``); the mean over the sampled RoIs of all
    images and ranks.

    Departures:

    - mmdetection truncates ``num * pos_fraction`` and ``neg_pos_ub * max(1, #pos)``
      with ``int()``; here they are floored after snapping to an integer within 1e-9
      (``0.1 * 30`` is 3 in both; ``2.9999999999`` is 2 there, 3 here).
    - Ground truths added as proposals (``add_gt_as_proposals``) are the caller's: pass
      them among the RoIs.
    """
    return PresetLoss(
        nn.CrossEntropyLoss(ignore_index=-1, reduction="none"),
        positive_of=lambda cls_score, labels: (labels >= 0) & (labels < cls_score.shape[1] - 1),
        groups_of=lambda cls_score, labels, image_index: image_index,
        top_k=num,
        pos_fraction=pos_fraction,
        neg_pos_ub=neg_pos_ub,
        per_group=True,
        **kwargs,
    )
