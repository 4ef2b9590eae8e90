"""The peer references of tests/peers.py: the peers' own unit tests, transcribed, and
small hand-computed cases for each documented semantic and quirk.

These test the references themselves (that they say what the peers' code does); they
do not touch dist_ohem. Peer unit tests found: mmsegmentation ``tests/test_sampler.py``
(@ 0f2ba828a5bb046db510f148a8cf59e8a7120a8c), mmdetection ``tests/test_sampler.py``
(2.x, @ 02fc94722ae8fe2e2e8bb0aa19af01e94a3dbc17) and torchvision
``test/test_models_detection_negative_samples.py`` (``test_forward_negative_sample_ssd``).
None found for PaddleSeg's ``OhemCrossEntropyLoss``, HRNet's ``OhemCrossEntropy`` or
BiSeNet's ``OhemCELoss`` (the latter two repositories have no unit tests).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.peers import (
    bisenet_ohem_reference,
    hrnet_ohem_reference,
    mmdet_ohem_reference,
    mmseg_ohem_reference,
    paddleseg_ohem_reference,
    ssd_hard_negatives_reference,
)

P6 = [0.1, 0.2, 0.3, 0.4, 0.9, 0.95]


def _two_class(probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, 1, W) float64 logits, class-0 probability ``probs[n][w]``; (N, 1, W) labels 0."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).unsqueeze(2)
    return logits, torch.zeros(p.shape, dtype=torch.long).unsqueeze(1)


def _ce(probs: list[float]) -> torch.Tensor:
    return -torch.tensor(probs, dtype=torch.float64).log()


def _mask(bits: list[list[int]]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool).unsqueeze(1)


# ---------------------------------------------------------------------------- mmseg


@pytest.mark.parametrize("seed", [0, 1])
def test_mmseg_peer_test_sampler(seed: int) -> None:
    """mmseg tests/test_sampler.py ``test_ohem_sampler`` (+ ``_multiple_loss``: two CE
    losses rank by 2*CE, the same order, so the same assertions hold)."""
    torch.manual_seed(seed)
    with pytest.raises(AssertionError):
        mmseg_ohem_reference(
            torch.randn(1, 19, 45, 45), torch.randint(0, 19, (1, 1, 89, 89)), None, 100000
        )
    seg_logit = torch.randn(1, 19, 45, 45)
    seg_label = torch.randint(0, 19, size=(1, 1, 45, 45))
    _, kept = mmseg_ohem_reference(seg_logit, seg_label, thresh=0.7, min_kept=200)
    assert kept.shape[0] == seg_logit.shape[0]
    assert kept.shape[1:] == seg_logit.shape[2:]
    assert kept.sum() > 200
    seg_logit = torch.randn(1, 19, 45, 45)
    seg_label = torch.randint(0, 19, size=(1, 1, 45, 45))
    _, kept = mmseg_ohem_reference(seg_logit, seg_label, thresh=None, min_kept=200)
    assert kept.shape[0] == seg_logit.shape[0]
    assert kept.shape[1:] == seg_logit.shape[2:]
    assert kept.sum() == 200


def test_mmseg_min_kept_assertion() -> None:
    logits, labels = _two_class([P6])
    with pytest.raises(AssertionError):
        mmseg_ohem_reference(logits, labels, thresh=0.7, min_kept=1)


def test_mmseg_threshold_from_index_batch_kept_and_normalized_by_all_pixels() -> None:
    logits, labels = _two_class([P6])
    # sorted_p[2] = 0.3 > thresh: keep p < 0.3 (exactly batch_kept = 2 pixels)
    loss, kept = mmseg_ohem_reference(logits, labels, thresh=0.25, min_kept=2)
    assert kept.tolist() == _mask([[1, 1, 0, 0, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.1, 0.2]).sum() / 6)
    # thresh above sorted_p[2]: keep p < thresh (more than batch_kept)
    loss, kept = mmseg_ohem_reference(logits, labels, thresh=0.35, min_kept=2)
    assert kept.tolist() == _mask([[1, 1, 1, 0, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.1, 0.2, 0.3]).sum() / 6)


def test_mmseg_avg_non_ignore_and_ignored_pixels() -> None:
    logits, labels = _two_class([P6])
    labels[0, 0, 0] = 255  # p = 0.1 ignored
    loss, kept = mmseg_ohem_reference(logits, labels, thresh=0.25, min_kept=2)
    # valid sorted p = [.2 .3 .4 .9 .95]; index 2 -> 0.4; keep p < 0.4 among valid
    assert kept.tolist() == _mask([[0, 1, 1, 0, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.2, 0.3]).sum() / 6)  # N*H*W, ignored included
    loss, _ = mmseg_ohem_reference(logits, labels, 0.25, 2, avg_non_ignore=True)
    assert torch.allclose(loss, _ce([0.2, 0.3]).sum() / 5)  # non-ignored, not kept
    assert torch.equal(
        mmseg_ohem_reference(logits, torch.full_like(labels, 255), 0.7, 2)[0],
        torch.zeros((), dtype=torch.float64),
    )


def test_mmseg_batch_kept_is_min_kept_times_n_pooled() -> None:
    logits, labels = _two_class([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    # batch_kept = 2 * 2 = 4 over the pooled batch: T = sorted_p[4] = 0.5
    loss, kept = mmseg_ohem_reference(logits, labels, thresh=0.05, min_kept=2)
    assert kept.tolist() == _mask([[1, 1, 1], [1, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.1, 0.2, 0.3, 0.4]).sum() / 6)


def test_mmseg_batch_kept_above_valid_drops_most_confident() -> None:
    logits, labels = _two_class([[0.5, 0.6, 0.7]])
    _, kept = mmseg_ohem_reference(logits, labels, thresh=0.1, min_kept=5)
    assert kept.tolist() == _mask([[1, 1, 0]]).tolist()
    _, kept = mmseg_ohem_reference(logits, labels, thresh=0.8, min_kept=5)
    assert kept.all()


def test_mmseg_ties_at_threshold_keep_fewer() -> None:
    logits, labels = _two_class([[0.5, 0.5, 0.5, 0.9]])
    loss, kept = mmseg_ohem_reference(logits, labels, thresh=0.1, min_kept=2)
    assert not kept.any()
    assert loss.item() == 0.0


def test_mmseg_no_thresh_top_loss_stable_ties() -> None:
    logits, labels = _two_class([[0.5, 0.2, 0.5, 0.9]])
    loss, kept = mmseg_ohem_reference(logits, labels, thresh=None, min_kept=2)
    assert kept.tolist() == _mask([[1, 1, 0, 0]]).tolist()  # tie 0.5: index 0 first
    assert torch.allclose(loss, _ce([0.5, 0.2]).sum() / 4)
    _, kept = mmseg_ohem_reference(logits, labels, thresh=None, min_kept=9)
    assert kept.all()


# ------------------------------------------------------------------------- PaddleSeg


def test_paddleseg_min_kept_minus_one_index() -> None:
    logits, labels = _two_class([P6])
    # t = sorted_p[3 - 1] = 0.3 > thresh: keep p < 0.3, i.e. min_kept - 1 = 2 pixels
    loss, kept = paddleseg_ohem_reference(logits, labels, thresh=0.05, min_kept=3)
    assert kept.tolist() == _mask([[1, 1, 0, 0, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.1, 0.2]).sum() / (2 + 1e-5 * 6))


def test_paddleseg_thresh_above_sorted_value() -> None:
    logits, labels = _two_class([P6])
    loss, kept = paddleseg_ohem_reference(logits, labels, thresh=0.5, min_kept=3)
    assert kept.tolist() == _mask([[1, 1, 1, 1, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.1, 0.2, 0.3, 0.4]).sum() / (4 + 1e-5 * 6))


@pytest.mark.parametrize("min_kept", [0, 6, 100])
def test_paddleseg_no_mining_when_min_kept_zero_or_not_below_valid(min_kept: int) -> None:
    logits, labels = _two_class([P6])
    loss, kept = paddleseg_ohem_reference(logits, labels, thresh=0.5, min_kept=min_kept)
    assert kept.all()
    assert torch.allclose(loss, _ce(P6).sum() / (6 + 1e-5 * 6))


def test_paddleseg_ignored_pixels_and_all_ignored() -> None:
    logits, labels = _two_class([P6])
    labels[0, 0, 0] = 255
    # 5 valid (> min_kept 3): t = sorted valid p[2] = 0.4; ignored p + 1 sorts last
    loss, kept = paddleseg_ohem_reference(logits, labels, thresh=0.05, min_kept=3)
    assert kept.tolist() == _mask([[0, 1, 1, 0, 0, 0]]).tolist()
    assert torch.allclose(loss, _ce([0.2, 0.3]).sum() / (2 + 1e-5 * 6))
    loss, kept = paddleseg_ohem_reference(logits, torch.full_like(labels, 255), 0.7, 3)
    assert not kept.any()
    assert loss.item() == 0.0


def test_paddleseg_label_with_channel_dim_and_pooled_batch() -> None:
    logits, labels = _two_class([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    _, kept = paddleseg_ohem_reference(logits, labels, thresh=0.05, min_kept=5)
    _, kept_4d = paddleseg_ohem_reference(logits, labels.unsqueeze(1), 0.05, 5)
    # min_kept counts the whole batch: t = sorted_p[4] = 0.5, 4 kept over both images
    assert kept.tolist() == kept_4d.tolist() == [[[1, 1, 1]], [[1, 0, 0]]]


# ----------------------------------------------------------------------------- HRNet


def test_hrnet_threshold_and_mean_over_kept() -> None:
    logits, labels = _two_class([P6])
    loss, kept = hrnet_ohem_reference(logits, labels, thres=0.25, min_kept=2)
    assert kept.tolist() == [[[1, 1, 0, 0, 0, 0]]]
    assert torch.allclose(loss, _ce([0.1, 0.2]).mean())
    loss, kept = hrnet_ohem_reference(logits, labels, thres=0.7, min_kept=2)
    assert kept.tolist() == [[[1, 1, 1, 1, 0, 0]]]
    assert torch.allclose(loss, _ce([0.1, 0.2, 0.3, 0.4]).mean())


def test_hrnet_min_kept_counts_the_batch() -> None:
    logits, labels = _two_class([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    _, kept = hrnet_ohem_reference(logits, labels, thres=0.05, min_kept=2)
    assert kept.tolist() == [[[1, 1, 0]], [[0, 0, 0]]]  # not 2 per image


def test_hrnet_tied_easy_pixels_give_nan() -> None:
    logits, labels = _two_class([[0.9, 0.9, 0.9, 0.9]])
    loss, kept = hrnet_ohem_reference(logits, labels, thres=0.7, min_kept=2)
    assert not kept.any()
    assert math.isnan(loss.item())


def test_hrnet_all_ignored_raises_index_error() -> None:
    logits, labels = _two_class([P6])
    with pytest.raises(IndexError):
        hrnet_ohem_reference(logits, torch.full_like(labels, -1))


def test_hrnet_min_kept_above_valid_drops_most_confident_and_ignored() -> None:
    logits, labels = _two_class([[0.3, 0.5, 0.6, 0.7]])
    target = labels.clone()
    target[0, 0, 0] = -1
    loss, kept = hrnet_ohem_reference(logits, target, thres=0.1, min_kept=10)
    assert kept.tolist() == [[[0, 1, 1, 0]]]
    assert torch.allclose(loss, _ce([0.5, 0.6]).mean())


def test_hrnet_unequal_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="equal"):
        hrnet_ohem_reference(torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))


# --------------------------------------------------------------------------- BiSeNet


def _bisenet_batch(probs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = _two_class([probs])
    return logits, labels


def test_bisenet_keeps_all_hard_pixels_when_at_least_n_min() -> None:
    probs = [0.1, 0.2, 0.3] + [0.9] * 29  # 32 valid: n_min = 2, 3 hard (p < 0.7)
    logits, labels = _bisenet_batch(probs)
    loss, kept = bisenet_ohem_reference(logits, labels, thresh=0.7)
    assert kept.flatten().nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.allclose(loss, _ce([0.1, 0.2, 0.3]).mean())


def test_bisenet_topk_fallback_to_n_min() -> None:
    probs = [0.95, 0.1] + [0.9] * 28 + [0.8, 0.85]  # 32 valid: n_min = 2, 1 hard
    logits, labels = _bisenet_batch(probs)
    loss, kept = bisenet_ohem_reference(logits, labels, thresh=0.7)
    assert kept.flatten().nonzero().flatten().tolist() == [1, 30]
    assert torch.allclose(loss, _ce([0.1, 0.8]).mean())


def test_bisenet_topk_ranks_ignored_pixels() -> None:
    logits = torch.tensor([[100.0, -100.0]]).repeat(17, 1).T.reshape(1, 2, 1, 17)
    labels = torch.zeros(1, 1, 17, dtype=torch.long)
    labels[0, 0, 0] = 255  # 16 valid: n_min = 1, every loss is exactly 0
    loss, kept = bisenet_ohem_reference(logits, labels, thresh=0.7)
    assert kept.flatten().nonzero().flatten().tolist() == [0]  # the ignored pixel
    assert loss.item() == 0.0


def test_bisenet_nan_when_nothing_kept() -> None:
    logits, labels = _bisenet_batch([0.9] * 15)  # n_min = 15 // 16 = 0, none hard
    loss, kept = bisenet_ohem_reference(logits, labels, thresh=0.7)
    assert not kept.any()
    assert math.isnan(loss.item())
    loss, _ = bisenet_ohem_reference(logits, torch.full_like(labels, 255))
    assert math.isnan(loss.item())


# ------------------------------------------------------------------------------- SSD


def _ssd_logits(probs: list[list[float]], targets: list[list[int]]) -> tuple:
    """(N, A, 3) logits with probability ``probs`` of each anchor's own target class."""
    p = torch.tensor(probs, dtype=torch.float64)
    t = torch.tensor(targets)
    logits = ((1 - p) / 2).log().unsqueeze(-1).repeat(1, 1, 3)
    logits.scatter_(-1, t.unsqueeze(-1), p.log().unsqueeze(-1))
    return logits, t


