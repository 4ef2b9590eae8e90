"""Shared data and single-process references for the distributed parity tests.

Every rank builds the same *global* batch from a seed and keeps its own slice
(rank-major, docs/DESIGN.md §2), so the concatenation of the slices is the batch that the
single-process reference sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dist_ohem import HardExampleSelector
from dist_ohem.selection import SelectionRule, select_mask

NUM_CLASSES = 4
IGNORE = -100
VOCAB = 11
TOKEN_CLASSES = 5


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
        single = {**kwargs, **_rule_kwargs(kwargs, len(sizes))}
        return HardExampleSelector(**single)(losses, usable, positive).mask
    rule = SelectionRule(**_rule_kwargs(kwargs, len(sizes)))
    if scope == "global":
        return select_mask(losses, rule, usable, positive)
    rule = SelectionRule(**_rule_kwargs(kwargs))
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


def _rule_kwargs(kwargs: dict, world_size: int = 1) -> dict:
    """The rule of one process on the concatenated batch: ``min_kept_per="rank"`` is
    ``min_kept * W`` over the batch."""
    names = ("keep", "top_k", "loss_thresh", "neg_pos_ratio", "min_kept")
    names += ("min_kept_per", "min_kept_fraction")
    rule = {k: v for k, v in kwargs.items() if k in names}
    if rule.get("min_kept_per") == "rank":
        rule["min_kept_per"] = "batch"
        rule["min_kept"] = rule.get("min_kept", 0) * world_size
    return rule


def skewed_batch(seed: int, sizes: list[int], hard_rank: int | None):
    """A global batch; with ``hard_rank``, only that rank's examples are misclassified.

    Targets are the initial model's least likely class on ``hard_rank``'s slice (hard)
    and its most likely class elsewhere (easy), so a top-k of that slice's size lands
    entirely on one rank and the other ranks own nothing.
    """
    inputs, targets = classification_batch(seed, sum(sizes))
    if hard_rank is not None:
        with torch.no_grad():
            logits = make_mlp()(inputs)
        hard = torch.zeros(len(targets), dtype=torch.bool)
        rank_slice(hard, sizes, hard_rank)[:] = True
        targets = torch.where(hard, logits.argmin(1), logits.argmax(1))
    return inputs, targets


class TokenModel(nn.Module):
    """``(N, T)`` token ids -> ``(N, TOKEN_CLASSES, T)`` logits, the layout CrossEntropyLoss
    takes with ``(N, T)`` targets. Holds a buffer, so DDP broadcasts in every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, TOKEN_CLASSES)
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.embedding(tokens))
        return (self.head(hidden) / self.temperature).transpose(1, 2)


class BufferedMLP(nn.Module):
    """:func:`make_mlp` behind a constant input scale kept as a buffer: the same function
    shape, but DDP broadcasts the buffer in every forward, so ranks that ran different
    numbers of forwards would hang."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()
        self.register_buffer("input_scale", torch.tensor(0.8))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp(inputs * self.input_scale)


def token_batch(
    seed: int, n: int, length: int = 6, fully_ignored: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, length)`` token ids and targets; each sequence has its own padded length
    (targets IGNORE past it), a few prompt positions are IGNORE too, and the examples
    ``fully_ignored`` have no valid position at all."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, length), generator=gen)
    targets = torch.randint(0, TOKEN_CLASSES, (n, length), generator=gen)
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    padding = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
    tokens[padding] = 0
    targets[padding | (torch.rand(n, length, generator=gen) < 0.15)] = IGNORE
    targets[list(fully_ignored)] = IGNORE
    return tokens, targets


def reference_count(rule: dict, num_valid: int) -> int:
    """M for a ``keep`` or ``top_k`` rule with optional ``min_kept`` (docs/DESIGN.md §3)."""
    min_kept = rule.get("min_kept", 0)
    if "keep" in rule:
        # A product within 1e-9 of an integer counts as that integer.
        wanted = math.ceil(rule["keep"] * num_valid - 1e-9)
    else:
        wanted = rule["top_k"]
    return min(num_valid, max(min_kept, wanted))


def brute_force_top(scores: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` valid entries with the highest score, ties to the lower
    index (docs/DESIGN.md §2), by sorting Python tuples."""
    order = sorted(
        (i for i in range(len(scores)) if bool(valid[i])),
        key=lambda i: (-float(scores[i]), i),
    )
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:count]] = True
    return mask
