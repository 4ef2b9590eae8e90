"""The training pass of :func:`dist_ohem.ohem_step`: forward + backward of the selected rows.

A :class:`TrainingPlan` is chosen once per step, before scoring. Three plans reach the
same accumulated gradient, the reference's (docs/DESIGN.md §6):

- :class:`SelectedRowsPlan`: the selected rows themselves, found by reading the mask
  (``nonzero``) and the per-rank counts: a host read between the scoring and the
  training pass. Chunks of ``micro_batch_size``, as many on every rank.
- :class:`BalancedPlan`: the same after one all-to-all that gives every rank
  floor/ceil(M/W) of the selected rows.
- :class:`CapacityPlan`: a fixed number of rows per rank, chosen on the device; a row
  weighs 1 when selected and 0 otherwise. Nothing is read before the training backward
  is enqueued; one read after it says whether any rank owns more selected rows than its
  capacity, and then every rank trains one more, padded chunk.

Every plan first agrees with the other ranks on what they must run alike
(:meth:`TrainingPlan.agree`): the scoring chunks under ZeRO-3 / FSDP, the capacity chunks.
"""

from __future__ import annotations

import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dist_ohem import comm
from dist_ohem.batches import (
    Batch,
    batch_size,
    call_model,
    chunk_bounds,
    chunks_for,
    move_to_shares,
    select_rows,
)
from dist_ohem.loss import normalization_scale, scaled
from dist_ohem.result import SelectionResult
from dist_ohem.scoring import ExampleLosses, Scored, ScoringChunks
from dist_ohem.selection import SelectionRule, hardness_key
from dist_ohem.selector import HardExampleSelector
from dist_ohem.wrappers import frozen_norm_statistics, gradient_sync, is_deepspeed_engine

__all__ = [
    "BalancedPlan",
    "CapacityPlan",
    "SelectedRowsPlan",
    "Trained",
    "TrainingInputs",
    "TrainingPlan",
    "capacity_of",
]

Backward = Callable[[torch.Tensor], Any]

#: Selected rows per rank of the last step of each selector, for the rules whose count is
#: not known in advance (``loss_thresh``, ``neg_pos_ratio``): the next capacity's basis.
_LAST_SELECTED: weakref.WeakKeyDictionary[HardExampleSelector, int] = weakref.WeakKeyDictionary()


@dataclass
class TrainingInputs:
    """What every plan trains from: the wrapped ``model`` and its unwrapped ``module``, the
    local batch, the loss reduction, the selection and the scoring pass's outcome."""

    model: nn.Module
    module: nn.Module
    inputs: Batch
    targets: Batch
    reduce_losses: ExampleLosses
    selection: SelectionResult
    scored: Scored
    backward: Backward


@dataclass
class Trained:
    """The training pass's outcome: the loss back-propagated (detached), this rank's sum
    of the selected training losses (float64, for the mean loss), the chunks run, the
    rows trained here (None: the selection's local count, read only when asked) and the
    seconds spent moving rows between ranks (:class:`BalancedPlan`)."""

    loss: torch.Tensor
    selected_sum: torch.Tensor
    num_chunks: int
    num_trained_local: int | None = None
    moving_seconds: float = 0.0


