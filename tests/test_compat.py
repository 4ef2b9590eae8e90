"""dist_ohem.compat presets against the peers' plain-torch references (tests/peers.py).

One process: on random cases (random, tie-heavy, all-easy, all-hard logits; ignored
pixels; ``min_kept`` above the valid count; float32, float16 and bfloat16 logits) each
preset selects the reference's mask and returns its loss value, except where one of the
departures its docstring names applies. Each such situation is detected by a condition
written here (``departures`` of each test); there the preset must do what its docstring
says instead, checked against a brute-force statement of that behaviour (``documented``:
sort, take the first M, ties to the lower index; probabilities compared in float64). The
brute force is also checked where no departure applies, and every departure has an
explicit case below. The peers' own unit tests (as transcribed in tests/test_peers.py)
are ported where they apply.

Several ranks: the DDP gradient after ``loss.backward()`` equals the gradient of the same
preset in one process on the concatenated batch (per-GPU ``min_kept`` times W), on both
selector paths, with uneven ranks, a rank whose pixels are all ignored and an empty rank.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import compat
from dist_ohem.comm import get_rank
from tests.parity import rank_slice
from tests.peers import (
    MMSEG_AVG_EPS,
    PADDLESEG_EPS,
    bisenet_ohem_reference,
    hrnet_ohem_reference,
    mmdet_ohem_reference,
    mmseg_ohem_reference,
    paddleseg_ohem_reference,
    ssd_hard_negatives_reference,
)
from tests.test_peers import NUM_CLASSES, P6, _ce, _mask, _roi_scores, _ssd_logits, _two_class

REL = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STYLES = ["random", "ties", "easy", "hard", "mixed"]
#: Examples per W=1 property (COMPAT_EXAMPLES=2000 for a longer hunt).
EXAMPLES = int(os.environ.get("COMPAT_EXAMPLES", "150"))


def rel_tol(dtype: torch.dtype) -> float:
    """Loss tolerance: 1e-5, or two units in the last place of a half-precision loss: the
    preset returns it in the logits' dtype, rounded twice (the sum, then the scaled sum);
    the references and the brute force partly in float32 or float64."""
    return REL if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps


def close(got: torch.Tensor | float, want: torch.Tensor | float, dtype: torch.dtype) -> bool:
    return math.isclose(float(got), float(want), rel_tol=rel_tol(dtype), abs_tol=1e-12)


# ------------------------------------------------------------------------------ cases


def make_logits(gen, target, classes, style, dtype):
    """(N, C, ...) logits for ``target`` (N, ...) in one of STYLES."""
    shape = (target.shape[0], classes, *target.shape[1:])
    onehot = F.one_hot(target.clamp(0, classes - 1), classes).movedim(-1, 1).float()
    random = torch.randn(shape, generator=gen) * 3
    ties = torch.randint(0, 3, shape, generator=gen).float()  # few values: tied p and CE
    easy, hard = onehot * 20, onehot * -20
    if style == "mixed":
        pick = torch.randint(0, 4, (target.shape[0], 1, *target.shape[1:]), generator=gen)
        logits = torch.where(pick == 0, random, torch.where(pick == 1, ties, easy))
        logits = torch.where(pick == 3, hard, logits)
    else:
        logits = {"random": random, "ties": ties, "easy": easy, "hard": hard}[style]
    return logits.to(dtype)


@st.composite
def seg_cases(draw, ignore_value=255, side=(1, 6)):
    """``(logits (N, C, H, W), labels (N, H, W))``: 1-3 images of ``side`` pixels a side."""
    n, classes = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    h, w = draw(st.integers(*side)), draw(st.integers(*side))
    style, dtype = draw(st.sampled_from(STYLES)), draw(st.sampled_from(DTYPES))
    ignored = draw(st.sampled_from([0.0, 0.1, 0.3, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    labels = torch.randint(0, classes, (n, h, w), generator=gen)
    logits = make_logits(gen, labels, classes, style, dtype)
    labels[torch.rand(n, h, w, generator=gen) < ignored] = ignore_value
    return logits, labels


def pixels(logits, labels, ignore):
    """Flat float64 target probability (computed in the logits' dtype), CE and valid."""
    index = torch.where(labels == ignore, 0, labels).unsqueeze(1)
    p = logits.softmax(1).gather(1, index).squeeze(1).flatten().double()
    ce = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="none").flatten()
    return p, ce.double(), (labels != ignore).flatten()


def first(keys: torch.Tensor, valid: torch.Tensor, m: int) -> torch.Tensor:
    """Flat bool mask of the first ``m`` valid instances by (key, index)."""
    order = torch.sort(torch.where(valid, keys, math.inf), stable=True).indices
    mask = torch.zeros_like(valid)
    mask[order[: max(0, min(m, int(valid.sum())))]] = True
    return mask


def least_probable(p, valid, thresh, floor):
    """Documented probability rule: every valid p < thresh (float64), but at least
    ``min(V, floor)`` of the least probable, ties to the lower index."""
    below = int((valid & (p < thresh)).sum())
    return first(p, valid, max(below, min(int(valid.sum()), floor)))


def thresh_in(dtype, thresh):
    return float(torch.tensor(thresh, dtype=dtype))


def precision_departs(values, valid, thresh, dtype, above=False):
    """mmseg's fourth departure: some valid value is on different sides of ``thresh`` in
    float64 and of ``thresh`` rounded to ``dtype`` (how the peers compare)."""
    rounded = thresh_in(dtype, thresh)
    if above:
        return bool((valid & ((values > thresh) != (values > rounded))).any())
    return bool((valid & ((values < thresh) != (values < rounded))).any())


def tied_at_cut(p, valid, cut, thresh):
    """The peers' value cut: sorted valid p at ``cut`` is at or above ``thresh`` and ties
    with the one before, so strict ``<`` keeps fewer than ``cut``."""
    s = p[valid].sort().values
    return 1 <= cut < s.numel() and bool(s[cut] >= thresh) and bool(s[cut - 1] == s[cut])


def saturated(p, valid, cut, thresh):
    """The peers' cut index reaches the valid count and ``thresh`` is not above the most
    confident pixel: they drop it (them)."""
    s = p[valid].sort().values
    return 0 < s.numel() <= cut and not bool(s[-1] < thresh)


