"""The scoring pass of :func:`dist_ohem.ohem_step`: per-example losses over valid positions,
scores, input checks (docs/DESIGN.md §6, §9).

An example's loss is the mean of the criterion's per-instance losses over its *valid
positions*: with one integer target tensor of shape ``(N, ...)``, the positions not equal
to ``ignore_index``. An example with no valid position is invalid: not counted in K, never
selected, never trained.

:class:`ScoringPass` runs the pass in stages: :meth:`ScoringPass.check` (the input checks,
local, never raising), the chunk agreement (owned by the training plan,
:meth:`dist_ohem.train_pass.TrainingPlan.agree`), :meth:`ScoringPass.score` (the no-grad
forwards, with held errors and padding forwards, then the NaN check).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_ohem.batches import Batch, batch_device, batch_size, call_model, chunk_bounds, select_rows
from dist_ohem.wrappers import scoring_context

__all__ = [
    "ExampleLosses",
    "ScoreFn",
    "Scored",
    "ScoringChunks",
    "ScoringPass",
    "check_no_nan_scores",
    "checked_micro_batch_size",
    "checked_valid",
    "masked_mean_per_example",
    "mean_per_example",
    "score_chunk",
]

ScoreFn = Callable[[torch.Tensor, Batch, Batch], torch.Tensor]


@dataclass(frozen=True)
class ExampleLosses:
    """Model outputs and targets -> per-example losses ``(N,)`` and the examples that have
    at least one valid position ``(N,)`` bool.

    Positions of a single integer target tensor equal to ``ignore_index`` are invalid;
    the default reduction is the mean over each example's valid positions (0 for an
    example without any). Without an ignore mask every position counts.
    """

    per_instance: Callable[[Any, Any], torch.Tensor]
    example_score: Callable[[torch.Tensor], torch.Tensor] | None = None
    ignore_index: int | None = None

    def __call__(self, outputs: Any, targets: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.per_instance(outputs, targets)
        kept = self.kept_positions(targets)
        if self.example_score is not None:
            example_losses = self.example_score(losses)
        elif kept is None:
            example_losses = mean_per_example(losses)
        else:
            if tuple(losses.shape) != tuple(kept.shape):
                raise ValueError(
                    f"with ignore_index={self.ignore_index} the per-instance losses must have "
                    f"the targets' shape {tuple(kept.shape)}, got {tuple(losses.shape)}; "
                    "pass example_score= to reduce them to (N,) yourself (validity still "
                    "follows ignore_index)"
                )
            example_losses = masked_mean_per_example(losses, kept)
        num_examples = batch_size(targets)
        if tuple(example_losses.shape) != (num_examples,):
            raise ValueError(
                f"per-example losses have shape {tuple(example_losses.shape)}, expected "
                f"({num_examples},): one loss per example (reduction='none')"
            )
        if kept is None:
            has_position = torch.ones(num_examples, dtype=torch.bool, device=losses.device)
        else:
            has_position = kept.flatten(1).any(1) if kept.dim() > 1 else kept
        return example_losses, has_position.to(example_losses.device)

    def kept_positions(self, targets: Batch) -> torch.Tensor | None:
        """``targets != ignore_index`` for one integer target tensor, else None."""
        if (
            self.ignore_index is None
            or not isinstance(targets, torch.Tensor)
            or targets.is_floating_point()
        ):
            return None
        return targets != self.ignore_index


def mean_per_example(losses: torch.Tensor) -> torch.Tensor:
    """``(N, ...) -> (N,)``: mean over every non-batch dim (identity for ``(N,)``)."""
    # flatten, not reshape(N, -1): the latter is ambiguous for an empty batch (N = 0).
    return losses.flatten(1).mean(dim=1) if losses.dim() > 1 else losses


def masked_mean_per_example(losses: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(N, ...) -> (N,)``: mean of ``losses`` over the positions where ``kept`` (same
    shape) is True; 0 for an example without any. ``torch.where`` keeps a NaN or inf at an
    ignored position out of the value and the gradient."""
    if losses.dim() == 1:
        return torch.where(kept, losses, 0.0)
    flat, flat_kept = losses.flatten(1), kept.flatten(1)
    total = torch.where(flat_kept, flat, 0.0).sum(dim=1)
    return total / flat_kept.sum(dim=1).clamp(min=1)