@dataclass(frozen=True)
class TrainingPlan(ABC):
    """How this step's training pass runs, the same kind on every rank.

    Attributes:
        group: the selector's process group.
        grad_average: the engine averages gradients over ranks (else it sums them).
        normalizer: what the loss's mean divides by (:data:`dist_ohem.loss.NORMALIZERS`).
        micro_batch_size: rows per training chunk; None: one chunk.
        lockstep_scoring: the scoring forwards communicate (ZeRO-3 / FSDP with
            micro-batches), so every rank runs as many and none starts them alone.
    """

    group: Any
    grad_average: bool
    normalizer: str
    micro_batch_size: int | None
    lockstep_scoring: bool

    def agree(self, chunks: ScoringChunks) -> tuple[TrainingPlan, ScoringChunks]:
        """Agree before scoring on what the ranks must run alike.

        One all-gather of ``(error flag, scoring chunks, capacity chunks)`` per rank, read
        once: under lockstep scoring the most scoring chunks of any rank (the others pad)
        and whether any rank rejected its input (then no rank scores: every rank joins the
        selector's fail-together exchange, which names the ranks and their messages); for
        a capacity plan with micro-batches the most capacity chunks of any rank. Returns
        the agreed plan and chunks; both unchanged, with no exchange, when neither applies.
        """
        own_capacity_chunks = self._chunks_to_agree(chunks)
        if not self.lockstep_scoring and own_capacity_chunks is None:
            return self, chunks
        row = [int(chunks.error is not None), chunks.num_chunks, own_capacity_chunks or 0]
        lengths = [1] * comm.get_world_size(self.group)
        gathered = comm.all_gather_uneven(
            torch.tensor([row], device=chunks.device), self.group, lengths
        )
        rows = torch.cat(gathered).tolist()  # one read, before the scoring pass
        failed = [rank for rank, (flag, _, _) in enumerate(rows) if flag]
        error = chunks.error
        if error is None and failed:
            error = f"stopped before scoring because rank(s) {failed} rejected their input"
        most_scoring, most_capacity = (max(row[i] for row in rows) for i in (1, 2))
        padding = most_scoring - chunks.num_chunks if self.lockstep_scoring else 0
        agreed = replace(chunks, error=error, padding=padding, lockstep=self.lockstep_scoring)
        return self._agreed(most_capacity, chunks), agreed

    def _chunks_to_agree(self, chunks: ScoringChunks) -> int | None:
        """The capacity chunks this rank asks the ranks to agree on; None: nothing."""
        return None

    def _agreed(self, most_capacity_chunks: int, chunks: ScoringChunks) -> TrainingPlan:
        """This plan after the ranks agreed on ``most_capacity_chunks``."""
        return self

    @abstractmethod
    def train(self, batch: TrainingInputs) -> Trained:
        """Forward + backward of this rank's rows; every rank runs as many chunks."""


@dataclass(frozen=True)
class SelectedRowsPlan(TrainingPlan):
    """Train the selected rows themselves (reads the mask and the per-rank counts), in
    ``C = max_r ceil(n_r / micro_batch_size)`` chunks on every rank (zero-weight padding)."""

    def train(self, batch: TrainingInputs) -> Trained:
        """Forward + backward of the rows of :meth:`_rows`; gradients synchronised on the
        last chunk only."""
        (train_inputs, train_targets), trained_per_rank, moving = self._rows(batch)
        num_trained = batch_size(train_inputs)
        train_chunk = self.micro_batch_size or max(max(trained_per_rank), 1)
        num_chunks = chunks_for(trained_per_rank, train_chunk)
        scale = normalization_scale(
            batch.selection, "mean", self.grad_average, self.group, self.normalizer
        )
        dtype = batch.scored.example_losses.dtype
        loss_total = torch.zeros((), dtype=dtype, device=scale.device)
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
        return Trained(loss_total, selected_sum, num_chunks, num_trained, moving)

    def _rows(self, batch: TrainingInputs) -> tuple[tuple[Batch, Batch], list[int], float]:
        """``((inputs, targets), every rank's row count, seconds spent moving rows)``:
        this rank's selected rows, in index order."""
        chosen = batch.selection.mask.nonzero().squeeze(1)
        rows = (select_rows(batch.inputs, chosen), select_rows(batch.targets, chosen))
        return rows, list(batch.selection.selected_per_rank), 0.0


@dataclass(frozen=True)
class BalancedPlan(SelectedRowsPlan):
    """:class:`SelectedRowsPlan` after one all-to-all that leaves rank q the q-th
    contiguous floor/ceil(M/W) share of the selected rows in global order."""

    def _rows(self, batch: TrainingInputs) -> tuple[tuple[Batch, Batch], list[int], float]:
        """The selected rows after the all-to-all, every rank's share and its seconds."""
        rows, owned_per_rank, _ = super()._rows(batch)
        started = time.perf_counter()
        rows, trained_per_rank = move_to_shares(rows, owned_per_rank, self.group)
        return rows, trained_per_rank, time.perf_counter() - started


