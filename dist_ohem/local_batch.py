"""This rank's flattened losses, masks and counts, prepared before any communication."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dist_ohem import kselect
from dist_ohem.result import NO_KEY
from dist_ohem.selection import SelectionRule

__all__ = ["LocalBatch", "empty_batch", "prepare"]


@dataclass
class LocalBatch:
    """This rank's flattened inputs and their counts, before any communication.

    Masks are None when trivially so (``candidate``: every instance; ``forced``,
    ``above``: none) and counts are 0-dim tensors when the device holds them. The
    losses' shape (before flattening), dtype and device are read once, here.
    """

    losses: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    candidate: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    above: torch.Tensor | None = None
    num_valid: int | torch.Tensor = 0
    num_nan: int | torch.Tensor = 0
    num_forced: int | torch.Tensor = 0
    num_positive: int | torch.Tensor = 0
    num_above: int | torch.Tensor = 0
    min_above_key: int | torch.Tensor = NO_KEY
    valid: torch.Tensor | None = None
    positive: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    grouped: torch.Tensor | None = None
    num_grouped: int | torch.Tensor = 0

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def num_examples(self) -> int:
        """Rows of dim 0 (1 for a 0-dim loss): what ``min_kept_per="example"`` counts."""
        return self.shape[0] if len(self.shape) else 1

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
    groups: torch.Tensor | None = None,
) -> LocalBatch:
    """Check this rank's inputs and count them, without communicating.

    Raises TypeError / ValueError for bad input; the selector reports it through the
    row exchange, so that every rank raises it.
    """
    dtype, shape = _checked(losses, valid, positive, rule.needs_positive and scope != "all")
    if groups is not None and tuple(groups.shape) != tuple(shape):
        raise ValueError(
            f"`groups` has shape {tuple(groups.shape)} but losses have shape {tuple(shape)}; "
            "pass one group id per loss"
        )
    flat = losses.detach() if len(shape) == 1 else losses.detach().reshape(-1)
    numel = shape.numel()
    batch = LocalBatch(flat, shape, dtype, losses.device, num_valid=numel)
    batch.valid = None if valid is None else valid.reshape(-1).to(torch.bool)
    usable = batch.valid
    if nan_policy == "raise":
        # A flag, not a count: NaN anywhere makes every rank raise after the exchange
        # (which counts them then). amax propagates NaN, one cheap reduction.
        if usable is None:
            batch.num_nan = kselect.any_nan(flat) if numel else 0
        else:
            batch.num_nan = (torch.isnan(flat) & usable).any()
    else:
        nan = torch.isnan(flat)
        batch.num_nan = (nan if usable is None else nan & usable).sum()
        usable = ~nan if usable is None else usable & ~nan
    if usable is not None:
        batch.num_valid = usable.sum()
    flat_positive = None if positive is None else positive.reshape(-1).to(torch.bool)
    batch.positive = flat_positive
    batch.groups = None if groups is None else groups.reshape(-1)
    if flat_positive is not None:
        batch.num_positive = (flat_positive if usable is None else flat_positive & usable).sum()
    if rule.needs_positive and scope != "all":
        valid_mask = torch.ones_like(flat, dtype=torch.bool) if usable is None else usable
        batch.forced, batch.candidate = rule.split(valid_mask, flat_positive)
        batch.num_forced = batch.num_positive
    else:
        batch.candidate = usable
    if rule.loss_thresh is not None and scope != "all":
        batch.above = rule.above_threshold(flat, batch.candidate_mask())
        batch.num_above = batch.above.sum()
        if numel:
            batch.min_above_key = batch.keys.to(torch.int64).where(batch.above, NO_KEY).min()
    return batch


def _checked(
    losses: object,
    valid: torch.Tensor | None,
    positive: torch.Tensor | None,
    needs_positive: bool,
) -> tuple[torch.dtype, torch.Size]:
    """The losses' dtype and shape, after the checks of :func:`prepare`."""
    dtype = losses.dtype if isinstance(losses, torch.Tensor) else None
    if dtype is None or not dtype.is_floating_point:
        raise TypeError(
            "losses must be a floating-point tensor of per-instance losses, got "
            f"{dtype or type(losses).__name__}"
        )
    shape = losses.shape
    for name, extra in (("valid", valid), ("positive", positive)):
        if extra is not None and tuple(extra.shape) != tuple(shape):
            raise ValueError(
                f"`{name}` has shape {tuple(extra.shape)} but losses have shape "
                f"{tuple(shape)}; pass one mask entry per loss"
            )
    if needs_positive and positive is None:
        raise ValueError(
            "neg_pos_ratio needs `positive=`, a bool mask marking the positive instances"
        )
    return dtype, shape


def empty_batch(losses: object, grouped: bool = False) -> LocalBatch:
    """A batch of no instances with the dtype and device of ``losses`` (if it has them);
    ``grouped``: as if a grouped selection picked nothing in it."""
    dtype = getattr(losses, "dtype", torch.float32)
    device = getattr(losses, "device", torch.device("cpu"))
    loss_dtype = (
        dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    )
    empty = torch.zeros(0, dtype=torch.bool, device=device)
    return LocalBatch(
        losses=torch.zeros(0, dtype=loss_dtype, device=device),
        shape=torch.Size([0]),
        dtype=loss_dtype,
        device=device,
        candidate=empty,
        forced=empty,
        above=empty,
        grouped=empty if grouped else None,
    )
