"""Pure selection functions: the hardness order, the k-th hardest key and rule -> mask.

Nothing here talks to other processes. Every function works on one flat vector and is
the single-process definition that the distributed selector must reproduce exactly
(DESIGN.md §2-§3). The distributed strategies in ``kselect.py`` only move counts and
keys around and then call into the same definitions.

The order of hardness is defined on integer *keys*, not on floats, so that it is total
and identical everywhere: ``hardness_key`` maps each loss to an integer whose order is
the loss order (``-0.0`` and ``+0.0`` share a key; ``+inf`` is the largest key; NaN must
be masked out by the caller). Higher key first, equal keys go to the lower index.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

__all__ = [
    "SelectionRule",
    "exact_ceil",
    "exact_floor",
    "hardness_key",
    "hardness_key_of",
    "hardness_order",
    "key_from_descending",
    "key_to_loss",
    "kth_largest_key",
    "random_keys",
    "select_mask",
    "top_m_mask",
]

_EXACT_TOL = 1e-9
_INT_FOR_FLOAT = {torch.float32: torch.int32, torch.float64: torch.int64}
_INT_MAX = {torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}
_SIGN_SHIFT = {torch.int32: 31, torch.int64: 63}
#: Never produced by ``hardness_key`` for a non-NaN loss: marks "not a candidate".
KEY_SENTINEL = {torch.int32: -(2**31), torch.int64: -(2**63)}
#: What ``SelectionRule.min_kept`` counts per (``min_kept_per``).
MIN_KEPT_UNITS = ("batch", "rank", "example")


def _slack(x: float | torch.Tensor) -> float | torch.Tensor:
    """1e-9 absolute, widened relative to |x| so that 0.1 * 10**8 is still exact."""
    if isinstance(x, torch.Tensor):
        return x.abs().clamp(min=1.0) * _EXACT_TOL
    return max(1.0, abs(x)) * _EXACT_TOL


def exact_ceil(x: float | torch.Tensor) -> int | torch.Tensor:
    """``ceil(x)``, except that a value within 1e-9 (relative) of an integer is that integer.

    ``exact_ceil(0.1 * 30) == 3`` although ``0.1 * 30 == 3.0000000000000004``: computed
    as ``ceil(x - 1e-9 * max(1, |x|))``. A float64 tensor gives an int64 tensor of the
    same values, by the same IEEE operations on its device.
    """
    if isinstance(x, torch.Tensor):
        return (x - _slack(x)).ceil().to(torch.int64)
    return math.ceil(x - _slack(x))


def exact_floor(x: float | torch.Tensor) -> int | torch.Tensor:
    """``floor(x)`` with the same snapping to nearby integers as :func:`exact_ceil`."""
    if isinstance(x, torch.Tensor):
        return (x + _slack(x)).floor().to(torch.int64)
    return math.floor(x + _slack(x))


Count = int | torch.Tensor


def _scaled(factor: float, count: Count) -> float | torch.Tensor:
    """``factor * count`` in float64 (a tensor count stays on its device)."""
    return count.double() * factor if isinstance(count, torch.Tensor) else factor * count


def _min(a: Count, b: Count) -> Count:
    if isinstance(a, torch.Tensor):
        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else a.clamp(max=b)
    return b.clamp(max=a) if isinstance(b, torch.Tensor) else min(a, b)


def _max(a: Count, b: Count) -> Count:
    if isinstance(a, torch.Tensor):
        return torch.maximum(a, b) if isinstance(b, torch.Tensor) else a.clamp(min=b)
    return b.clamp(min=a) if isinstance(b, torch.Tensor) else max(a, b)


def _is_zero(count: Count) -> bool:
    """Whether ``count`` is the Python int 0 (a tensor is never known to be)."""
    return isinstance(count, int) and count == 0


def key_dtype_for(loss_dtype: torch.dtype) -> torch.dtype:
    """Integer dtype of the keys of losses of ``loss_dtype`` (int32, or int64 for float64)."""
    return torch.int64 if loss_dtype == torch.float64 else torch.int32


def hardness_key(losses: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer key of each loss.

    Args:
        losses: floating tensor of any shape. float16/bfloat16 are widened to float32
            exactly. NaN entries get meaningless keys: mask them out first.

    Returns:
        int32 tensor (int64 for float64 input) of the same shape with
        ``key[i] < key[j]  <=>  loss[i] < loss[j]`` for all non-NaN losses, and equal keys
        for equal losses (``-0.0 == +0.0``). No key equals ``KEY_SENTINEL``.
    """
    if not losses.is_floating_point():
        raise TypeError(f"losses must be a floating tensor, got {losses.dtype}")
    return hardness_key_of(losses, losses.dtype)


