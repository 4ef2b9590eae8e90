"""Selection within groups: the rule applied to each group of instances on its own.

A group is a set of instances with the same id (an image's anchors or RoIs, say); groups
never span ranks, so a grouped selection needs no k-selection across ranks, and the
same code serves both of the selector's paths: static shapes, nothing read from the
device. Within each group the rule's count M_g comes from the group's own counts (its
floor from ``min_kept`` and ``min_kept_fraction`` of the group's valid count), and the
group's M_g hardest candidates are selected, ties to the lower index (docs/DESIGN.md §3).

With a positive quota (``pos_fraction``, mmdetection's ``OHEMSampler`` meaning), the
rule's count is a budget B per group: the hardest ``min(P_g, floor(pos_fraction * B))``
positives, then the hardest negatives, at most ``B`` minus the positives kept and, with
``neg_pos_ub >= 0``, at most ``floor(neg_pos_ub * max(1, positives kept))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_ohem.local_batch import LocalBatch
from dist_ohem.selection import SelectionRule, exact_floor, hardness_key_of

__all__ = ["Quota", "grouped_mask", "select_groups"]


@dataclass(frozen=True)
class Quota:
    """A positive quota: ``pos_fraction`` of the budget at most, ``neg_pos_ub`` negatives
    per positive kept at most (negative: no cap)."""

    pos_fraction: float
    neg_pos_ub: float = -1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.pos_fraction <= 1.0):
            raise ValueError(f"pos_fraction must be in [0, 1], got {self.pos_fraction}")

    def split(
        self, budget: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positives kept, negatives kept)`` per group from ``(G,)`` int64 counts."""
        kept_pos = torch.minimum(positives, exact_floor(budget.double() * self.pos_fraction))
        wanted_neg = budget - kept_pos
        if self.neg_pos_ub >= 0:
            upper = exact_floor(kept_pos.clamp(min=1).double() * self.neg_pos_ub)
            wanted_neg = torch.minimum(wanted_neg, upper)
        return kept_pos, torch.minimum(negatives, wanted_neg)


def grouped_mask(
    ranked: torch.Tensor,
    groups: torch.Tensor,
    candidate: torch.Tensor,
    forced: torch.Tensor | None,
    above: torch.Tensor | None,
    positive: torch.Tensor | None,
    rule: SelectionRule,
    quota: Quota | None,
) -> torch.Tensor:
    """The selected candidates of each group (forced instances not included).

    Args:
        ranked: ``(n,)`` descending keys of the instances (smaller = harder;
            :func:`dist_ohem.selection.hardness_key_of` with ``descending=True``).
        groups: ``(n,)`` integer group ids (any values; equal = same group).
        candidate: ``(n,)`` bool, the instances the rule ranks.
        forced, above, positive: ``(n,)`` bool or None: the rule's forced instances
            (``neg_pos_ratio``), the candidates above ``loss_thresh``, and for a quota
            the positives (valid ones are positive candidates, the rest negatives).
        rule, quota: the rule (its floor per group) and an optional quota (then
            ``rule`` gives the budget: ``keep`` or ``top_k``).

    Returns:
        ``(n,)`` bool mask. Three stable sorts (hardness, positives first with a quota,
        group), one scatter-add of the group counts, one scatter back.
    """
    n = ranked.numel()
    order = ranked.where(candidate, torch.iinfo(ranked.dtype).max).sort(stable=True).indices
    if quota is not None:  # positives first within each group, hardest first in each
        order = order[(~positive[order]).to(torch.uint8).sort(stable=True).indices]
    order = order[groups[order].sort(stable=True).indices]
    sorted_groups = groups[order]
    starts_group = torch.ones(n, dtype=torch.bool, device=ranked.device)
    starts_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
    group = starts_group.cumsum(0) - 1  # dense group index of each sorted instance
    none = torch.zeros_like(candidate)
    positive_candidate = none if quota is None else candidate & positive
    columns = [candidate, none if forced is None else forced, none if above is None else above]
    columns = torch.stack([*columns, positive_candidate], 1)[order].to(torch.int64)
    counts = torch.zeros(n, 4, dtype=torch.int64, device=ranked.device)
    candidates, forced_g, above_g, positives = counts.index_add_(0, group, columns).unbind(1)
    valid = candidates + forced_g
    floor = rule.floor(valid, 1)
    if quota is None:
        limit = rule.num_candidates_to_select(valid, forced_g, candidates, above_g, floor)
        limit, segment_start = limit[group], starts_group
    else:
        budget = _budget(rule, valid, floor)
        kept_pos, kept_neg = quota.split(budget, positives, candidates - positives)
        is_positive = positive[order]
        limit = torch.where(is_positive, kept_pos[group], kept_neg[group])
        segment_start = starts_group.clone()
        segment_start[1:] |= is_positive[1:] != is_positive[:-1]
    positions = torch.arange(n, device=ranked.device)
    start = torch.where(segment_start, positions, 0).cummax(0).values
    picked = candidate[order] & (positions - start < limit)
    return torch.empty_like(picked).scatter_(0, order, picked)


def _budget(rule: SelectionRule, valid: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """A quota's budget per group: ``keep``'s count, or ``top_k`` not clamped to the
    group's size (mmdetection's ``num``), at least the floor."""
    if rule.top_k is not None:
        return torch.full_like(valid, int(rule.top_k)).clamp(min=floor)
    if rule.keep is not None:
        return rule.num_candidates_to_select(valid, 0, valid, 0, floor)
    raise ValueError("a positive quota needs keep= or top_k= as its budget")


def select_groups(batch: LocalBatch, rule: SelectionRule, quota: Quota | None) -> None:
    """Fill ``batch.grouped`` (the picked candidates) and ``batch.num_grouped``."""
    ranked = hardness_key_of(batch.losses, batch.dtype, descending=True)
    batch.grouped = grouped_mask(
        ranked,
        batch.groups,
        batch.candidate_mask(),
        batch.forced,
        batch.above,
        batch.positive,
        rule,
        quota,
    )
    batch.num_grouped = batch.grouped.sum()