def compared(departures: dict[str, bool]) -> bool:
    """True when no departure applies (then the peer's result is the preset's); records
    which did, for ``--hypothesis-show-statistics``."""
    applied = [name for name, applies in departures.items() if applies]
    event("departure: " + (", ".join(applied) or "none"))
    return not applied


def flat_mask(preset) -> torch.Tensor:
    return preset.last.mask.flatten()


# ------------------------------------------------------------------------- mmseg


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    case=seg_cases(),
    thresh=st.sampled_from([None, 0.05, 0.3, 0.5, 0.7, 0.9]),
    min_kept=st.integers(2, 40),
    avg_non_ignore=st.booleans(),
)
def test_mmseg_matches_the_peer(case, thresh, min_kept, avg_non_ignore):
    logits, labels = case
    preset = compat.mmseg_ohem(thresh, min_kept, avg_non_ignore=avg_non_ignore)
    loss = preset(logits, labels)
    ref_loss, ref_kept = mmseg_ohem_reference(
        logits, labels, thresh, min_kept, avg_non_ignore=avg_non_ignore
    )
    p, ce, valid = pixels(logits, labels, 255)
    batch_kept = min_kept * labels.shape[0]
    if thresh is None:
        documented = first(-ce, valid, batch_kept)
        departures = {}
    else:
        documented = least_probable(p, valid, thresh, batch_kept)
        departures = {
            "ties at the cut": tied_at_cut(p, valid, batch_kept, thresh),
            "min_kept*N >= valid": saturated(p, valid, batch_kept, thresh),
            "float64 compare": precision_departs(p, valid, thresh, logits.dtype),
        }
    divisor = max(1, int(valid.sum())) if avg_non_ignore else labels.numel()
    assert torch.equal(flat_mask(preset), documented)
    assert close(loss, ce[documented].sum() / divisor, logits.dtype)
    if compared(departures):
        assert torch.equal(preset.last.mask, ref_kept)
        assert close(loss, ref_loss, logits.dtype)  # the eps of avg_non_ignore: < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_mmseg_peer_test_sampler(seed):
    """mmseg tests/test_sampler.py ``test_ohem_sampler`` on the preset (its size-mismatch
    assertion becomes the preset's input error)."""
    torch.manual_seed(seed)
    with pytest.raises(ValueError, match="size mismatch"):
        compat.mmseg_ohem(min_kept=100000)(
            torch.randn(1, 19, 45, 45), torch.randint(0, 19, (1, 89, 89))
        )
    seg_logit, seg_label = torch.randn(1, 19, 45, 45), torch.randint(0, 19, (1, 45, 45))
    preset = compat.mmseg_ohem(thresh=0.7, min_kept=200)
    preset(seg_logit, seg_label)
    assert preset.last.mask.shape == seg_label.shape
    assert preset.last.mask.sum() > 200
    seg_logit, seg_label = torch.randn(1, 19, 45, 45), torch.randint(0, 19, (1, 45, 45))
    preset = compat.mmseg_ohem(thresh=None, min_kept=200)
    preset(seg_logit, seg_label)
    assert preset.last.mask.sum() == 200


def test_mmseg_hand_cases_of_the_peer_tests():
    """tests/test_peers.py's mmseg cases where no departure applies: the same result."""
    logits, labels = _two_class([P6])
    for thresh, kept in ((0.25, [[1, 1, 0, 0, 0, 0]]), (0.35, [[1, 1, 1, 0, 0, 0]])):
        preset = compat.mmseg_ohem(thresh, 2)
        loss = preset(logits, labels)
        assert preset.last.mask.tolist() == _mask(kept).tolist()
        assert torch.allclose(loss, _ce([0.1, 0.2, 0.3][: sum(kept[0])]).sum() / 6)
    labels[0, 0, 0] = 255
    preset = compat.mmseg_ohem(0.25, 2)
    assert torch.allclose(preset(logits, labels), _ce([0.2, 0.3]).sum() / 6)
    assert preset.last.mask.flatten().tolist() == [0, 1, 1, 0, 0, 0]
    loss = compat.mmseg_ohem(0.7, 2)(logits, torch.full_like(labels, 255))
    assert loss.item() == 0.0
    logits, labels = _two_class([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # min_kept * N pooled
    preset = compat.mmseg_ohem(0.05, 2)
    assert torch.allclose(preset(logits, labels), _ce([0.1, 0.2, 0.3, 0.4]).sum() / 6)
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 1, 0, 0]
    logits, labels = _two_class([[0.5, 0.2, 0.5, 0.9]])  # thresh None: stable ties
    preset = compat.mmseg_ohem(None, 2)
    assert torch.allclose(preset(logits, labels), _ce([0.5, 0.2]).sum() / 4)
    assert preset.last.mask.flatten().tolist() == [1, 1, 0, 0]


def test_mmseg_departure_ties_at_the_cut_keep_exactly_min_kept_times_n():
    logits, labels = _two_class([[0.5, 0.5, 0.5, 0.9]])
    ref_loss, ref_kept = mmseg_ohem_reference(logits, labels, thresh=0.1, min_kept=2)
    assert not ref_kept.any() and ref_loss.item() == 0.0  # the peer: none
    preset = compat.mmseg_ohem(0.1, 2)
    loss = preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 0, 0]  # 2, the lower indices
    assert torch.allclose(loss, _ce([0.5, 0.5]).sum() / 4)


def test_mmseg_departure_min_kept_at_the_valid_count_keeps_every_valid_pixel():
    logits, labels = _two_class([[0.5, 0.6, 0.7]])
    _, ref_kept = mmseg_ohem_reference(logits, labels, thresh=0.1, min_kept=5)
    assert ref_kept.flatten().tolist() == [1, 1, 0]  # the peer drops the most confident
    preset = compat.mmseg_ohem(0.1, 5)
    loss = preset(logits, labels)
    assert preset.last.mask.all()
    assert torch.allclose(loss, _ce([0.5, 0.6, 0.7]).sum() / 3)


def test_mmseg_departure_avg_non_ignore_without_eps():
    logits, labels = _two_class([P6])
    labels[0, 0, 3:] = 255  # 3 valid
    ref_loss, _ = mmseg_ohem_reference(logits, labels, 0.25, 2, avg_non_ignore=True)
    loss = compat.mmseg_ohem(0.25, 2, avg_non_ignore=True)(logits, labels)
    kept_sum = _ce([0.1, 0.2]).sum()
    assert loss.item() == (kept_sum / 3).item()  # float64: the divisor is 3 exactly
    assert ref_loss.item() == (kept_sum / (3 + MMSEG_AVG_EPS)).item()
    assert loss.item() != ref_loss.item()