def test_ssd_peer_negative_sample_gives_zero() -> None:
    """torchvision test_forward_negative_sample_ssd: images without boxes (all
    background). The peer asserts ``bbox_regression == 0``; the classification term,
    no positive and so no negative picked, is 0 as well."""
    torch.manual_seed(0)
    loss, selected = ssd_hard_negatives_reference(
        torch.randn(2, 10, 2), torch.zeros(2, 10, dtype=torch.long)
    )
    assert loss.item() == 0.0
    assert not selected.any()


def test_ssd_ratio_times_positives_hardest_negatives() -> None:
    logits, targets = _ssd_logits([[0.6, 0.9, 0.2, 0.5, 0.3, 0.8]], [[1, 0, 0, 0, 0, 0]])
    loss, selected, counts = ssd_hard_negatives_reference(logits, targets, return_counts=True)
    assert selected.tolist() == [[1, 0, 1, 1, 1, 0]]
    assert counts.tolist() == [[1, 0, 1, 1, 1, 0]]
    assert torch.allclose(loss, _ce([0.6, 0.2, 0.5, 0.3]).sum() / 1)


def test_ssd_fractional_ratio_rounds_up() -> None:
    logits, targets = _ssd_logits([[0.6, 0.9, 0.2, 0.5, 0.3, 0.8]], [[1, 0, 0, 0, 0, 0]])
    _, selected = ssd_hard_negatives_reference(logits, targets, neg_to_pos_ratio=1.5)
    assert selected.tolist() == [[1, 0, 1, 0, 1, 0]]  # ranks 0, 1 < 1.5