def hardness_key_of(
    losses: torch.Tensor, loss_dtype: torch.dtype, *, descending: bool = False
) -> torch.Tensor:
    """:func:`hardness_key` of floating ``losses`` whose dtype the caller already holds.

    ``descending=True`` gives the key of ``-loss`` instead: the same order reversed, one
    operation cheaper than ``~key``, which it equals for every loss but the zeros (both
    zeros get 0; no loss gets -1). :func:`key_from_descending` converts back.
    """
    if loss_dtype not in _INT_FOR_FLOAT:
        losses, loss_dtype = losses.float(), torch.float32
    int_dtype = _INT_FOR_FLOAT[loss_dtype]
    # "0.0 +" and "0.0 -" turn -0.0 into +0.0, so that both zeros share one key (and make
    # a fresh copy).
    bits = ((0.0 - losses) if descending else (losses + 0.0)).view(int_dtype)
    # Non-negative floats already order as signed ints; negative floats order in
    # reverse, so flip all bits but the sign to reverse them back: the arithmetic shift
    # gives -1 for negatives, masked to INT_MAX, 0 otherwise.
    flip = bits >> _SIGN_SHIFT[int_dtype]
    flip &= _INT_MAX[int_dtype]
    bits ^= flip
    return bits


def key_from_descending(descending: torch.Tensor) -> torch.Tensor:
    """:func:`hardness_key` from the ``descending=True`` key of :func:`hardness_key_of`."""
    return (~descending).where(descending != 0, 0)


def key_to_loss(key: int, loss_dtype: torch.dtype) -> float:
    """Inverse of :func:`hardness_key` for one key (returns a Python float, no tensor)."""
    int_dtype = key_dtype_for(loss_dtype)
    bits = key if key >= 0 else key ^ _INT_MAX[int_dtype]
    int_code, float_code = ("q", "d") if int_dtype == torch.int64 else ("i", "f")
    return struct.unpack(float_code, struct.pack(int_code, bits))[0]