def precision_case(dtype):
    """One image, 6 pixels, label 0 of 2 classes: p ~ [.05, .05, v, .99, .99, .99] in
    ``dtype`` and a ``thresh`` just above v that rounds to v in ``dtype``."""
    a = torch.tensor([-3.0, -3.0, 2.0, 5.0, 5.0, 5.0])
    logits = torch.stack([a, torch.zeros(6)]).to(dtype).view(1, 2, 1, 6)
    labels = torch.zeros(1, 1, 6, dtype=torch.long)
    p, _, valid = pixels(logits, labels, 255)
    v = float(p[2])
    thresh = v + (1e-4 if dtype == torch.bfloat16 else 1e-9)
    assert thresh_in(dtype, thresh) == v < thresh < float(p[3])
    assert precision_departs(p, valid, thresh, dtype)
    return logits, labels, thresh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mmseg_departure_threshold_compared_in_float64(dtype):
    """p equal to ``thresh`` rounded to the logits' dtype, just below ``thresh``: the
    peer compares in the dtype (not below), the preset in float64 (below). Also in
    float32 (0.7 is not a float32 either; the docstring names float16/bfloat16)."""
    logits, labels, thresh = precision_case(dtype)
    _, ref_kept = mmseg_ohem_reference(logits, labels, thresh, 2)
    assert ref_kept.flatten().tolist() == [1, 1, 0, 0, 0, 0]
    preset = compat.mmseg_ohem(thresh, 2)
    preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 0, 0, 0]


# ------------------------------------------------------------------------- PaddleSeg


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    case=seg_cases(),
    thresh=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.9]),
    min_kept=st.integers(0, 40),
)
def test_paddleseg_matches_the_peer_called_with_min_kept_plus_one(case, thresh, min_kept):
    """PaddleSeg keeps ``min_kept - 1`` where the preset keeps ``min_kept``: the peer
    called with ``min_kept + 1`` selects the preset's set (also at ``min_kept=0``: the
    threshold alone), and its loss times ``(K + 1e-5 N*H*W) / K`` is the preset's."""
    logits, labels = case
    preset = compat.paddleseg_ohem(thresh, min_kept)
    loss = preset(logits, labels)
    ref_loss, ref_kept = paddleseg_ohem_reference(logits, labels, thresh, min_kept + 1)
    p, ce, valid = pixels(logits, labels, 255)
    documented = least_probable(p, valid, thresh, min_kept)
    num_valid = int(valid.sum())
    departures = {
        "ties at the cut": tied_at_cut(p, valid, min_kept, thresh),
        # min_kept + 1 reaches V: the peer stops mining (keeps V), min_kept - 1 was V - 2
        "min_kept - 1 at V - 1": min_kept == num_valid - 1,
        "float64 compare": precision_departs(p, valid, thresh, logits.dtype),
    }
    kept = int(documented.sum())
    assert torch.equal(flat_mask(preset), documented)
    assert close(loss, ce[documented].sum() / max(1, kept), logits.dtype)
    if compared(departures):
        assert torch.equal(preset.last.mask, ref_kept)
        eps_free = ref_loss * (kept + PADDLESEG_EPS * labels.numel()) / max(1, kept)
        assert close(loss, eps_free, logits.dtype)


def test_paddleseg_hand_cases_of_the_peer_tests():
    logits, labels = _two_class([P6])
    preset = compat.paddleseg_ohem(0.5, 3)  # thresh above the sorted value: p < 0.5
    assert torch.allclose(preset(logits, labels), _ce([0.1, 0.2, 0.3, 0.4]).mean())
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 1, 0, 0]
    for min_kept in (6, 100):  # min_kept >= V: every valid pixel (the peer: no mining)
        preset = compat.paddleseg_ohem(0.5, min_kept)
        assert torch.allclose(preset(logits, labels), _ce(P6).mean())
        assert preset.last.mask.all()
    labels[0, 0, 0] = 255
    preset = compat.paddleseg_ohem(0.05, 3)  # ignored pixel: 3 of the 5 valid
    assert torch.allclose(preset(logits, labels), _ce([0.2, 0.3, 0.4]).mean())
    assert preset.last.mask.flatten().tolist() == [0, 1, 1, 1, 0, 0]
    preset = compat.paddleseg_ohem(0.7, 3)
    assert preset(logits, torch.full_like(labels, 255)).item() == 0.0
    assert not preset.last.mask.any()
    logits, labels = _two_class([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # per batch
    preset = compat.paddleseg_ohem(0.05, 5)
    preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 1, 1, 0]


def test_paddleseg_departure_min_kept_counts_min_kept_pixels():
    logits, labels = _two_class([P6])
    _, ref_kept = paddleseg_ohem_reference(logits, labels, thresh=0.05, min_kept=3)
    assert ref_kept.flatten().tolist() == [1, 1, 0, 0, 0, 0]  # min_kept - 1
    preset = compat.paddleseg_ohem(0.05, 3)
    loss = preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.equal(preset.last.mask, paddleseg_ohem_reference(logits, labels, 0.05, 4)[1])
    assert loss.item() == _ce([0.1, 0.2, 0.3]).mean().item()
    # ties at the cut: the peer keeps fewer still, the preset min_kept, the lower index
    logits, labels = _two_class([[0.1, 0.4, 0.4, 0.4, 0.9]])
    _, ref_kept = paddleseg_ohem_reference(logits, labels, thresh=0.05, min_kept=3)
    assert ref_kept.flatten().tolist() == [1, 0, 0, 0, 0]
    preset = compat.paddleseg_ohem(0.05, 3)
    preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 0, 0]


def test_paddleseg_departure_min_kept_zero_applies_the_threshold():
    logits, labels = _two_class([P6])
    _, ref_kept = paddleseg_ohem_reference(logits, labels, thresh=0.5, min_kept=0)
    assert ref_kept.all()  # the peer: no mining at all
    preset = compat.paddleseg_ohem(0.5, 0)
    loss = preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.allclose(loss, _ce([0.1, 0.2, 0.3, 0.4]).mean())


