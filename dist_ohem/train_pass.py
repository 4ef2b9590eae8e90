"""The training pass of :func:`dist_ohem.ohem_step`: forward + backward of the selected rows.

Two plans reach the same accumulated gradient, the reference's (docs/DESIGN.md §6):

- :func:`train_selected`: the selected rows themselves, found by reading the mask
  (``nonzero``) and the per-rank counts: a host read between the scoring and the
  training pass. Chunks of ``micro_batch_size``, an optional balancing all-to-all.
- :func:`train_with_capacity`: a fixed number of rows per rank, chosen on the device; a
  row weighs 1 when selected and 0 otherwise. Nothing is read before the training
  backward is enqueued; one read after it says whether any rank owns more selected rows
  than its capacity, and then every rank trains one more, padded chunk.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_ohem import comm
from dist_ohem.batches import (
    Batch,
    batch_size,
    call_model,
    chunk_bounds,
    move_to_shares,
    select_rows,
)
from dist_ohem.loss import normalization_scale, scaled
from dist_ohem.result import SelectionResult
from dist_ohem.scoring import ExampleLosses
from dist_ohem.selection import SelectionRule, hardness_key
from dist_ohem.selector import HardExampleSelector
from dist_ohem.wrappers import frozen_norm_statistics, gradient_sync, is_deepspeed_engine

__all__ = ["Trained", "TrainingInputs", "capacity_of", "train_selected", "train_with_capacity"]

Backward = Callable[[torch.Tensor], Any]

#: Selected rows per rank of the last step of each selector, for the rules whose count is
#: not known in advance (``loss_thresh``, ``neg_pos_ratio``): the next capacity's basis.
_LAST_SELECTED: weakref.WeakKeyDictionary[HardExampleSelector, int] = weakref.WeakKeyDictionary()


@dataclass
class TrainingInputs:
    """What both plans train from: the scoring pass's outcome and the step's settings."""

    model: nn.Module
    module: nn.Module
    inputs: Batch
    targets: Batch
    reduce_losses: ExampleLosses
    selection: SelectionResult
    scores: torch.Tensor
    example_losses: torch.Tensor
    valid: torch.Tensor
    backward: Backward
    grad_average: bool
    group: Any


@dataclass
class Trained:
    """The training pass's outcome: the loss back-propagated (detached), this rank's sum
    of the selected training losses (float64, for the mean loss), the chunks run, and the
    rows trained here (None: the selection's local count, read only when asked)."""

    loss: torch.Tensor
    selected_sum: torch.Tensor
    num_chunks: int
    num_trained_local: int | None = None


def capacity_of(
    selector: HardExampleSelector, factor: float, num_examples: int, world_size: int
) -> int:
    """C_r, the rows this rank trains in the capacity chunk, from host numbers only.

    ``keep``: ``ceil(c * max(keep * N_r, min_kept / W))``; ``top_k``:
    ``ceil(c * max(top_k, min_kept) / W)``; ``loss_thresh`` and ``neg_pos_ratio``, whose
    count is known only after the selection: ``ceil(c * S)`` with S this rank's selected
    count of the selector's previous step (``N_r`` at the first). Clipped to ``[1, N_r]``.
    """
    rule: SelectionRule = selector.rule
    if rule.keep is not None:
        expected = max(rule.keep * num_examples, rule.min_kept / world_size)
    elif rule.top_k is not None:
        expected = max(rule.top_k, rule.min_kept) / world_size
    else:
        expected = _LAST_SELECTED.get(selector, num_examples)
    return min(num_examples, max(1, math.ceil(factor * expected)))


def train_with_capacity(
    batch: TrainingInputs, selector: HardExampleSelector, capacity: int, chunk: int
) -> Trained:
    """Train ``capacity`` rows in chunks of ``chunk``, then the overflow the same way.

    The rows are this rank's selected ones first (in index order), then its hardest
    unselected valid ones at weight 0. The overflow (selected rows beyond ``capacity``,
    largest over the ranks) is all-reduced before the training forward and read after
    the training backward is enqueued: the step's one host read. Every rank runs the
    same chunks: ``capacity`` and ``chunk`` must give the same count on every rank.
    """
    selection = batch.selection
    order = _selected_first(batch.scores, batch.valid, selection.mask)
    local = selection.on_device.num_selected_local
    overflow = comm.all_reduce_max(torch.stack([(local - capacity).clamp(min=0), local]))
    scale = normalization_scale(selection, "mean", batch.grad_average, batch.group)
    deepspeed = is_deepspeed_engine(batch.model)
    # DeepSpeed reduces at its accumulation boundary only, so its capacity chunks defer
    # that and an overflow chunk always follows. Other engines synchronise the last
    # capacity chunk: that leaves identical gradients on every rank, and averaging is
    # linear, so the overflow's own synchronised backward adds its part exactly.
    parts = _train_span(batch, order, 0, capacity, chunk, scale, last_syncs=not deepspeed)
    extra, selected_here = overflow.tolist()  # the one host read, after the backward
    _LAST_SELECTED[selector] = selected_here
    if extra or deepspeed:
        parts += _train_span(batch, order, capacity, extra, chunk, scale, last_syncs=True)
    loss = torch.stack([p[0] for p in parts]).sum()
    selected_sum = torch.stack([p[1] for p in parts]).sum()
    return Trained(loss, selected_sum, len(parts))


def _train_span(
    batch: TrainingInputs,
    order: torch.Tensor,
    start: int,
    count: int,
    chunk: int,
    scale: torch.Tensor,
    last_syncs: bool,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows ``order[start : start + count]`` in chunks of ``chunk`` (at least one chunk);
    gradients synchronised on the last one only, and only if ``last_syncs``."""
    bounds = range(start, start + max(count, 1), chunk)
    return [
        _train_rows(
            batch,
            order,
            first,
            min(chunk, start + count - first),
            scale,
            sync=last_syncs and first == bounds[-1],
        )
        for first in bounds
    ]


def _selected_first(scores: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` row order: the selected rows (index order), then the other valid rows
    hardest first, then the invalid ones. One sort, on the device."""
    keys = hardness_key(scores).to(torch.int64)
    keys = keys.where(valid & ~torch.isnan(scores), torch.iinfo(torch.int64).min)
    keys = keys.where(~mask, torch.iinfo(torch.int64).max)
    return keys.sort(descending=True, stable=True).indices


def _train_rows(
    batch: TrainingInputs,
    order: torch.Tensor,
    start: int,
    count: int,
    scale: torch.Tensor,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of rows ``order[start : start + count]`` (past the end: the last
    row again), each weighted 1 if selected, else 0. Returns the detached loss and the
    float64 sum of the selected rows' losses."""
    num_examples = order.numel()
    with gradient_sync(batch.model, sync=sync):
        if count == 0 or num_examples == 0:
            loss = zero_weight_loss(batch)
            batch.backward(loss)
            return loss.detach(), loss.detach().to(torch.float64)
        positions = torch.arange(start, start + count, device=order.device)
        rows = order.index_select(0, positions.clamp(max=num_examples - 1))
        weights = batch.selection.mask.index_select(0, rows) & (positions < num_examples)
        # A weight-0 row with a non-finite loss (NaN inputs, say) would still put NaN in
        # the gradient: the first row of the order goes in its place.
        finite = torch.isfinite(batch.example_losses).index_select(0, rows)
        rows = rows.where(weights | finite, order[:1])
        losses, _ = batch.reduce_losses(
            call_model(batch.model, select_rows(batch.inputs, rows)),
            select_rows(batch.targets, rows),
        )
        kept = torch.where(weights, losses, 0.0)
        loss = scaled(kept.sum(), scale)
        batch.backward(loss)
    return loss.detach(), kept.detach().sum(dtype=torch.float64)


def train_selected(
    batch: TrainingInputs, balance: bool, micro_batch_size: int | None
) -> tuple[Trained, float]:
    """Train the selected rows themselves (reads the mask and the per-rank counts).

    Returns the outcome and the seconds spent moving rows (``balance``).
    """
    selection, group = batch.selection, batch.group
    chosen = selection.mask.nonzero().squeeze(1)
    train_inputs = select_rows(batch.inputs, chosen)
    train_targets = select_rows(batch.targets, chosen)
    trained_per_rank = list(selection.selected_per_rank)
    moving = 0.0
    if balance and comm.is_distributed(group):
        started = time.perf_counter()
        (train_inputs, train_targets), trained_per_rank = move_to_shares(
            (train_inputs, train_targets), trained_per_rank, group
        )
        moving = time.perf_counter() - started
    num_trained = batch_size(train_inputs)
    train_chunk = micro_batch_size or max(max(trained_per_rank), 1)
    num_chunks = max(1, max(-(-n // train_chunk) for n in trained_per_rank))
    scale = normalization_scale(selection, "mean", batch.grad_average, group)
    loss_total = torch.zeros((), dtype=batch.example_losses.dtype, device=scale.device)
    selected_sum = torch.zeros((), dtype=torch.float64, device=scale.device)
    for index, rows in enumerate(chunk_bounds(num_trained, train_chunk, num_chunks)):
        with gradient_sync(batch.model, sync=index == num_chunks - 1):
            if rows.stop > rows.start:
                losses, _ = batch.reduce_losses(
                    call_model(batch.model, select_rows(train_inputs, rows)),
                    select_rows(train_targets, rows),
                )
                loss = scaled(losses.sum(), scale)
                selected_sum += losses.detach().sum(dtype=torch.float64)
            else:
                loss = zero_weight_loss(batch)
            batch.backward(loss)
        loss_total = loss_total + loss.detach()
    return Trained(loss_total, selected_sum, num_chunks, num_trained), moving


def zero_weight_loss(batch: TrainingInputs) -> torch.Tensor:
    """A zero loss through the wrapped model, for a chunk with no example to train.

    Only examples with a finite loss go through: the backward of a NaN or inf example
    (NaN inputs, say) is NaN even at weight 0 and would poison every rank's gradient.
    """
    # Two, so BatchNorm1d accepts the batch in train mode.
    rows = torch.isfinite(batch.example_losses).nonzero().squeeze(1)[:2]
    with frozen_norm_statistics(batch.module):
        losses, _ = batch.reduce_losses(
            call_model(batch.model, select_rows(batch.inputs, rows)),
            select_rows(batch.targets, rows),
        )
    return torch.where(torch.zeros_like(losses, dtype=torch.bool), losses, 0.0).sum()
