"""Shared data and single-process references for the distributed parity tests.

Every rank builds the same *global* batch from a seed and keeps its own slice
(rank-major, DESIGN.md §2), so the concatenation of the slices is the batch that the
single-process reference sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dist_ohem import HardExampleSelector, SelectionRule, select_mask

NUM_CLASSES = 4
IGNORE = -100


@dataclass
class Case:
    """One selection scenario: global batch seed, per-rank sizes and selector arguments."""

    seed: int
    sizes: list[int]
    kwargs: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    nan_fraction: float = 0.0


def global_losses(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tie-heavy losses with some +inf (and NaN), a valid mask and a positive mask."""
    gen = torch.Generator().manual_seed(case.seed)
    n = sum(case.sizes)
    losses = (torch.randint(0, 7, (n,), generator=gen).to(case.dtype)) / 2
    draw = torch.rand(n, generator=gen)
    losses[draw < 0.05] = math.inf
    losses[(draw > 0.5) & (draw < 0.5 + case.nan_fraction)] = math.nan
    valid = torch.rand(n, generator=gen) > 0.2
    positive = torch.rand(n, generator=gen) < 0.3
    return losses, valid, positive


def make_mlp() -> nn.Module:
    """The same small MLP (8 -> 4 classes) on every rank and in the reference."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES))


def classification_batch(
    seed: int, n: int, ignore_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of 8 features, 4 classes; a fraction of targets set to IGNORE."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_fraction] = IGNORE
    return inputs, targets


def rank_slice(tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Rows of ``tensor`` owned by ``rank`` under rank-major order."""
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def reference_mask(
    kwargs: dict,
    sizes: list[int],
    losses: torch.Tensor,
    valid: torch.Tensor | None,
    positive: torch.Tensor | None,
) -> torch.Tensor:
    """The mask a single process computes on the concatenated batch, by scope's definition."""
    scope = kwargs.get("scope", "global")
    nan = torch.isnan(losses)
    usable = ~nan if valid is None else valid & ~nan
    if scope == "all":
        return usable
    if scope == "random":
        # Same seed and call number (1) with no process group: the single-process draw.
        return HardExampleSelector(**kwargs)(losses, usable, positive).mask
    rule = SelectionRule(**_rule_kwargs(kwargs))
    if scope == "global":
        return select_mask(losses, rule, usable, positive)
    chunks = [
        select_mask(
            rank_slice(losses, sizes, r),
            rule,
            rank_slice(usable, sizes, r),
            None if positive is None else rank_slice(positive, sizes, r),
        )
        for r in range(len(sizes))
    ]
    return torch.cat(chunks)


def _rule_kwargs(kwargs: dict) -> dict:
    names = ("keep", "top_k", "loss_thresh", "neg_pos_ratio", "min_kept")
    return {k: v for k, v in kwargs.items() if k in names}