def test_paddleseg_departure_divides_by_the_kept_count():
    logits, labels = _two_class([P6])
    ref_loss, _ = paddleseg_ohem_reference(logits, labels, thresh=0.5, min_kept=3)
    loss = compat.paddleseg_ohem(0.5, 3)(logits, labels)
    kept_sum = _ce([0.1, 0.2, 0.3, 0.4]).sum()
    assert loss.item() == (kept_sum / 4).item()
    assert torch.allclose(ref_loss, kept_sum / (4 + PADDLESEG_EPS * 6))
    assert loss.item() > ref_loss.item()


# ----------------------------------------------------------------------------- HRNet


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    case=seg_cases(ignore_value=-1),
    thresh=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.9]),
    min_kept=st.integers(0, 40),
)
def test_hrnet_matches_the_peer(case, thresh, min_kept):
    logits, labels = case
    preset = compat.hrnet_ohem(thresh, min_kept)
    loss = preset(logits, labels)
    p, ce, valid = pixels(logits, labels, -1)
    cut = max(1, min_kept)
    documented = least_probable(p, valid, thresh, cut)
    kept = int(documented.sum())
    assert torch.equal(flat_mask(preset), documented)
    assert close(loss, ce[documented].sum() / max(1, kept), logits.dtype)
    departures = {
        "all ignored": not valid.any(),
        "ties at the cut": tied_at_cut(p, valid, cut, thresh),
        "min_kept >= valid": saturated(p, valid, cut, thresh),
        # not named in hrnet_ohem's docstring (mmseg_ohem's fourth departure)
        "float64 compare": precision_departs(p, valid, thresh, logits.dtype),
    }
    if compared(departures):
        ref_loss, ref_kept = hrnet_ohem_reference(logits, labels, thresh, min_kept)
        assert torch.equal(preset.last.mask, ref_kept)
        assert close(loss, ref_loss, logits.dtype)


def test_hrnet_hand_cases_of_the_peer_tests():
    logits, labels = _two_class([P6])
    for thres, kept in ((0.25, [0.1, 0.2]), (0.7, [0.1, 0.2, 0.3, 0.4])):
        preset = compat.hrnet_ohem(thres, 2)
        assert torch.allclose(preset(logits, labels), _ce(kept).mean())
        assert int(preset.last.mask.sum()) == len(kept)
    logits, labels = _two_class([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # per batch, not N
    preset = compat.hrnet_ohem(0.05, 2)
    preset(logits, labels)
    assert preset.last.mask.tolist() == [[[1, 1, 0]], [[0, 0, 0]]]
    preset = compat.hrnet_ohem(0.05, 0)  # floored at 1
    preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 0, 0, 0, 0, 0]


def test_hrnet_departure_tied_easy_pixels_keep_min_kept_not_nan():
    logits, labels = _two_class([[0.9, 0.9, 0.9, 0.9]])
    ref_loss, ref_kept = hrnet_ohem_reference(logits, labels, thres=0.7, min_kept=2)
    assert math.isnan(ref_loss.item()) and not ref_kept.any()
    preset = compat.hrnet_ohem(0.7, 2)
    loss = preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [1, 1, 0, 0]
    assert torch.allclose(loss, _ce([0.9]).squeeze())


def test_hrnet_departure_min_kept_above_valid_keeps_every_valid_pixel():
    logits, labels = _two_class([[0.3, 0.5, 0.6, 0.7]])
    labels[0, 0, 0] = -1
    _, ref_kept = hrnet_ohem_reference(logits, labels, thres=0.1, min_kept=10)
    assert ref_kept.flatten().tolist() == [0, 1, 1, 0]
    preset = compat.hrnet_ohem(0.1, 10)
    loss = preset(logits, labels)
    assert preset.last.mask.flatten().tolist() == [0, 1, 1, 1]
    assert torch.allclose(loss, _ce([0.5, 0.6, 0.7]).mean())


def test_hrnet_departure_all_ignored_selects_nothing():
    logits, labels = _two_class([P6])
    labels = torch.full_like(labels, -1)
    with pytest.raises(IndexError):
        hrnet_ohem_reference(logits, labels)
    preset = compat.hrnet_ohem()
    assert preset(logits, labels).item() == 0.0
    assert not preset.last.mask.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paddleseg_and_hrnet_also_compare_the_threshold_in_float64(dtype):
    """mmseg_ohem's fourth departure holds for these two presets as well (their
    docstrings do not name it): a p equal to ``thresh`` rounded to the dtype is kept."""
    logits, labels, thresh = precision_case(dtype)
    _, ref_kept = paddleseg_ohem_reference(logits, labels, thresh, 2)  # t = p[1] < thresh
    assert ref_kept.flatten().tolist() == [1, 1, 0, 0, 0, 0]
    _, ref_kept = hrnet_ohem_reference(logits, labels.clone(), thresh, 2)
    assert ref_kept.flatten().tolist() == [1, 1, 0, 0, 0, 0]
    for preset in (compat.paddleseg_ohem(thresh, 2), compat.hrnet_ohem(thresh, 2)):
        preset(logits, labels)
        assert preset.last.mask.flatten().tolist() == [1, 1, 1, 0, 0, 0]


# --------------------------------------------------------------------------- BiSeNet


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=seg_cases(side=(3, 9)), thresh=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.9]))
def test_bisenet_matches_the_peer(case, thresh):
    logits, labels = case
    preset = compat.bisenet_ohem(thresh)
    loss = preset(logits, labels)
    ref_loss, ref_kept = bisenet_ohem_reference(logits, labels, thresh)
    _, ce, valid = pixels(logits, labels, 255)
    loss_thresh = float(-torch.log(torch.tensor(thresh, dtype=torch.float32)))
    above = int((valid & (ce > loss_thresh)).sum())
    n_min = int(valid.sum()) // 16
    documented = first(-ce, valid, max(above, n_min))
    kept = int(documented.sum())
    assert torch.equal(flat_mask(preset), documented)
    assert close(loss, ce[documented].sum() / max(1, kept), logits.dtype)
    departures = {
        "fallback ranks ignored": above < n_min and int((valid & (ce > 0)).sum()) < n_min,
        "nothing kept": kept == 0,
        # not named in bisenet_ohem's docstring: the peer compares in the logits' dtype
        "float64 compare": precision_departs(ce, valid, loss_thresh, logits.dtype, above=True),
    }
    if compared(departures):
        assert torch.equal(preset.last.mask, ref_kept)
        assert close(loss, ref_loss, logits.dtype)