@dataclass(frozen=True)
class CapacityPlan(TrainingPlan):
    """Train ``capacity`` rows in chunks of ``micro_batch_size`` (default: one chunk), then
    the overflow the same way.

    The rows are this rank's selected ones first (in index order), then its hardest
    unselected valid ones at weight 0. The overflow (selected rows beyond ``capacity``,
    largest over the ranks) is all-reduced before the training forward and read after
    the training backward is enqueued: the step's one host read. With micro-batches the
    capacity is rounded up to the most capacity chunks of any rank (:meth:`agree`), so
    every rank runs the same chunks.
    """

    selector: HardExampleSelector
    capacity: int

    def _chunks_to_agree(self, chunks: ScoringChunks) -> int | None:
        if self.micro_batch_size is None:
            return None
        return -(-self.capacity // chunks.chunk_size)

    def _agreed(self, most_capacity_chunks: int, chunks: ScoringChunks) -> TrainingPlan:
        # Only called with micro-batches. The chunk size is the checked one: micro_batch_size,
        # or the whole batch when it was rejected (then this rank trains at weight 0, in as
        # many chunks as the others).
        size = chunks.chunk_size
        return replace(self, capacity=most_capacity_chunks * size, micro_batch_size=size)

    def train(self, batch: TrainingInputs) -> Trained:
        """Forward + backward of the capacity chunks, then of the overflow's chunks."""
        selection = batch.selection
        order = _selected_first(batch.scored.scores, batch.scored.valid, selection.mask)
        local = selection.on_device.num_selected_local
        overflow = torch.stack([(local - self.capacity).clamp(min=0), local])
        overflow = comm.all_reduce_max(overflow, self.group)
        scale = normalization_scale(
            selection, "mean", self.grad_average, self.group, self.normalizer
        )
        chunk = self.micro_batch_size or max(self.capacity, 1)
        deepspeed = is_deepspeed_engine(batch.model)
        # DeepSpeed reduces at its accumulation boundary only, so its capacity chunks defer
        # that and an overflow chunk always follows. Other engines synchronise the last
        # capacity chunk: that leaves identical gradients on every rank, and averaging is
        # linear, so the overflow's own synchronised backward adds its part exactly.
        span = _RowSpan(batch, order, chunk, scale)
        parts = span.train(0, self.capacity, last_syncs=not deepspeed)
        extra, selected_here = overflow.tolist()  # the one host read, after the backward
        _LAST_SELECTED[self.selector] = selected_here
        if extra or deepspeed:
            parts += span.train(self.capacity, extra, last_syncs=True)
        loss = torch.stack([p[0] for p in parts]).sum()
        selected_sum = torch.stack([p[1] for p in parts]).sum()
        return Trained(loss, selected_sum, len(parts))


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


def _selected_first(scores: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` row order: the selected rows (index order), then the other valid rows
    hardest first, then the invalid ones. One sort, on the device."""
    keys = hardness_key(scores).to(torch.int64)
    keys = keys.where(valid & ~torch.isnan(scores), torch.iinfo(torch.int64).min)
    keys = keys.where(~mask, torch.iinfo(torch.int64).max)
    return keys.sort(descending=True, stable=True).indices


@dataclass(frozen=True)
class _RowSpan:
    """Training of rows of ``order`` (``(N,)``, :func:`_selected_first`) in chunks of
    ``chunk``, each row weighted 1 if selected, else 0, the loss scaled by ``scale``."""

    batch: TrainingInputs
    order: torch.Tensor
    chunk: int
    scale: torch.Tensor

    def train(
        self, start: int, count: int, last_syncs: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``order[start : start + count]`` (at least one chunk); gradients
        synchronised on the last chunk only, and only if ``last_syncs``. Returns each
        chunk's detached loss and float64 sum of the selected rows' losses."""
        bounds = range(start, start + max(count, 1), self.chunk)
        return [
            self._train_chunk(
                first,
                min(self.chunk, start + count - first),
                sync=last_syncs and first == bounds[-1],
            )
            for first in bounds
        ]

    def _train_chunk(self, start: int, count: int, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of rows ``order[start : start + count]`` (past the end: the
        last row again, at weight 0)."""
        batch, order = self.batch, self.order
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
            finite = torch.isfinite(batch.scored.example_losses).index_select(0, rows)
            rows = rows.where(weights | finite, order[:1])
            losses, _ = batch.reduce_losses(
                call_model(batch.model, select_rows(batch.inputs, rows)),
                select_rows(batch.targets, rows),
            )
            kept = torch.where(weights, losses, 0.0)
            loss = scaled(kept.sum(), self.scale)
            batch.backward(loss)
        return loss.detach(), kept.detach().sum(dtype=torch.float64)


def zero_weight_loss(batch: TrainingInputs) -> torch.Tensor:
    """A zero loss through the wrapped model, for a chunk with no example to train.

    Only examples with a finite loss go through: the backward of a NaN or inf example
    (NaN inputs, say) is NaN even at weight 0 and would poison every rank's gradient.
    """
    # Two, so BatchNorm1d accepts the batch in train mode.
    rows = torch.isfinite(batch.scored.example_losses).nonzero().squeeze(1)[:2]
    with frozen_norm_statistics(batch.module):
        losses, _ = batch.reduce_losses(
            call_model(batch.model, select_rows(batch.inputs, rows)),
            select_rows(batch.targets, rows),
        )
    return torch.where(torch.zeros_like(losses, dtype=torch.bool), losses, 0.0).sum()
