"""This rank's flattened losses, masks and counts, prepared before any communication."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dist_ohem import kselect
from dist_ohem.result import NO_KEY
from dist_ohem.selection import SelectionRule

__all__ = ["CALL", "CHECK", "HEADER", "LocalBatch", "empty_batch", "prepare", "row_columns"]

# Columns of the per-rank row that every selector call exchanges (after comm's error flag).
(
    NUMEL,
    VALID,
    NAN,
    FORCED,
    CANDIDATES,
    ABOVE,
    MIN_ABOVE_KEY,
    CONFIG,
    KEY_BITS,
    CALLS,
    KIND,
) = range(11)
HEADER = 11
#: What a row was sent by: a selector call, or ``HardExampleSelector.check``.
CALL, CHECK = 0, 1


@dataclass
class LocalBatch:
    """This rank's flattened inputs and their counts, before any communication.

    Masks are None when trivially so (``candidate``: every instance; ``forced``,
    ``above``: none) and counts are 0-dim tensors when the device holds them.
    """

    losses: torch.Tensor
    candidate: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    above: torch.Tensor | None = None
    num_valid: int | torch.Tensor = 0
    num_nan: int | torch.Tensor = 0
    num_forced: int | torch.Tensor = 0
    num_candidates: int | torch.Tensor = 0
    num_above: int | torch.Tensor = 0
    min_above_key: int | torch.Tensor = NO_KEY
    valid: torch.Tensor | None = None

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """Hardness keys of the losses, computed once when an algorithm needs them."""
        return kselect.keys_of(self.losses)

    def with_forced(self, picked: torch.Tensor) -> torch.Tensor:
        """``picked`` together with the forced instances (the positives of neg_pos_ratio)."""
        return picked if self.forced is None else self.forced | picked

    def candidate_mask(self) -> torch.Tensor:
        """``candidate`` as a tensor."""
        if self.candidate is None:
            return torch.ones_like(self.losses, dtype=torch.bool)
        return self.candidate


def prepare(
    losses: torch.Tensor,
    valid: torch.Tensor | None,
    positive: torch.Tensor | None,
    rule: SelectionRule,
    scope: str,
    nan_policy: str,
) -> LocalBatch:
    """Check this rank's inputs and count them, without communicating.

    Raises TypeError / ValueError for bad input; the selector reports it through the
    row exchange, so that every rank raises it.
    """
    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
        raise TypeError(
            "losses must be a floating-point tensor of per-instance losses, got "
            f"{getattr(losses, 'dtype', type(losses).__name__)}"
        )
    for name, extra in (("valid", valid), ("positive", positive)):
        if extra is not None and tuple(extra.shape) != tuple(losses.shape):
            raise ValueError(
                f"`{name}` has shape {tuple(extra.shape)} but losses have shape "
                f"{tuple(losses.shape)}; pass one mask entry per loss"
            )
    if rule.needs_positive and positive is None and scope != "all":
        raise ValueError(
            "neg_pos_ratio needs `positive=`, a bool mask marking the positive instances"
        )
    flat = losses.detach().reshape(-1)
    batch = LocalBatch(losses=flat, num_valid=flat.numel())
    batch.valid = None if valid is None else valid.reshape(-1).to(torch.bool)
    usable = batch.valid
    if nan_policy == "raise":
        # A flag, not a count: NaN anywhere makes every rank raise after the exchange
        # (which counts them then). amax propagates NaN, one cheap reduction.
        if usable is None:
            batch.num_nan = kselect.any_nan(flat) if flat.numel() else 0
        else:
            batch.num_nan = (torch.isnan(flat) & usable).any()
    else:
        nan = torch.isnan(flat)
        batch.num_nan = (nan if usable is None else nan & usable).sum()
        usable = ~nan if usable is None else usable & ~nan
    if usable is not None:
        batch.num_valid = usable.sum()
    if rule.needs_positive and scope != "all":
        valid_mask = torch.ones_like(flat, dtype=torch.bool) if usable is None else usable
        batch.forced, batch.candidate = rule.split(valid_mask, positive.reshape(-1).to(torch.bool))
        batch.num_forced, batch.num_candidates = batch.forced.sum(), batch.candidate.sum()
    else:
        batch.candidate, batch.num_candidates = usable, batch.num_valid
    if rule.loss_thresh is not None and scope != "all":
        batch.above = rule.above_threshold(flat, batch.candidate_mask())
        batch.num_above = batch.above.sum()
        if flat.numel():
            batch.min_above_key = batch.keys.to(torch.int64).where(batch.above, NO_KEY).min()
    return batch


def empty_batch(losses: object) -> LocalBatch:
    """A batch of no instances with the dtype and device of ``losses`` (if it has them)."""
    dtype = getattr(losses, "dtype", torch.float32)
    device = getattr(losses, "device", torch.device("cpu"))
    loss_dtype = (
        dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    )
    empty = torch.zeros(0, dtype=torch.bool, device=device)
    return LocalBatch(
        losses=torch.zeros(0, dtype=loss_dtype, device=device),
        candidate=empty,
        forced=empty,
        above=empty,
    )


def row_columns(
    batch: LocalBatch, config: int, key_bits: int, calls: int, kind: int = CALL
) -> list[int | torch.Tensor]:
    """This rank's header row, in column order (device counts stay 0-dim tensors)."""
    columns = {
        NUMEL: batch.losses.numel(),
        VALID: batch.num_valid,
        NAN: batch.num_nan,
        FORCED: batch.num_forced,
        CANDIDATES: batch.num_candidates,
        ABOVE: batch.num_above,
        MIN_ABOVE_KEY: batch.min_above_key,
        CONFIG: config,
        KEY_BITS: key_bits,
        CALLS: calls,
        KIND: kind,
    }
    return [columns[column] for column in range(HEADER)]