def test_bisenet_hand_cases_of_the_peer_tests():
    logits, labels = _two_class([[0.1, 0.2, 0.3] + [0.9] * 29])  # n_min 2, 3 hard
    preset = compat.bisenet_ohem(0.7)
    assert torch.allclose(preset(logits, labels), _ce([0.1, 0.2, 0.3]).mean())
    assert preset.last.mask.flatten().nonzero().flatten().tolist() == [0, 1, 2]
    logits, labels = _two_class([[0.95, 0.1] + [0.9] * 28 + [0.8, 0.85]])  # fallback
    preset = compat.bisenet_ohem(0.7)
    assert torch.allclose(preset(logits, labels), _ce([0.1, 0.8]).mean())
    assert preset.last.mask.flatten().nonzero().flatten().tolist() == [1, 30]


def test_bisenet_departure_fallback_ranks_valid_pixels_only():
    logits = torch.tensor([[100.0, -100.0]]).repeat(17, 1).T.reshape(1, 2, 1, 17)
    labels = torch.zeros(1, 1, 17, dtype=torch.long)
    labels[0, 0, 0] = 255  # 16 valid: n_min = 1, every loss is exactly 0
    _, ref_kept = bisenet_ohem_reference(logits, labels, thresh=0.7)
    assert ref_kept.flatten().nonzero().flatten().tolist() == [0]  # the ignored pixel
    preset = compat.bisenet_ohem(0.7)
    assert preset(logits, labels).item() == 0.0
    assert preset.last.mask.flatten().nonzero().flatten().tolist() == [1]


def test_bisenet_departure_nothing_kept_gives_zero_not_nan():
    logits, labels = _two_class([[0.9] * 15])  # n_min = 0, none hard
    assert math.isnan(bisenet_ohem_reference(logits, labels, thresh=0.7)[0].item())
    preset = compat.bisenet_ohem(0.7)
    assert preset(logits, labels).item() == 0.0 and not preset.last.mask.any()
    ignored = torch.full_like(labels, 255)
    assert math.isnan(bisenet_ohem_reference(logits, ignored)[0].item())
    assert preset(logits, ignored).item() == 0.0 and not preset.last.mask.any()


# ------------------------------------------------------------------------------- SSD


def snapped_floor(x: float) -> int:
    """docs/DESIGN.md §3's ``exact_floor``: floor after snapping within 1e-9 relative."""
    return math.floor(x + 1e-9 * max(1.0, abs(x)))