def test_ssd_double_counts_positives_past_the_negatives() -> None:
    logits, targets = _ssd_logits([[0.6, 0.7, 0.4]], [[1, 2, 0]])
    loss, selected, counts = ssd_hard_negatives_reference(logits, targets, return_counts=True)
    # 3 * 2 = 6 "negatives" wanted, 1 exists: ranks 1, 2 are the two positives
    assert selected.tolist() == [[1, 1, 1]]
    assert counts.tolist() == [[2, 2, 1]]
    assert torch.allclose(loss, (2 * _ce([0.6, 0.7]).sum() + _ce([0.4]).sum()) / 2)


def test_ssd_per_image_and_batch_normalizer() -> None:
    probs = [[0.6, 0.2, 0.5, 0.3, 0.8], [0.1, 0.2, 0.3, 0.4, 0.5]]
    logits, targets = _ssd_logits(probs, [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    loss, selected = ssd_hard_negatives_reference(logits, targets, neg_to_pos_ratio=2.0)
    assert selected.tolist() == [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert torch.allclose(loss, _ce([0.6, 0.2, 0.3]).sum() / 1)


def test_ssd_tied_negatives_lower_index_first() -> None:
    logits, targets = _ssd_logits([[0.6, 0.5, 0.5, 0.5]], [[1, 0, 0, 0]])
    _, selected = ssd_hard_negatives_reference(logits, targets, neg_to_pos_ratio=2.0)
    assert selected.tolist() == [[1, 1, 1, 0]]


# ----------------------------------------------------------------------------- mmdet

# mmdet tests/test_sampler.py: 4 proposals, MaxIoUAssigner(pos_iou_thr=0.5,
# neg_iou_thr=0.5, ignore_iof_thr=0.5, ignore_wrt_candidates=False), OHEMSampler(num=10,
# pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=True). The assignment, derived by
# hand: box 0 matches gt 0 (IoU 0.9, label 1); box 2 goes to gt 1 through the low-quality
# match (its best IoU, 0.15, label 2); boxes 1 and 3 are negatives (box 3's overlap with
# the ignore region is 48/100 of that region, not above 0.5). add_gt_as_proposals
# prepends the two gts as positive rows. The peer asserts only that the sampled boxes and
# indices agree in number; the counts are below both quotas, so every row is sampled.
NUM_CLASSES = 80  # the peer test's Faster R-CNN (COCO): background label 80


def test_mmdet_peer_ohem_sampler() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([1, 2, 1, NUM_CLASSES, 2, NUM_CLASSES])  # gt0, gt1, box0..box3
    selected = mmdet_ohem_reference(
        torch.randn(6, NUM_CLASSES + 1), labels, torch.zeros(6), num=10, pos_fraction=0.5
    )
    assert selected.all()
    assert (labels[selected] != NUM_CLASSES).sum() == 4


def test_mmdet_peer_ohem_sampler_empty_gt() -> None:
    torch.manual_seed(0)
    labels = torch.full((4,), NUM_CLASSES)  # no gt: all four boxes negative
    selected = mmdet_ohem_reference(
        torch.randn(4, NUM_CLASSES + 1), labels, torch.zeros(4), num=10, pos_fraction=0.5
    )
    assert selected.all()


def test_mmdet_peer_ohem_sampler_empty_pred() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([1, 2, 2, 3])  # no proposal: the 4 gts, added as positives
    selected = mmdet_ohem_reference(
        torch.randn(4, NUM_CLASSES + 1), labels, torch.zeros(4), num=10, pos_fraction=0.5
    )
    assert selected.all()


def _roi_scores(losses_by_row: list[float], labels: list[int]) -> torch.Tensor:
    """(R, C) logits whose CE against ``labels`` increases with ``losses_by_row``."""
    score = torch.zeros(len(labels), NUM_CLASSES + 1, dtype=torch.float64)
    for row, (hard, label) in enumerate(zip(losses_by_row, labels, strict=True)):
        score[row, label] = -hard
    return score


def test_mmdet_int_truncation_and_hard_positives() -> None:
    labels = [0, 1, 2, 0, 1, NUM_CLASSES, NUM_CLASSES]
    score = _roi_scores([1.0, 5.0, 2.0, 4.0, 3.0, 1.0, 2.0], labels)
    selected = mmdet_ohem_reference(
        score, torch.tensor(labels), torch.zeros(7), num=10, pos_fraction=0.25
    )
    # int(10 * 0.25) = 2 of the 5 positives: rows 1 and 3 (highest CE); both negatives
    assert selected.tolist() == [False, True, False, True, False, True, True]


def test_mmdet_negatives_fill_unused_quota_and_are_mined() -> None:
    labels = [0] + [NUM_CLASSES] * 6
    score = _roi_scores([1.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0], labels)
    selected = mmdet_ohem_reference(
        score, torch.tensor(labels), torch.zeros(7), num=4, pos_fraction=0.5
    )
    # 1 positive (quota 2) -> 4 - 1 = 3 negatives: the 3 highest CE
    assert selected.tolist() == [True, False, True, False, True, False, True]


def test_mmdet_neg_pos_ub_truncation() -> None:
    labels = [0] + [NUM_CLASSES] * 6
    score = _roi_scores([1.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0], labels)
    selected = mmdet_ohem_reference(
        score, torch.tensor(labels), torch.zeros(7), num=10, neg_pos_ub=2.5
    )
    # int(2.5 * max(1, 1)) = 2 negatives
    assert selected.tolist() == [True, False, True, False, True, False, False]
    no_pos = [NUM_CLASSES] * 4
    selected = mmdet_ohem_reference(
        _roi_scores([1.0, 3.0, 2.0, 4.0], no_pos),
        torch.tensor(no_pos),
        torch.zeros(4),
        num=10,
        neg_pos_ub=1,
    )
    assert selected.tolist() == [False, False, False, True]  # max(1, 0) positives


def test_mmdet_per_image_and_ties_and_ignored() -> None:
    labels = [NUM_CLASSES, NUM_CLASSES, NUM_CLASSES, -1, NUM_CLASSES, NUM_CLASSES]
    score = _roi_scores([2.0, 2.0, 2.0, 9.0, 1.0, 3.0], [max(0, x) for x in labels])
    selected = mmdet_ohem_reference(
        score, torch.tensor(labels), torch.tensor([0, 0, 0, 0, 1, 1]), num=1
    )
    # each image samples its own quota (1 negative); ties: the lower index; -1 ignored
    assert selected.tolist() == [True, False, False, False, False, True]
