"""Plain-torch references of six peers' OHEM losses / samplers (test code, not dist_ohem).

Each function below re-states, in plain PyTorch, what one peer's code does, quirks
included (nothing is fixed), so that ``dist_ohem.compat`` presets can be tested against
it. Nothing here imports ``dist_ohem``; mmcv / paddle / torchvision ops are replaced by
their torch equivalents. The peers' code was read from stored copies of their public
GitHub repositories; each function's docstring names the repository, path and commit
read. Where a peer's result depends on the order ``torch.sort`` / ``torch.topk`` /
``paddle.argsort`` give to tied keys (unspecified there), these references use a stable
order: among equal keys, the lower flat index comes first.

| peer      | unit  | threshold on        | min_kept counts       | normalization         | quirks |
|-----------|-------|---------------------|-----------------------|-----------------------|--------|
| mmseg     | batch | prob p < T, or none | min_kept * N pixels   | sum / NHW, or / #nI   | M1-M5  |
| PaddleSeg | batch | prob p < T          | min_kept per batch    | sum / (K + 1e-5*NHW)  | P1-P5  |
| HRNet     | batch | prob p < T          | min_kept per batch    | mean over kept        | H1-H4  |
| BiSeNet   | batch | loss l > -log(t)    | #valid // 16 (fixed)  | mean over kept        | B1-B4  |
| SSD       | image | none: rank by loss  | ratio * P_i negatives | sum / max(1, sum P_i) | S1-S4  |
| mmdet     | image | none: topk by loss  | int(num*pos_fraction) | none (a sampler)      | D1-D4  |

"batch": one pool of pixels for the whole batch; "image": each image selects on its own.
p is the softmax probability of the target class, l the per-pixel CE, K the kept count,
NHW = N*H*W, #nI the non-ignored count, P_i image i's positives, V the valid (non-ignored) count.

Thresholds T (all comparisons strict; ``sorted_p`` = valid p ascending):

- mmseg: ``T = max(sorted_p[min(min_kept*N, V-1)], thresh)`` (``thresh=None``: no
  threshold, the ``min_kept*N`` highest CE losses are kept).
- PaddleSeg: ``T = sorted_p[min_kept-1]`` if that is above ``thresh``, else ``thresh``.
- HRNet: ``T = max(sorted_p[min(min_kept, V-1)], thres)``.
- BiSeNet: hard = ``l > -log(thresh)``; if fewer than ``V // 16``, the ``V // 16`` top l.
- SSD: negatives ranked by l (positives set to -inf); ranks ``< ratio * P_i`` picked.
- mmdet: positives and negatives mined separately by ``topk`` of the bbox head's CE.

Quirks (each docstring has the details):

- M1 the threshold is the value at index ``min_kept*N``: exactly that many kept when
  untied and ``thresh`` is lower, fewer with ties there. M2 ``min_kept*N >= V``: the
  most confident pixel(s) are dropped unless ``thresh`` is above them. M3 the loss is
  divided by N*H*W (``avg_non_ignore=False``) or by #nI + eps, never by K. M4
  ``min_kept`` is per image but the pool is the batch. M5 ``assert min_kept > 1``.
- P1 ``min_kept - 1`` index: at most ``min_kept - 1`` kept when the sort sets T. P2 no
  mining at all when ``min_kept == 0``. P3 nor when ``min_kept >= V`` (``thresh``
  ignored too). P4 EPS scales with N*H*W; all-ignored gives 0. P5 per batch, not image.
- H1 nothing kept (ties at T, e.g. all pixels equally easy) gives NaN. H2 all-ignored
  batch raises IndexError. H3 ``min_kept >= V`` drops the most confident pixel(s).
  H4 ``min_kept`` is per batch (not times N), floored at 1.
- B1 ``n_min = V // 16`` is not a parameter; no cap on the hard set. B2 the ``topk``
  fallback ranks ignored pixels (l = 0) too. B3 NaN when nothing is kept (V < 16 and no
  hard pixel; all-ignored). B4 tie order changes the mask only, never the loss.
- S1 ``ceil(ratio*P_i)`` above image i's negatives picks positives as negatives: their
  CE counts twice. S2 an image without positives contributes nothing. S3 normalized by
  positives only. S4 positives tie at -inf, so which are double-counted is order-bound.
- D1 ``int()`` truncation of ``num*pos_fraction`` and ``neg_pos_ub*max(1, #pos)``. D2
  a pool under its quota is taken whole (fewer than ``num`` RoIs may be sampled). D3
  unused positive quota goes to negatives. D4 ``torch.topk`` tie order (here: lower
  index first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bisenet_ohem_reference",
    "hrnet_ohem_reference",
    "mmdet_ohem_reference",
    "mmseg_ohem_reference",
    "paddleseg_ohem_reference",
    "ssd_hard_negatives_reference",
]

#: ``torch.finfo(torch.float32).eps``, the epsilon mmseg's ``weight_reduce_loss`` adds
#: to ``avg_factor`` (newer versions; older ones add nothing).
MMSEG_AVG_EPS = torch.finfo(torch.float32).eps
#: PaddleSeg ``OhemCrossEntropyLoss.EPS``.
PADDLESEG_EPS = 1e-5


def _stable_descending(values: Tensor) -> Tensor:
    """Indices of ``values`` (1-D) by decreasing value; ties: the lower index first."""
    return torch.sort(values, descending=True, stable=True).indices


def mmseg_ohem_reference(
    seg_logit: Tensor,
    seg_label: Tensor,
    thresh: float | None,
    min_kept: int,
    ignore_index: int = 255,
    avg_non_ignore: bool = False,
) -> tuple[Tensor, Tensor]:
    """mmsegmentation: ``OHEMPixelSampler.sample`` then ``CrossEntropyLoss`` with its weight.

    Source (open-mmlab/mmsegmentation):

    - ``mmseg/structures/sampler/ohem_pixel_sampler.py`` @ 230246f5576997c5822b16e7a32d66f9005d5135
      (1.x; 0.x has the same body at ``mmseg/core/seg/sampler/ohem_pixel_sampler.py``);
    - ``mmseg/models/losses/cross_entropy_loss.py`` @ 021e797a516b806912551c1c07736ea70195b283
      (``cross_entropy`` with ``avg_non_ignore``);
    - ``mmseg/models/losses/utils.py`` @ 8e0354608dc17f1f203594caa0b980b817f6c225
      (``weight_reduce_loss``: ``loss.sum() / (avg_factor + float32 eps)``; the older
      020acda4c19e8ee9c9147cca7ccbeccf6f67fdee divides by ``avg_factor`` alone);
    - ``mmseg/models/decode_heads/decode_head.py`` @ fdac3b8c9aacc132ae8b6fddd3a11ed7ef44271b
      (0.x ``losses``; 1.x ``loss_by_feat`` is the same): logits resized to the label,
      ``seg_weight = sampler.sample(seg_logits, seg_label)`` on the (N, 1, H, W) label,
      then each ``loss_decode(seg_logits, seg_label.squeeze(1), weight=seg_weight,
      ignore_index=self.ignore_index)``.

    Semantics (one ``CrossEntropyLoss``, ``loss_weight=1``, no ``class_weight``):

    - valid = ``label != ignore_index``; ``batch_kept = min_kept * N`` over the whole batch.
    - ``thresh`` given: p = softmax target-class probability (ignored pixels gather class
      0, then are excluded); ``sorted_p`` = valid p ascending; ``min_threshold =
      sorted_p[min(batch_kept, V - 1)]`` (``0.0`` if V == 0); ``threshold =
      max(min_threshold, thresh)``; kept = valid and ``p < threshold`` (strict).
    - ``thresh`` None: per-pixel CE (``reduction_override='none'``, summed over all
      ``loss_decode`` modules: same order for one or several identical CE losses);
      the ``batch_kept`` largest among the valid pixels are kept (all valid pixels when
      ``batch_kept >= V``).
    - loss = ``CE * seg_weight`` (CE is 0 at ignored pixels), then
      ``avg_non_ignore=False``: ``.mean()`` over all N*H*W pixels;
      ``avg_non_ignore=True``: ``.sum() / (label.numel() - #ignored + eps)``.

    Quirks observed:

    - The threshold is the value at index ``batch_kept`` (the (batch_kept+1)-th smallest)
      compared with strict ``<``: exactly ``batch_kept`` pixels when ``sorted_p`` is untied
      there and ``thresh`` is lower; fewer when pixels tie with that value.
    - ``batch_kept >= V``: ``min_threshold`` is the largest p, so the most confident
      pixel(s) are dropped unless ``thresh`` is above them.
    - The normalizer never counts the kept pixels: with ``avg_non_ignore=False`` it is
      N*H*W (ignored and unkept pixels included), with ``True`` the non-ignored count.
    - ``min_kept`` is per image but the selection is pooled over the batch.
    - ``__init__`` asserts ``min_kept > 1``; ``sample`` asserts equal spatial sizes.
    - ``thresh=None`` ranks with ``sort(descending=True)``: tie order unspecified in the
      peer; here stable (lower flat (N, H, W) index first).

    ``seg_label`` is (N, H, W) or (N, 1, H, W). Returns ``(loss, kept)`` with ``kept``
    the bool (N, H, W) ``seg_weight``.
    """
    assert min_kept > 1
    if seg_label.dim() == 3:
        seg_label = seg_label.unsqueeze(1)
    assert seg_logit.shape[2:] == seg_label.shape[2:]
    assert seg_label.shape[1] == 1
    label = seg_label.squeeze(1).long()
    with torch.no_grad():
        batch_kept = min_kept * label.size(0)
        valid = label != ignore_index
        seg_weight = seg_logit.new_zeros(label.shape)
        valid_weight = seg_weight[valid]
        if thresh is not None:
            gather_label = label.clone()
            gather_label[gather_label == ignore_index] = 0
            prob = F.softmax(seg_logit, dim=1).gather(1, gather_label.unsqueeze(1)).squeeze(1)
            valid_prob = prob[valid]
            sorted_prob = valid_prob.sort().values
            if sorted_prob.numel() > 0:
                min_threshold = sorted_prob[min(batch_kept, sorted_prob.numel() - 1)]
            else:
                min_threshold = 0.0
            threshold = max(min_threshold, thresh)
            valid_weight[valid_prob < threshold] = 1.0
        else:
            pixel_loss = F.cross_entropy(
                seg_logit, label, reduction="none", ignore_index=ignore_index
            )
            order = _stable_descending(pixel_loss[valid])
            valid_weight[order[:batch_kept]] = 1.0
        seg_weight[valid] = valid_weight
    pixel_loss = F.cross_entropy(seg_logit, label, reduction="none", ignore_index=ignore_index)
    weighted = pixel_loss * seg_weight.float()
    if avg_non_ignore:
        avg_factor = label.numel() - (label == ignore_index).sum().item()
        loss = weighted.sum() / (avg_factor + MMSEG_AVG_EPS)
    else:
        loss = weighted.mean()
    return loss, seg_weight.bool()


def paddleseg_ohem_reference(
    logit: Tensor,
    label: Tensor,
    thresh: float = 0.7,
    min_kept: int = 10000,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    """PaddleSeg ``OhemCrossEntropyLoss.forward``, paddle ops replaced by torch ones.

    Source: PaddlePaddle/PaddleSeg ``paddleseg/models/losses/ohem_cross_entropy_loss.py``
    @ 04f3a1c64cbe40895f5a1a7143ef3b7105c4f5d8 (same semantics @
    cd6da306fd3a81471ad2ad48b4cf2eaa12409129, which reads the index with
    ``.numpy()[0]``).

    Semantics:

    - flatten the batch (the whole batch is one pool); valid = ``label != ignore_index``;
      ``num_valid`` = valid count; ignored labels set to 0.
    - mining only if ``min_kept < num_valid and num_valid > 0`` and then only if
      ``min_kept > 0``: p = target-class probability, ignored pixels get ``p + 1``
      (so they sort last); ``k = min(M, min_kept)``; ``t = sorted_p[k - 1]`` (the
      ``min_kept``-th smallest; ``argsort`` tie order does not change the value);
      ``threshold = t if t > thresh else thresh``; kept = valid and ``p < threshold``.
    - otherwise every valid pixel is kept.
    - loss: CE (0 at unkept pixels, which are relabelled ``ignore_index``) times kept,
      ``mean over N*H*W`` divided by ``mean(kept) + 1e-5``, i.e.
      ``sum(kept CE) / (K + 1e-5 * N*H*W)``.

    Quirks observed:

    - ``min_kept - 1`` index with strict ``<``: when the sort supplies the threshold, at
      most ``min_kept - 1`` pixels are kept (fewer with ties at ``t``).
    - ``min_kept == 0``: no mining (``thresh`` is not applied either): all valid pixels.
    - ``min_kept >= num_valid``: no mining at all (``thresh`` ignored), not "keep all
      below thresh".
    - The EPS term scales with the pixel count: the loss is slightly below the mean of
      the kept losses; an all-ignored batch gives 0 (no NaN).
    - ``min_kept`` counts pixels of the whole batch, not per image.

    Returns ``(loss, kept)`` with ``kept`` bool (N, H, W).
    """
    if label.dim() != logit.dim():
        label = label.unsqueeze(1)
    n, c, h, w = logit.shape
    flat_label = label.reshape(-1).long()
    valid = (flat_label != ignore_index).long()
    num_valid = int(valid.sum())
    flat_label = flat_label * valid
    prob = F.softmax(logit, dim=1).transpose(0, 1).reshape(c, -1)
    if min_kept < num_valid and num_valid > 0:
        prob = prob + (1 - valid).to(prob.dtype)
        onehot = F.one_hot(flat_label, c).transpose(0, 1).to(prob.dtype)
        prob = (prob * onehot).sum(dim=0)
        threshold = thresh
        if min_kept > 0:
            index = prob.argsort(stable=True)
            threshold_index = int(index[min(len(index), min_kept) - 1])
            if prob[threshold_index] > thresh:
                threshold = prob[threshold_index]
            kept = (prob < threshold).long()
            flat_label = flat_label * kept
            valid = valid * kept
    flat_label = flat_label + (1 - valid) * ignore_index
    kept_mask = valid.reshape(n, 1, h, w).to(logit.dtype)
    pixel_loss = F.cross_entropy(
        logit, flat_label.reshape(n, h, w), ignore_index=ignore_index, reduction="none"
    ).unsqueeze(1)
    pixel_loss = pixel_loss * kept_mask
    loss = pixel_loss.mean() / (kept_mask.mean() + PADDLESEG_EPS)
    return loss, kept_mask.squeeze(1).bool()


def hrnet_ohem_reference(
    score: Tensor,
    target: Tensor,
    thres: float = 0.7,
    min_kept: int = 100000,
    ignore_label: int = -1,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """HRNet-Semantic-Segmentation ``OhemCrossEntropy`` (the OHEM term of its forward).

    Source: HRNet/HRNet-Semantic-Segmentation ``lib/core/criterion.py`` @
    0bbb2880446ddff2d78f8dd7e8c4c610151d5a51 (HRNet-OCR, the default branch,
    ``_ohem_forward``); the same body on ``master`` @
    8037a7fb867b58d885b26b1ceb8283a7ee252851 and ``pytorch-v1.1`` @
    88419ab18813f2c9193985e2d4d31d3d07abe839 (``forward``, ``F.upsample``).

    Assumes ``score`` and ``target`` have equal spatial sizes (the peer bilinearly
    upsamples ``score`` to the target first; a ValueError here instead). With
    ``NUM_OUTPUTS > 1`` the peer's forward applies this term to the last output only
    (plain CE to the others), each times ``LOSS.BALANCE_WEIGHTS``; not modelled.

    Semantics:

    - ``min_kept = max(1, min_kept)``, for the whole batch (not per image).
    - p = softmax target-class probability (ignored pixels gather class 0, then are
      dropped); ``sorted_p`` = valid p ascending; ``min_value = sorted_p[min(min_kept,
      V - 1)]``; ``threshold = max(min_value, thres)``; kept = ``sorted_p < threshold``.
    - loss = mean of the kept pixels' CE (``nn.CrossEntropyLoss(weight, ignore_index,
      reduction='none')``: class weights scale each pixel's loss, the mean is unweighted).

    Quirks observed:

    - Strict ``<`` against a threshold taken from the pixels themselves: when the pixels
      at and below ``min_value`` tie (e.g. all equally easy, ``p >= thres``), nothing is
      kept and the loss is ``mean([])`` = NaN.
    - ``min_kept >= V``: ``min_value`` is the largest p, so the most confident pixel(s)
      are dropped unless ``thres`` is above them.
    - All-ignored batch: ``sorted_p[-1]`` on an empty tensor raises IndexError.
    - Kept count is ``min_kept`` when untied (index ``min_kept`` is the (min_kept+1)-th
      smallest), more if ``thres`` is higher.

    Returns ``(loss, kept)`` with ``kept`` bool, the shape of ``target``.
    """
    if score.shape[2:] != target.shape[1:]:
        raise ValueError("hrnet_ohem_reference assumes score and target of equal H, W")
    min_kept = max(1, min_kept)
    pred = F.softmax(score, dim=1)
    pixel_losses = F.cross_entropy(
        score, target, weight=weight, ignore_index=ignore_label, reduction="none"
    ).reshape(-1)
    mask = target.reshape(-1) != ignore_label
    gather_target = target.clone()
    gather_target[gather_target == ignore_label] = 0
    pred = pred.gather(1, gather_target.unsqueeze(1)).reshape(-1)[mask]
    pred, ind = pred.sort()
    min_value = pred[min(min_kept, pred.numel() - 1)]  # IndexError when no valid pixel
    threshold = max(min_value, thres)
    below = pred < threshold
    kept_losses = pixel_losses[mask][ind][below]
    kept = torch.zeros_like(mask)
    kept[mask.nonzero().squeeze(1)[ind][below]] = True
    return kept_losses.mean(), kept.reshape(target.shape)


def bisenet_ohem_reference(
    logits: Tensor,
    labels: Tensor,
    thresh: float = 0.7,
    ignore_lb: int = 255,
) -> tuple[Tensor, Tensor]:
    """CoinCheung/BiSeNet ``OhemCELoss``.

    Source: CoinCheung/BiSeNet ``lib/ohem_ce_loss.py`` @
    6b4b67a8e3eb0cc23b3d7a94843a7c3c11dedca8 (HEAD; last change to the file
    a54e37a7b2c683544c0aaccb87b26012315d6dd0); ``old/bisenetv2/ohem_ce_loss.py`` is the
    same loss (its argument is spelled ``ignore_lb``, the current one ``lb_ignore``).

    Semantics:

    - ``loss_thresh = -log(thresh)`` as a float32 tensor (the peer puts it on CUDA).
    - ``n_min = #(labels != ignore_lb) // 16`` over the whole batch.
    - per-pixel CE (0 at ignored pixels), flattened over the batch;
      hard = ``loss > loss_thresh`` (strict); if ``#hard < n_min`` the ``n_min``
      largest losses are kept instead (``topk`` over every pixel), else all hard ones.
    - loss = mean of the kept losses.

    Quirks observed:

    - ``n_min`` is fixed at 1/16 of the valid pixels (no ``min_kept`` parameter), and
      there is no upper cap: all hard pixels are kept when they are at least ``n_min``.
    - The ``topk`` fallback ranks ignored pixels too (their loss is 0); they can be
      picked when ties at 0 reach the cut, which does not change the mean.
    - Nothing kept (``n_min == 0``, i.e. fewer than 16 valid pixels, and no hard pixel)
      gives ``mean([])`` = NaN; an all-ignored batch is NaN.
    - ``topk`` tie order is unspecified; here stable (lower flat index first). It only
      changes which tied pixels the mask holds, never the loss value.

    Returns ``(loss, kept)`` with ``kept`` bool, the shape of ``labels``.
    """
    loss_thresh = -torch.log(torch.tensor(thresh, dtype=torch.float, device=logits.device))
    n_min = labels[labels != ignore_lb].numel() // 16
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_lb, reduction="none").reshape(-1)
    kept = loss > loss_thresh
    if int(kept.sum()) < n_min:
        kept = torch.zeros_like(kept)
        kept[_stable_descending(loss)[:n_min]] = True
    return loss[kept].mean(), kept.reshape(labels.shape)


def ssd_hard_negatives_reference(
    cls_logits: Tensor,
    cls_targets: Tensor,
    neg_to_pos_ratio: float = 3.0,
    return_counts: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """torchvision SSD hard negative mining: the classification part of ``SSD.compute_loss``.

    Source: pytorch/vision ``torchvision/models/detection/ssd.py`` @
    16daea1cedf75c367da12816d875f3811aeda602 (the same classification code @
    01fdb48883a534c746b1c60683a6eb4d70e72db6). ``neg_to_pos_ratio`` is the peer's
    ``(1 - positive_fraction) / positive_fraction`` (3.0 for the default 0.25).

    ``cls_logits`` (N, A, C), ``cls_targets`` (N, A) with 0 the background class.

    Semantics:

    - ``cls_loss`` = per-anchor CE (N, A); foreground = ``cls_targets > 0``.
    - per image i: ``num_negative_i = ratio * P_i`` (float); the image's anchors are
      ranked by ``cls_loss`` descending with foreground anchors set to ``-inf`` (so they
      rank last); anchors whose rank is ``< num_negative_i`` are the "background"
      picks, i.e. the top ``ceil(ratio * P_i)`` ranks.
    - loss = ``(sum of foreground CE + sum of picked CE) / max(1, sum_i P_i)``: one
      normalizer for the batch, the number of positives.

    Quirks observed:

    - When ``ceil(ratio * P_i)`` exceeds the image's negative count, the ranks past the
      negatives are foreground anchors: they are picked as "background" too and their
      CE is counted twice (the peer's commented-out ``isfinite`` guard would prevent it).
    - An image with no positive picks no negative (its anchors contribute nothing).
    - The normalizer counts positives only, not the picked negatives.
    - The peer counts ``num_foreground`` from matched anchors (``matched_idxs >= 0``)
      and foreground from ``cls_targets > 0``; they differ only if a ground truth
      carries label 0. Here both come from ``cls_targets > 0``.
    - ``sort(descending=True)`` tie order is unspecified in the peer; here stable (the
      lower anchor index first). Ties among negatives change the mask, not the loss.
      In the double-counting case all positives tie at ``-inf``, so which of them are
      counted twice is up to that order (here: the lowest-index positives), and the
      loss depends on it unless their losses are equal.

    Returns ``(loss, selected)`` with ``selected`` = foreground | picked, bool (N, A);
    with ``return_counts`` also the int (N, A) multiplicity each anchor's CE has in the
    loss sum (2 for a double-counted positive).
    """
    num_classes = cls_logits.size(-1)
    cls_loss = F.cross_entropy(
        cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1), reduction="none"
    ).reshape(cls_targets.shape)
    foreground = cls_targets > 0
    num_foreground = int(foreground.sum())
    num_negative = neg_to_pos_ratio * foreground.sum(1, keepdim=True)
    negative_loss = cls_loss.clone()
    negative_loss[foreground] = -float("inf")
    order = torch.sort(negative_loss, dim=1, descending=True, stable=True).indices
    rank = order.argsort(dim=1)
    picked = rank < num_negative
    normalizer = max(1, num_foreground)
    loss = (cls_loss[foreground].sum() + cls_loss[picked].sum()) / normalizer
    selected = foreground | picked
    if return_counts:
        return loss, selected, foreground.long() + picked.long()
    return loss, selected


def mmdet_ohem_reference(
    cls_score: Tensor,
    labels: Tensor,
    image_index: Tensor,
    num: int = 512,
    pos_fraction: float = 0.25,
    neg_pos_ub: float = -1,
) -> Tensor:
    """mmdetection ``OHEMSampler`` through ``BaseSampler.sample``, per image.

    Source (open-mmlab/mmdetection):

    - ``mmdet/models/task_modules/samplers/ohem_sampler.py`` @
      9a8ed3fcd27a3cdc8576f3048980480f48f25b9b (3.x; same @
      0c5159285b4d69e75679c2e34a08415fe2bec8d8; 2.x at
      ``mmdet/core/bbox/samplers/ohem_sampler.py``);
    - ``mmdet/models/task_modules/samplers/base_sampler.py`` @
      0c5159285b4d69e75679c2e34a08415fe2bec8d8 (``sample``);
    - ``BBoxHead.loss`` (``mmdet/models/roi_heads/bbox_heads/bbox_head.py``):
      ``loss_cls(cls_score, labels, label_weights=1, avg_factor, reduction_override=
      'none')`` = per-RoI CE (times ``loss_weight``, which does not change the order).

    ``cls_score`` (R, C) with C = num_classes + 1; ``labels`` (R,): ``C - 1`` (=
    num_classes) is background (mmdet >= 2.0), ``0 .. C-2`` a positive's class, and
    ``-1`` (an extension here) an ignored RoI (``gt_inds == -1``: neither pool).
    ``image_index`` (R,): the image each RoI belongs to; the peer samples each image
    separately (the RoI head loops over images). ``add_gt_as_proposals`` is assumed
    False (with True the peer first prepends the ground truths as positive RoIs).

    Semantics per image:

    - positives: ``num_expected_pos = int(num * pos_fraction)``; if the image has at
      most that many positives all are taken, else the ``num_expected_pos`` of highest
      CE against their own labels (``topk``).
    - negatives: ``num_expected_neg = num - #positives sampled``; if ``neg_pos_ub >= 0``
      it is capped at ``int(neg_pos_ub * max(1, #positives sampled))``; if the image
      has at most that many negatives all are taken, else the ``num_expected_neg`` of
      highest CE against the background label.

    Quirks observed:

    - ``int()`` truncation of ``num * pos_fraction`` and ``neg_pos_ub * pos``.
    - Mining happens only when a pool is over its quota; below it the whole pool is
      taken, so fewer than ``num`` RoIs may be sampled. Unused positive quota goes to
      negatives (``num - #pos``), not the reverse.
    - ``neg_pos_ub`` uses ``max(1, #pos)``: an image without positives still gets up to
      ``int(neg_pos_ub)`` negatives.
    - The peer keeps ``torch.topk``'s order among tied losses (unspecified); here the
      lower RoI index wins ties. Sampled indices are then ``unique()``-d (no effect).

    Returns the bool (R,) mask of sampled RoIs (positives and negatives).
    """
    background = cls_score.size(1) - 1
    ignored = labels < 0
    loss = F.cross_entropy(cls_score, labels.clamp(min=0), reduction="none")
    selected = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)

    def take(pool: Tensor, quota: int) -> Tensor:
        if pool.numel() <= quota:
            return pool
        return pool[_stable_descending(loss[pool])[:quota]]

    for image in image_index.unique():
        in_image = image_index == image
        pos_pool = (in_image & ~ignored & (labels != background)).nonzero().squeeze(1)
        neg_pool = (in_image & ~ignored & (labels == background)).nonzero().squeeze(1)
        pos = take(pos_pool, int(num * pos_fraction)).unique()
        num_expected_neg = num - pos.numel()
        if neg_pos_ub >= 0:
            neg_upper_bound = int(neg_pos_ub * max(1, pos.numel()))
            num_expected_neg = min(num_expected_neg, neg_upper_bound)
        neg = take(neg_pool, num_expected_neg).unique()
        selected[pos] = True
        selected[neg] = True
    return selected