def random_keys(global_index: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Pseudo-random int32 keys, a pure function of ``(seed, stream, global_index)``.

    A counter-based generator (SplitMix64 finalizer over the three numbers) so that each
    rank can draw the keys of its own instances without drawing everyone's: rank r and
    a single process on the concatenated batch get identical keys for the same global
    index. Used by ``scope="random"``: the M instances with the largest random keys are a
    uniformly random M-subset (ties, probability ~2^-32, go to the lower index).
    """
    mask64 = (1 << 64) - 1
    base = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & mask64
    base = base - (1 << 64) if base >= 1 << 63 else base
    x = global_index.to(torch.int64) * -7046029254386353131 + base  # golden-ratio step
    for shift, multiplier in ((30, -4658895280553007687), (27, -7723592293110705685)):
        x = (x ^ _logical_shift_right(x, shift)) * multiplier
    x = x ^ _logical_shift_right(x, 31)
    keys = _logical_shift_right(x, 32) - 2**31  # top 32 bits, as signed int32 range
    return keys.clamp_min(KEY_SENTINEL[torch.int32] + 1).to(torch.int32)


def _logical_shift_right(x: torch.Tensor, shift: int) -> torch.Tensor:
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def kth_largest_key(keys: torch.Tensor, candidate: torch.Tensor, k: int) -> int:
    """Value of the k-th largest key among candidates (1-based). Requires 1 <= k <= #candidates."""
    candidate_keys = keys[candidate]
    # kthvalue counts from the smallest; only the value is used, never topk's tie order.
    return int(candidate_keys.kthvalue(candidate_keys.numel() - k + 1).values)


def top_m_mask(keys: torch.Tensor, candidate: torch.Tensor, m: int) -> torch.Tensor:
    """Mask of the ``m`` hardest candidates: larger key first, equal keys to the lower index.

    Args:
        keys: 1-D integer keys (from :func:`hardness_key` or :func:`random_keys`).
        candidate: 1-D bool, same length; only candidates can be selected.
        m: how many to select; clipped to the number of candidates.

    Returns:
        1-D bool mask with exactly ``min(m, #candidates)`` True entries.
    """
    num_candidates = int(torch.count_nonzero(candidate))
    m = min(m, num_candidates)
    if m <= 0:
        return torch.zeros_like(candidate)
    if m == num_candidates:
        return candidate.clone()
    kth = kth_largest_key(keys, candidate, m)
    mask = candidate & (keys > kth)
    ties = (candidate & (keys == kth)).nonzero().squeeze(1)
    mask[ties[: m - int(torch.count_nonzero(mask))]] = True
    return mask


def hardness_order(losses: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the valid instances of ``losses``, hardest first.

    Higher loss first; equal losses in increasing index order; NaN and invalid entries
    are left out. ``losses`` of any shape is flattened (row-major).
    """
    flat = losses.reshape(-1)
    keep = ~torch.isnan(flat)
    if valid is not None:
        keep &= valid.reshape(-1)
    indices = keep.nonzero().squeeze(1)
    order = torch.sort(hardness_key(flat[indices]), descending=True, stable=True).indices
    return indices[order]


@dataclass(frozen=True)
class SelectionRule:
    """One rule of DESIGN.md §3 plus its floor. Exactly one of the four parameters is set.

    Every rule reduces to "all *forced* instances plus the hardest ``m`` *candidates*":
    forced instances are the valid positives of ``neg_pos_ratio`` (none otherwise),
    candidates are the other valid instances, and ``m`` depends only on global counts.

    The floor under ``m`` (:meth:`floor`) is the larger of ``min_kept`` times its unit
    (``min_kept_per``: ``"batch"``, the whole distributed batch, the default; ``"rank"``,
    times the world size W, for code that counts it per GPU; ``"example"``, times the
    number of examples, dim 0 of the losses, over all ranks, as mmseg does per image)
    and ``floor(min_kept_fraction * K)`` (BiSeNet's ``n_valid // 16`` is 1/16).
    """

    keep: float | None = None
    top_k: int | None = None
    loss_thresh: float | None = None
    neg_pos_ratio: float | None = None
    min_kept: int = 0
    min_kept_per: str = "batch"
    min_kept_fraction: float = 0.0

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("keep", "top_k", "loss_thresh", "neg_pos_ratio")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of keep=, top_k=, loss_thresh=, neg_pos_ratio= "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k}")
        if int(self.min_kept) != self.min_kept or self.min_kept < 0:
            raise ValueError(f"min_kept must be a non-negative integer, got {self.min_kept}")
        if self.neg_pos_ratio is not None and not (self.neg_pos_ratio >= 0):
            raise ValueError(f"neg_pos_ratio must be >= 0, got {self.neg_pos_ratio}")
        if self.loss_thresh is not None and math.isnan(self.loss_thresh):
            raise ValueError("loss_thresh must not be NaN")
        if self.min_kept_per not in MIN_KEPT_UNITS:
            raise ValueError(
                f"min_kept_per must be one of {MIN_KEPT_UNITS}, got {self.min_kept_per!r}"
            )
        if not (0.0 <= self.min_kept_fraction <= 1.0):
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")

    def floor(self, num_valid: Count, num_examples: Count = 0, world_size: int = 1) -> Count:
        """The floor under the number selected: see the class docstring.

        ``num_examples``: examples over all ranks (for ``min_kept_per="example"``).
        Python ints, or 0-dim int64 tensors (then a tensor, computed on their device).
        """
        unit = {"batch": 1, "rank": world_size, "example": num_examples}[self.min_kept_per]
        fixed = self.min_kept * unit
        if not self.min_kept_fraction:
            return fixed
        return _max(fixed, exact_floor(_scaled(self.min_kept_fraction, num_valid)))

    @property
    def needs_positive(self) -> bool:
        return self.neg_pos_ratio is not None

    def split(
        self, valid: torch.Tensor, positive: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forced, candidate)`` bool masks for the given valid (and positive) masks."""
        if self.needs_positive:
            if positive is None:
                raise ValueError("neg_pos_ratio needs a `positive` mask")
            return valid & positive, valid & ~positive
        return torch.zeros_like(valid), valid

    def above_threshold(self, losses: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """Candidates whose loss is strictly above ``loss_thresh`` (all False for other rules)."""
        if self.loss_thresh is None:
            return torch.zeros_like(candidate)
        # In float64: comparing a float32 tensor with a Python float rounds the threshold
        # to float32 first, and float32(1e-30) > 1e-30 would then not count as above it.
        return candidate & (losses.double() > self.loss_thresh)

    def num_candidates_to_select(
        self,
        num_valid: Count,
        num_forced: Count,
        num_candidates: Count,
        num_above: Count,
        floor: Count | None = None,
    ) -> Count:
        """How many candidates to select, from counts over the instances the rule sees.

        ``num_valid`` = K, ``num_forced`` = valid positives P, ``num_candidates`` = the
        other valid instances, ``num_above`` = candidates with loss > ``loss_thresh``,
        ``floor``: :meth:`floor` (default: ``min_kept``, the floor with one unit).
        Python ints, or 0-dim int64 tensors: then the result is one too, computed on
        their device without reading them (the same integers).
        """
        floor = self.min_kept if floor is None else floor
        if self.keep is not None:
            ratio = exact_ceil(_scaled(self.keep, num_valid))  # <= K, as keep <= 1
            return ratio if _is_zero(floor) else _min(num_valid, _max(floor, ratio))
        if self.top_k is not None:
            return _min(num_valid, _max(floor, int(self.top_k)))
        if self.loss_thresh is not None:
            return _max(num_above, _min(num_valid, floor))
        ratio = _min(num_candidates, exact_floor(_scaled(self.neg_pos_ratio, num_forced)))
        no_positive = _min(num_candidates, floor)
        if isinstance(num_forced, torch.Tensor):
            return torch.where(num_forced > 0, ratio, no_positive)
        return ratio if num_forced > 0 else no_positive


def select_mask(
    losses: torch.Tensor,
    rule: SelectionRule,
    valid: torch.Tensor | None = None,
    positive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-process selection of ``rule`` over one batch; the reference definition.

    Args:
        losses: per-instance losses, any shape (flattened row-major). NaN is invalid.
        rule: the selection rule.
        valid: bool mask of the same shape; False entries never count (default all).
        positive: bool mask of the same shape; needed by ``neg_pos_ratio``.

    Returns:
        bool mask of ``losses.shape``.
    """
    flat = losses.reshape(-1)
    valid_flat = ~torch.isnan(flat)
    if valid is not None:
        valid_flat &= valid.reshape(-1)
    positive_flat = None if positive is None else positive.reshape(-1)
    forced, candidate = rule.split(valid_flat, positive_flat)
    num_valid = int(valid_flat.sum())
    m = rule.num_candidates_to_select(
        num_valid,
        int(forced.sum()),
        int(candidate.sum()),
        int(rule.above_threshold(flat, candidate).sum()),
        rule.floor(num_valid, losses.shape[0] if losses.dim() else 1),
    )
    return (forced | top_m_mask(hardness_key(flat), candidate, m)).reshape(losses.shape)