@st.composite
def ssd_cases(draw):
    """``(cls_logits (N, A, C), cls_targets (N, A))``, background class 0."""
    n, anchors, classes = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(2, 4))
    style, dtype = draw(st.sampled_from(STYLES)), draw(st.sampled_from(DTYPES))
    foreground = draw(st.sampled_from([0.0, 0.1, 0.3, 0.8, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    targets = torch.randint(1, classes, (n, anchors), generator=gen)
    targets[torch.rand(n, anchors, generator=gen) >= foreground] = 0
    logits = make_logits(gen, targets, classes, style, dtype).transpose(1, 2)
    return logits, targets


def ssd_documented(logits, targets, ratio):
    """Every foreground anchor plus, per image, the floor(ratio * P_i) hardest background
    anchors (all of them at most); the sum over the positives of the batch."""
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()
    positive = targets > 0
    mask = positive.clone()
    for i in range(targets.shape[0]):
        wanted = snapped_floor(ratio * int(positive[i].sum()))
        mask[i] |= first(-ce[i], ~positive[i], wanted)
    return mask, ce[mask].sum() / max(1, int(positive.sum()))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=ssd_cases(), ratio=st.sampled_from([3.0, 1.0, 2.0, 0.5, 1.5, 2.5]))
def test_ssd_matches_the_peer(case, ratio):
    logits, targets = case
    preset = compat.ssd_hard_negatives(ratio)
    loss = preset(logits, targets)
    documented, documented_loss = ssd_documented(logits, targets, ratio)
    assert torch.equal(preset.last.mask, documented)
    assert close(loss, documented_loss, logits.dtype)
    positives = (targets > 0).sum(1).tolist()
    negatives = (targets == 0).sum(1).tolist()
    departures = {
        "ceil, not floor": any(ratio * p != snapped_floor(ratio * p) for p in positives),
        "ratio*P_i > negatives": any(
            math.ceil(ratio * p) > n for p, n in zip(positives, negatives, strict=True)
        ),
        # Not a departure of the preset's: in float16/bfloat16 on CPU, torch's CE over
        # torchvision's (N*A, C) layout (log_softmax on the last dim, accumulated in the
        # half dtype) is less exact than over the preset's (N, C, A) one: 0.0049 against
        # 0.0046 (exact) for logits (-3.13, 2.24), target 1, float16.
        "half-precision CE kernel": not torch.equal(
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none"),
            F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").flatten(),
        ),
    }
    if compared(departures):
        ref_loss, ref_selected = ssd_hard_negatives_reference(logits, targets, ratio)
        assert torch.equal(preset.last.mask, ref_selected)
        assert close(loss, ref_loss, logits.dtype)


def test_ssd_hand_cases_of_the_peer_tests():
    torch.manual_seed(0)  # torchvision test_forward_negative_sample_ssd: no box, loss 0
    preset = compat.ssd_hard_negatives()
    assert preset(torch.randn(2, 10, 2), torch.zeros(2, 10, dtype=torch.long)).item() == 0.0
    assert not preset.last.mask.any()
    logits, targets = _ssd_logits([[0.6, 0.9, 0.2, 0.5, 0.3, 0.8]], [[1, 0, 0, 0, 0, 0]])
    loss = preset(logits, targets)
    assert preset.last.mask.tolist() == [[1, 0, 1, 1, 1, 0]]
    assert torch.allclose(loss, _ce([0.6, 0.2, 0.5, 0.3]).sum())
    probs = [[0.6, 0.2, 0.5, 0.3, 0.8], [0.1, 0.2, 0.3, 0.4, 0.5]]
    logits, targets = _ssd_logits(probs, [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    preset = compat.ssd_hard_negatives(2.0)
    assert torch.allclose(preset(logits, targets), _ce([0.6, 0.2, 0.3]).sum())
    assert preset.last.mask.tolist() == [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]]
    logits, targets = _ssd_logits([[0.6, 0.5, 0.5, 0.5]], [[1, 0, 0, 0]])  # tied negatives
    preset(logits, targets)
    assert preset.last.mask.tolist() == [[1, 1, 1, 0]]


def test_ssd_departure_fractional_ratio_is_floored():
    logits, targets = _ssd_logits([[0.6, 0.9, 0.2, 0.5, 0.3, 0.8]], [[1, 0, 0, 0, 0, 0]])
    _, ref_selected = ssd_hard_negatives_reference(logits, targets, neg_to_pos_ratio=1.5)
    assert ref_selected.tolist() == [[1, 0, 1, 0, 1, 0]]  # ceil(1.5) = 2 negatives
    preset = compat.ssd_hard_negatives(1.5)
    loss = preset(logits, targets)
    assert preset.last.mask.tolist() == [[1, 0, 1, 0, 0, 0]]  # floor(1.5) = 1
    assert torch.allclose(loss, _ce([0.6, 0.2]).sum())


def test_ssd_departure_each_anchor_counted_once():
    logits, targets = _ssd_logits([[0.6, 0.7, 0.4]], [[1, 2, 0]])
    ref_loss, _, counts = ssd_hard_negatives_reference(logits, targets, return_counts=True)
    assert counts.tolist() == [[2, 2, 1]]  # the peer: positives picked as negatives too
    assert torch.allclose(ref_loss, (2 * _ce([0.6, 0.7]).sum() + _ce([0.4]).sum()) / 2)
    preset = compat.ssd_hard_negatives()
    loss = preset(logits, targets)
    assert preset.last.mask.all()
    assert torch.allclose(loss, _ce([0.6, 0.7, 0.4]).sum() / 2)


def test_ssd_over_the_batch_and_ignored_anchors():
    """``per_image=False``: the hardest ratio * P negatives of the whole batch; targets
    of -100 are never selected (no peer counterpart: brute force)."""
    probs = [[0.6, 0.2, 0.5, 0.3, 0.8], [0.1, 0.2, 0.3, 0.4, 0.5]]
    logits, targets = _ssd_logits(probs, [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    preset = compat.ssd_hard_negatives(2.0, per_image=False)
    loss = preset(logits, targets)
    # p 0.1, then 0.2 twice: the lower flat index (image 0) wins the tie
    assert preset.last.mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert torch.allclose(loss, _ce([0.6, 0.1, 0.2]).sum())
    targets[1, 0] = -100
    preset(logits, targets)
    assert preset.last.mask.tolist() == [[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]]


# ----------------------------------------------------------------------------- mmdet


@st.composite
def roi_cases(draw):
    """``(cls_score (R, C), labels (R,), image_index (R,))``, background C - 1, -1 ignored;
    RoIs of 1-3 images in any order."""
    images, rois, classes = (
        draw(st.integers(1, 3)),
        draw(st.integers(0, 30)),
        draw(st.integers(2, 5)),
    )
    style, dtype = draw(st.sampled_from(STYLES)), draw(st.sampled_from(DTYPES))
    background = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    labels = torch.randint(0, classes - 1, (rois,), generator=gen)
    draw_bg = torch.rand(rois, generator=gen)
    labels[draw_bg < background] = classes - 1
    scores = make_logits(gen, labels.unsqueeze(0), classes, style, dtype)[0].T
    labels[torch.rand(rois, generator=gen) < 0.1] = -1
    return scores.contiguous(), labels, torch.randint(0, images, (rois,), generator=gen)


def mmdet_documented(scores, labels, image_index, num, pos_fraction, neg_pos_ub):
    """Per image: the hardest min(P, floor(num * f)) positives, then the hardest
    negatives, num minus those at most (and floor(ub * max(1, kept)) with ub >= 0)."""
    ce = F.cross_entropy(scores, labels, ignore_index=-1, reduction="none").double()
    background, valid = scores.shape[1] - 1, labels >= 0
    mask = torch.zeros_like(valid)
    for image in image_index.unique().tolist():
        here = valid & (image_index == image)
        pos, neg = here & (labels != background), here & (labels == background)
        kept_pos = min(int(pos.sum()), snapped_floor(num * pos_fraction))
        wanted = num - kept_pos
        if neg_pos_ub >= 0:
            wanted = min(wanted, snapped_floor(neg_pos_ub * max(1, kept_pos)))
        mask |= first(-ce, pos, kept_pos) | first(-ce, neg, wanted)
    return mask, ce[mask].sum() / max(1, int(mask.sum()))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    case=roi_cases(),
    num=st.integers(1, 12),
    pos_fraction=st.sampled_from([0.25, 0.5, 0.1, 0.3, 1 / 3, 0.29999999999, 1.0]),
    neg_pos_ub=st.sampled_from([-1, 0, 1, 2.5, 3, 0.9999999999]),
)
def test_mmdet_matches_the_peer(case, num, pos_fraction, neg_pos_ub):
    scores, labels, image_index = case
    preset = compat.mmdet_ohem(num, pos_fraction, neg_pos_ub)
    loss = preset(scores, labels, image_index)
    documented, documented_loss = mmdet_documented(
        scores, labels, image_index, num, pos_fraction, neg_pos_ub
    )
    assert torch.equal(preset.last.mask, documented)
    assert close(loss, documented_loss, scores.dtype)
    kept_pos = documented & (labels >= 0) & (labels != scores.shape[1] - 1)
    truncated = [num * pos_fraction]
    if neg_pos_ub >= 0:
        per_image = [int((kept_pos & (image_index == i)).sum()) for i in image_index.unique()]
        truncated += [neg_pos_ub * max(1, k) for k in per_image]
    departures = {"int(), not floor": any(int(x) != snapped_floor(x) for x in truncated)}
    if compared(departures):
        ref = mmdet_ohem_reference(scores, labels, image_index, num, pos_fraction, neg_pos_ub)
        assert torch.equal(preset.last.mask, ref)


def test_mmdet_peer_ohem_sampler_cases():
    """mmdet tests/test_sampler.py ``test_ohem_sampler`` (+ ``_empty_gt``, ``_empty_pred``):
    the ground truths the peer adds as proposals are passed among the RoIs."""
    torch.manual_seed(0)
    for labels in ([1, 2, 1, NUM_CLASSES, 2, NUM_CLASSES], [NUM_CLASSES] * 4, [1, 2, 2, 3]):
        labels = torch.tensor(labels)
        preset = compat.mmdet_ohem(num=10, pos_fraction=0.5)
        preset(torch.randn(len(labels), NUM_CLASSES + 1), labels, torch.zeros(len(labels)))
        assert preset.last.mask.all()


def test_mmdet_hand_cases_of_the_peer_tests():
    def sampled(losses, labels, images=None, **kwargs):
        preset = compat.mmdet_ohem(**kwargs)
        images = torch.zeros(len(labels)) if images is None else torch.tensor(images)
        scores = _roi_scores(losses, [max(0, x) for x in labels])
        preset(scores, torch.tensor(labels), images)
        return preset.last.mask.tolist()

    labels = [0, 1, 2, 0, 1, NUM_CLASSES, NUM_CLASSES]  # int(10 * 0.25) = 2 positives
    got = sampled([1.0, 5.0, 2.0, 4.0, 3.0, 1.0, 2.0], labels, num=10, pos_fraction=0.25)
    assert got == [False, True, False, True, False, True, True]
    labels = [0] + [NUM_CLASSES] * 6
    got = sampled([1.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0], labels, num=4, pos_fraction=0.5)
    assert got == [True, False, True, False, True, False, True]
    got = sampled([1.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0], labels, num=10, neg_pos_ub=2.5)
    assert got == [True, False, True, False, True, False, False]
    no_pos = [NUM_CLASSES] * 4
    assert sampled([1.0, 3.0, 2.0, 4.0], no_pos, num=10, neg_pos_ub=1) == [0, 0, 0, 1]
    labels = [NUM_CLASSES, NUM_CLASSES, NUM_CLASSES, -1, NUM_CLASSES, NUM_CLASSES]
    got = sampled([2.0, 2.0, 2.0, 9.0, 1.0, 3.0], labels, [0, 0, 0, 0, 1, 1], num=1)
    assert got == [True, False, False, False, False, True]


def test_mmdet_departure_counts_floored_after_snapping():
    labels = [0, 1, 2, 0] + [NUM_CLASSES] * 6
    scores = _roi_scores([1.0, 5.0, 2.0, 4.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0], labels)
    labels, images = torch.tensor(labels), torch.zeros(10)
    ref = mmdet_ohem_reference(scores, labels, images, num=10, pos_fraction=0.29999999999)
    assert int((ref & (labels != NUM_CLASSES)).sum()) == 2  # int(2.9999999999)
    preset = compat.mmdet_ohem(10, 0.29999999999)
    preset(scores, labels, images)
    assert torch.equal(preset.last.mask, mmdet_ohem_reference(scores, labels, images, 10, 0.3))
    assert int((preset.last.mask & (labels != NUM_CLASSES)).sum()) == 3
    ref = mmdet_ohem_reference(scores, labels, images, 10, 0.1, neg_pos_ub=2.9999999999)
    assert int(ref.sum()) == 1 + 2
    preset = compat.mmdet_ohem(10, 0.1, neg_pos_ub=2.9999999999)
    preset(scores, labels, images)
    assert int(preset.last.mask.sum()) == 1 + 3
    assert torch.equal(preset.last.mask, mmdet_ohem_reference(scores, labels, images, 10, 0.1, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bisenet_also_compares_the_threshold_in_float64(dtype):
    """A loss equal to ``-log(0.7)`` rounded up to the dtype: above the threshold in
    float64 (the preset keeps it), not in the dtype (the peer does not). Not named in
    bisenet_ohem's docstring (mmseg_ohem's fourth departure)."""
    a = torch.tensor([-2.0] * 3 + [0.84765625] + [5.0] * 28)  # 32 valid: n_min 2, 3 hard
    logits = torch.stack([a, torch.zeros(32)]).to(dtype).view(1, 2, 1, 32)
    labels = torch.zeros(1, 1, 32, dtype=torch.long)
    _, ce, _ = pixels(logits, labels, 255)
    loss_thresh = float(-torch.log(torch.tensor(0.7)))
    assert float(ce[3]) == thresh_in(dtype, loss_thresh) > loss_thresh
    _, ref_kept = bisenet_ohem_reference(logits, labels, 0.7)
    assert ref_kept.flatten().nonzero().flatten().tolist() == [0, 1, 2]
    preset = compat.bisenet_ohem(0.7)
    preset(logits, labels)
    assert preset.last.mask.flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------- several ranks

#: Images per rank for each world size (uneven; W=3 and W=4 have a rank with none), and
#: the image whose pixels / anchors / RoIs are all ignored (the only one of its rank).
SIZES = {2: [1, 3], 3: [2, 0, 1], 4: [1, 1, 2, 0]}
ALL_IGNORED = {2: 0, 3: 2, 4: 1}
#: (preset, keywords): a threshold that binds and a floor that binds, per preset.
CASES = [
    ("mmseg_ohem", {"thresh": 0.3, "min_kept": 4}),
    ("mmseg_ohem", {"thresh": 0.05, "min_kept": 6, "avg_non_ignore": True}),
    ("mmseg_ohem", {"thresh": None, "min_kept": 5}),
    ("paddleseg_ohem", {"thresh": 0.3, "min_kept": 8}),
    ("paddleseg_ohem", {"thresh": 0.05, "min_kept": 10}),
    ("hrnet_ohem", {"thres": 0.3, "min_kept": 8}),
    ("hrnet_ohem", {"thres": 0.05, "min_kept": 10}),
    ("bisenet_ohem", {"thresh": 0.3}),
    ("bisenet_ohem", {"thresh": 0.05}),
    ("ssd_hard_negatives", {"neg_to_pos_ratio": 3.0}),
    ("ssd_hard_negatives", {"neg_to_pos_ratio": 2.0, "per_image": False}),
    ("mmdet_ohem", {"num": 6, "pos_fraction": 0.25}),
    ("mmdet_ohem", {"num": 5, "pos_fraction": 0.5, "neg_pos_ub": 1.5}),
]
PER_RANK_MIN_KEPT = {"paddleseg_ohem", "hrnet_ohem"}  # min_kept_per="rank"
ROIS, ANCHORS = 8, 10


def task_of(name: str) -> str:
    return {"ssd_hard_negatives": "ssd", "mmdet_ohem": "mmdet"}.get(name, "seg")


def model_for(task: str) -> nn.Module:
    torch.manual_seed(0)
    if task == "seg":
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, 4, 1))
    else:
        model = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5 if task == "mmdet" else 4)
        )
    with torch.no_grad():  # logits spread enough for the thresholds to bind
        model[-1].weight.mul_(4)
    return model


def global_batch(name: str, world_size: int) -> tuple[torch.Tensor, ...]:
    """Every rank's images, rank-major: ``(inputs, targets)`` of (N, ...) images."""
    n, task = sum(SIZES[world_size]), task_of(name)
    gen = torch.Generator().manual_seed(11)
    if task == "seg":
        ignore = -1 if name == "hrnet_ohem" else 255
        inputs = torch.randn(n, 3, 6, 6, generator=gen)
        targets = torch.randint(0, 4, (n, 6, 6), generator=gen)
        targets[torch.rand(n, 6, 6, generator=gen) < 0.1] = ignore
    elif task == "ssd":
        ignore = -100
        inputs = torch.randn(n, ANCHORS, 8, generator=gen)
        targets = torch.randint(1, 4, (n, ANCHORS), generator=gen)
        targets[torch.rand(n, ANCHORS, generator=gen) < 0.7] = 0
    else:
        ignore = -1
        inputs = torch.randn(n, ROIS, 8, generator=gen)
        targets = torch.randint(0, 4, (n, ROIS), generator=gen)
        targets[torch.rand(n, ROIS, generator=gen) < 0.6] = 4  # background
    targets[ALL_IGNORED[world_size]] = ignore
    return inputs, targets


def call_preset(name, preset, model, inputs, targets, first_image: int):
    """The preset's call form on these images (``first_image``: the global index of
    the first one, for mmdet's image index)."""
    if task_of(name) == "mmdet":
        images = torch.arange(first_image, first_image + len(targets)).repeat_interleave(ROIS)
        return preset(model(inputs.reshape(-1, 8)), targets.reshape(-1), images)
    return preset(model(inputs), targets)


def preset_grads_on_rank(world_size: int, checks: tuple[str, ...]):
    """Worker: one DDP step of every case on this rank's images, for each check."""
    rank, sizes = get_rank(), SIZES[world_size]
    out = []
    for name, kwargs in CASES:
        inputs, targets = (rank_slice(t, sizes, rank) for t in global_batch(name, world_size))
        for check in checks:
            model = model_for(task_of(name))
            preset = getattr(compat, name)(**kwargs, check=check)
            ddp = DDP(model)  # held until after the backward: its reducer all-reduces
            call_preset(name, preset, ddp, inputs, targets, sum(sizes[:rank])).backward()
            out.append(([p.grad.clone() for p in model.parameters()], preset.last.mask))
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_gradients_equal_the_preset_on_the_concatenated_batch(ranks, world_size):
    """Each preset at W ranks (DDP averaging) against the same preset in one process on
    the concatenated batch, per-GPU ``min_kept`` (paddleseg, hrnet) times W; both paths."""
    checks = ("eager", "deferred")
    outputs = ranks.run(world_size, preset_grads_on_rank, world_size, checks, timeout=120)
    sizes = SIZES[world_size]
    for index, (name, kwargs) in enumerate(CASES):
        inputs, targets = global_batch(name, world_size)
        single = dict(kwargs)
        if name in PER_RANK_MIN_KEPT:
            single["min_kept"] = kwargs["min_kept"] * world_size
        model = model_for(task_of(name))
        preset = getattr(compat, name)(**single)
        call_preset(name, preset, model, inputs, targets, 0).backward()
        expected, mask = [p.grad for p in model.parameters()], preset.last.mask
        assert 0 < int(mask.sum()) < preset.last.num_valid_global, f"{name} {kwargs}: trivial"
        for c, check in enumerate(checks):
            for rank, per_rank in enumerate(outputs):
                grads, local_mask = per_rank[index * len(checks) + c]
                where = f"{name} {kwargs} {check} rank {rank}"
                rows = rank_slice(mask.view(len(targets), -1), sizes, rank).reshape(-1)
                assert torch.equal(local_mask.reshape(-1), rows), where
                for got, want in zip(grads, expected, strict=True):
                    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), where


def test_hrnet_class_weights_through_ohemloss():
    """docs/porting.md: HRNet's ``weight=`` (class weights) has no preset argument; the
    OHEMLoss the page gives selects and weighs as HRNet does."""
    from dist_ohem import OHEMLoss

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, generator=gen) * 3
    labels = torch.randint(0, 4, (2, 5, 6), generator=gen)
    labels[torch.rand(2, 5, 6, generator=gen) < 0.1] = -1
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5])
    for thres, min_kept in ((0.7, 10), (0.2, 25)):
        criterion = OHEMLoss(
            nn.CrossEntropyLoss(weight=weight, ignore_index=-1),
            prob_thresh=thres,
            min_kept=max(1, min_kept),
            min_kept_per="rank",
        )
        loss = criterion(logits, labels)
        ref_loss, ref_kept = hrnet_ohem_reference(logits, labels, thres, min_kept, weight=weight)
        assert torch.equal(criterion.last.mask, ref_kept)
        assert close(loss, ref_loss, torch.float32)


def test_ssd_half_precision_losses_are_the_accurate_layout():
    """Not a named departure: in float16 on CPU the preset's per-anchor CE ((N, C, A)
    layout) is the exact one rounded, torchvision's ((N*A, C)) is not, so the losses,
    and with near ties the negatives picked, can differ in float16/bfloat16."""
    logits = torch.tensor([[[20.0, 0.0], [-3.1289, 2.2422]]], dtype=torch.float16)
    targets = torch.tensor([[0, 1]])
    ref_loss, _ = ssd_hard_negatives_reference(logits, targets, 1.0)
    loss = compat.ssd_hard_negatives(1.0)(logits, targets)
    exact = F.cross_entropy(logits.double().transpose(1, 2), targets, reduction="none").sum()
    assert abs(float(loss) - float(exact)) < 1e-5 < abs(float(ref_loss) - float(exact))
