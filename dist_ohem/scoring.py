"""The scoring pass's parts: per-example losses over valid positions, scores, input checks.

Used by :func:`dist_ohem.ohem_step` (docs/DESIGN.md §9). An example's loss is the mean of the
criterion's per-instance losses over its *valid positions*: with one integer target
tensor of shape ``(N, ...)``, the positions not equal to ``ignore_index``. An example with
no valid position is invalid: not counted in K, never selected, never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dist_ohem.batches import Batch, batch_size

__all__ = [
    "ExampleLosses",
    "ScoreFn",
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


def checked_valid(valid: torch.Tensor | None, num_examples: int) -> torch.Tensor:
    """``valid`` as an ``(N,)`` bool tensor (all True when None)."""
    if valid is None:
        return torch.ones(num_examples, dtype=torch.bool)
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
    num_nan = int(torch.count_nonzero(torch.isnan(scores) & example_valid))
    if num_nan:
        raise ValueError(
            f"score_fn returned {num_nan} NaN score(s) for valid examples; fix score_fn, "
            "or pass nan='ignore' to the selector to treat NaN-scored examples as invalid"
        )