def checked_micro_batch_size(micro_batch_size: int | None, num_examples: int) -> int:
    """The chunk size of the scoring pass: ``micro_batch_size``, or the whole batch."""
    if micro_batch_size is None:
        return max(num_examples, 1)
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise TypeError(f"micro_batch_size must be an int or None, got {micro_batch_size!r}")
    if micro_batch_size <= 0:
        raise ValueError(
            f"micro_batch_size must be a positive number of examples, got {micro_batch_size}; "
            "pass None to score and train the whole batch at once"
        )
    return micro_batch_size


def checked_valid(valid: torch.Tensor | None, num_examples: int) -> torch.Tensor | None:
    """``valid``, checked to be an ``(N,)`` bool tensor (None: every example counts)."""
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(
            "valid must be a bool tensor with one entry per example, got "
            f"{getattr(valid, 'dtype', type(valid).__name__)}"
        )
    if tuple(valid.shape) != (num_examples,):
        raise ValueError(
            f"valid has shape {tuple(valid.shape)} but the batch holds {num_examples} "
            f"examples; pass an ({num_examples},) bool mask, one entry per example"
        )
    return valid


def score_chunk(
    outputs: object,
    inputs: Batch,
    targets: Batch,
    reduce_losses: ExampleLosses,
    score_fn: ScoreFn | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses, scores and has-a-valid-position flags of one scoring chunk,
    from the model's ``outputs`` on its ``inputs``."""
    example_losses, has_position = reduce_losses(outputs, targets)
    if score_fn is None:
        return example_losses, example_losses, has_position
    scores = score_fn(example_losses, inputs, targets)
    check_scores(scores, example_losses, "score_fn's return value", "example")
    return example_losses, scores.detach().to(example_losses.device), has_position


def check_scores(scores: object, losses: torch.Tensor, what: str, unit: str) -> None:
    """Raise unless ``scores`` is a floating tensor with one entry per ``unit`` of ``losses``.

    ``what`` names the scores in the message (``"score_fn's return value"``, ``"score"``).
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(
            f"{what} must be a floating-point tensor, one score per {unit}, got "
            f"{getattr(scores, 'dtype', type(scores).__name__)}"
        )
    if tuple(scores.shape) != tuple(losses.shape):
        raise ValueError(
            f"{what} has shape {tuple(scores.shape)} but the per-{unit} losses have shape "
            f"{tuple(losses.shape)}; pass one score per {unit}"
        )


def check_no_nan_scores(scores: torch.Tensor, example_valid: torch.Tensor) -> None:
    """Raise if a valid example (``(N,)`` bool ``example_valid``) has a NaN score (``(N,)``)."""
    num_nan = int(torch.count_nonzero(torch.isnan(scores) & example_valid))
    if num_nan:
        raise ValueError(
            f"score_fn returned {num_nan} NaN score(s) for valid examples; fix score_fn, "
            "or pass nan='ignore' to the selector to treat NaN-scored examples as invalid"
        )


@dataclass(frozen=True)
class ScoringChunks:
    """The chunks of one rank's scoring pass, as checked and then agreed with the others.

    Attributes:
        chunk_size: examples per scoring chunk (``micro_batch_size``, or the whole batch).
        num_chunks: this rank's chunks, at least one, so that an empty batch still yields
            dtypes and devices.
        valid: the checked ``(N,)`` bool ``valid=``; None: every example counts.
        error: this rank's input error, or after the agreement a note that another rank
            rejected its input; None when the pass may run.
        device: where the batch lives (the agreement's all-gather runs there).
        padding: forwards to run after the chunks, to match the rank with the most.
        lockstep: the scoring forwards communicate (ZeRO-3 / FSDP with micro-batches): an
            error after a forward is held until every forward and padding forward ran.
    """

    chunk_size: int
    num_chunks: int
    valid: torch.Tensor | None
    error: str | None
    device: torch.device
    padding: int = 0
    lockstep: bool = False


@dataclass(frozen=True)
class Scored:
    """The scoring pass's outcome: ``(N,)`` per-example losses, scores and validity.

    A rank whose scoring failed has NaN losses and scores, no valid example and the
    ``error`` it joins the selection with (``selector.fail``).
    """

    example_losses: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    error: str | None = None

    @classmethod
    def failed(cls, message: str, inputs: Batch) -> Scored:
        """The outcome of a rank whose input or scoring pass failed with ``message``."""
        like = torch.full((batch_size(inputs),), math.nan, device=batch_device(inputs))
        return cls(like, like, torch.zeros_like(like, dtype=torch.bool), message)


@dataclass(frozen=True)
class ScoringPass:
    """The no-grad scoring forward over one rank's batch through the unwrapped ``module``
    (no DDP/DeepSpeed hooks, no activations kept), in chunks; one loss and one score per
    example. ``score_mode`` is :func:`dist_ohem.ohem_step`'s."""

    module: nn.Module
    inputs: Batch
    targets: Batch
    reduce_losses: ExampleLosses
    score_fn: ScoreFn | None
    score_mode: str

    def check(self, micro_batch_size: int | None, valid: torch.Tensor | None) -> ScoringChunks:
        """The input checks, before any collective: a bad input becomes the chunks' error
        (never raised here: every rank must still join the agreement and the selection)."""
        num_examples = batch_size(self.inputs)
        error, chunk_size, checked = None, max(num_examples, 1), None
        try:
            chunk_size = checked_micro_batch_size(micro_batch_size, num_examples)
            checked = checked_valid(valid, num_examples)
        except (TypeError, ValueError) as exc:
            error = str(exc)
        num_chunks = max(1, -(-num_examples // chunk_size))
        return ScoringChunks(chunk_size, num_chunks, checked, error, batch_device(self.inputs))

    def score(self, chunks: ScoringChunks, nan: str) -> Scored:
        """Run the pass over the agreed ``chunks``; any error (the chunks', the model's,
        the criterion's, ``score_fn``'s, a NaN score under the selector's ``nan="raise"``)
        gives a :meth:`Scored.failed` outcome instead of raising."""
        if chunks.error is not None:
            return Scored.failed(chunks.error, self.inputs)
        try:
            example_losses, scores, has_position = self._forward_chunks(chunks)
            valid = has_position if chunks.valid is None else has_position & chunks.valid
            if self.score_fn is not None and nan == "raise" and scores.device.type == "cpu":
                check_no_nan_scores(scores, valid)  # on a device: the selector's NaN flag
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by selector.fail
            message = f"the scoring pass raised {type(exc).__name__}: {exc}"
            return Scored.failed(message, self.inputs)
        return Scored(example_losses, scores, valid)

    def _forward_chunks(
        self, chunks: ScoringChunks
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N,)`` losses, scores and has-a-valid-position flags, chunk by chunk, then
        ``chunks.padding`` forwards of the first two examples."""
        num_examples = batch_size(self.inputs)
        held: Exception | None = None
        parts = []
        with torch.no_grad(), scoring_context(self.module, self.score_mode, self.inputs):
            for rows in chunk_bounds(num_examples, chunks.chunk_size, chunks.num_chunks):
                chunk_inputs = select_rows(self.inputs, rows)
                outputs = call_model(self.module, chunk_inputs)
                if held is not None:  # forwards only: in step with the other ranks
                    continue
                try:
                    chunk_targets = select_rows(self.targets, rows)
                    parts.append(
                        score_chunk(
                            outputs, chunk_inputs, chunk_targets, self.reduce_losses, self.score_fn
                        )
                    )
                except Exception as exc:
                    if not chunks.lockstep:
                        raise
                    # The other ranks still run their scoring forwards, which gather
                    # parameters; join those before failing together.
                    held = exc
            for _ in range(chunks.padding):
                call_model(self.module, select_rows(self.inputs, slice(0, 2)))
        if held is not None:
            raise held
        example_losses, scores, has_position = (
            torch.cat(part) for part in zip(*parts, strict=True)
        )
        return example_losses, scores, has_position
