"""The selector's read-free stages (docs/DESIGN.md §13): from gathered rows to a result.

Everything data-dependent stays a device tensor: the global counts are sums of the
gathered rows, M is computed from them by the rule on the device, the k-selection is
:func:`dist_ohem.static_select.static_select`, and the result's counts are packed into
one vector that :class:`dist_ohem.result.SelectionResult` reads back only when asked.
The collectives depend only on the world size and on the key dtype agreed by earlier
calls, never on the data, so a call whose input is bad on some rank still runs them all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ohem.local_batch import (
    ABOVE,
    CALLS,
    CANDIDATES,
    CONFIG,
    FORCED,
    KEY_BITS,
    KIND,
    NAN,
    NUMEL,
    VALID,
    LocalBatch,
)
from dist_ohem.result import NO_KEY, SelectionResult, pack_counts
from dist_ohem.selection import SelectionRule, random_keys
from dist_ohem.static_select import static_select

__all__ = ["select_on_device"]

#: Columns on which every rank's row must equal rank 0's, adjacent in the row (a slice:
#: indexing with a list would copy the index from the host).
_AGREED = slice(CONFIG, KIND + 1)
assert (KEY_BITS, CALLS) == (CONFIG + 1, CONFIG + 2) and KIND == CONFIG + 3


def select_on_device(
    batch: LocalBatch,
    rows: torch.Tensor,
    *,
    rule: SelectionRule,
    scope: str,
    seed: int,
    call: int,
    group: dist.ProcessGroup | None,
    rank: int,
) -> SelectionResult:
    """Select from this rank's batch and the gathered rows, without a host read.

    Args:
        batch: this rank's prepared batch; NaN losses are not candidates.
        rows: ``(W, 1 + HEADER)`` int64 rows of every rank (error flag first).
        call: the call number (``scope="random"`` draws from it).

    A rank that reported an error counts no instance, and when the ranks disagree on
    the configuration, the key dtype, the call count or the kind of call, nothing is
    selected anywhere: the call completes the same collectives on every rank and the
    error is raised afterwards from the rows.
    """
    world_size = rows.shape[0]
    counts = rows[:, 1:]
    totals = counts.sum(0)
    agree = (counts[:, _AGREED] == counts[:1, _AGREED]).all()
    forced = counts[:, FORCED]
    kth_key = None
    if scope == "all":
        per_rank = forced + counts[:, CANDIDATES]
        mask = batch.with_forced(batch.candidate_mask())
    else:
        local = scope == "local"
        source = counts if local else totals  # per rank, or the global counts
        to_select = (
            rule.num_candidates_to_select(
                source[..., VALID], source[..., FORCED], source[..., CANDIDATES], source[..., ABOVE]
            )
            .minimum(source[..., CANDIDATES])
            .where(agree, 0)
        )
        here = to_select[rank] if local else to_select
        keys = batch.keys if scope != "random" else _random_keys(batch, seed, call, counts, rank)
        chosen = static_select(
            keys,
            batch.candidate,
            here,
            None if local else group,
            1 if local else world_size,
            0 if local else rank,
        )
        per_rank = forced + (to_select if local else chosen.per_rank)
        mask = batch.with_forced(chosen.picked)
        if scope != "random":
            kth_key = chosen.kth_key.where(here > 0, NO_KEY)
    if kth_key is None:
        kth_key = totals.new_full((), NO_KEY)
    packed = pack_counts(totals[VALID], totals[NAN], totals[NUMEL], kth_key, per_rank, rank)
    strategy = "none" if scope in ("all", "local") else "static"
    return SelectionResult(
        mask, packed, strategy=strategy, scope=scope, loss_dtype=batch.losses.dtype
    )


def _random_keys(
    batch: LocalBatch, seed: int, call: int, counts: torch.Tensor, rank: int
) -> torch.Tensor:
    """``scope="random"``'s keys: a function of the global index of each instance."""
    offset = counts[:rank, NUMEL].sum()
    index = torch.arange(batch.losses.numel(), device=batch.losses.device) + offset
    return random_keys(index, seed, call)
