"""OHEMLoss: a per-instance loss wrapped with global hard-example selection (mask mode)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from dist_ohem import comm
from dist_ohem.scoring import check_scores
from dist_ohem.selector import HardExampleSelector, SelectionResult

__all__ = [
    "OHEMLoss",
    "global_mean_loss",
    "masked_loss",
    "normalization_scale",
    "per_instance_criterion",
]

REDUCTIONS = ("mean", "sum")


def per_instance_criterion(
    criterion: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A callable returning per-instance losses for ``criterion``.

    A torch loss module (anything with a ``reduction`` attribute) is shallow-copied with
    ``reduction="none"``: the user's object is not changed, and the copy shares its
    parameters and buffers (``weight``, ``pos_weight``), so moving the original to a
    device moves them for the copy too. Any other callable must already return
    per-instance losses.
    """
    if isinstance(criterion, nn.Module) and hasattr(criterion, "reduction"):
        per_instance = copy.copy(criterion)
        per_instance.reduction = "none"
        return per_instance
    if not callable(criterion):
        raise TypeError(f"criterion must be a loss module or a callable, got {criterion!r}")
    return criterion


class OHEMLoss(nn.Module):
    """Online hard example mining over the whole data-parallel batch (docs/DESIGN.md §4).

    One forward and backward over every instance; unselected instances get zero weight.
    Call it on every rank each step, like the loss it wraps::

        criterion = OHEMLoss(nn.CrossEntropyLoss(), keep=0.25)
        loss = criterion(ddp_model(x), y)
        loss.backward()

    Args:
        criterion: a torch loss module (used with ``reduction="none"``), or a callable
            ``(input, target) -> per-instance losses``.
        reduction: ``"mean"``: divide by the global number selected M; ``"sum"``: don't.
        grad_average: the engine averages gradients over ranks (DDP, Accelerate,
            DeepSpeed do), so multiply by the world size W to undo that. Set False
            when gradients are summed.
        ignore_index: targets equal to this are invalid instances (never selected,
            never counted). Default: the criterion's own ``ignore_index`` if it has one
            (``nn.CrossEntropyLoss`` ignores -100). Only applies to integer targets.
        selector: a :class:`HardExampleSelector`; or give its arguments as keywords.
        sync_mean_loss: compute :attr:`last_mean_loss` with one all-reduce of a scalar
            per call; False skips it (``last_mean_loss`` is then NaN).

    ``forward(input, target, positive=None, *, score=None)`` returns the scalar
    ``(W / M) * sum(selected local losses)`` (``mean``), whose gradient, averaged over
    ranks, equals the gradient of the mean loss over the globally selected instances.
    The value is this rank's share, not the global mean (it must be, for the gradient);
    the global mean over the selected instances is :attr:`last_mean_loss` (a float), the
    number to log. The last :class:`SelectionResult` is ``.last``.

    ``score`` (the shape of the per-instance losses) ranks the instances for selection
    instead of the loss (higher = harder; the NaN policy applies to it); the returned
    loss is still the criterion's. E.g. ``score=-losses.detach()`` selects the easiest.

    Each call selects on its own: under gradient accumulation every micro-batch gets its
    own top-M of that micro-batch (README, "Sequences, padding and accumulation").

    With ``nan="ignore"`` a NaN loss is never selected and adds nothing to the value, but
    the backward still runs through every instance: NaN *activations* (NaN inputs, say)
    reach the gradient as they would without OHEM. :func:`dist_ohem.ohem_step` does not
    back-propagate through unselected examples.
    """

    def __init__(
        self,
        criterion: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        reduction: str = "mean",
        grad_average: bool = True,
        ignore_index: int | None = None,
        selector: HardExampleSelector | None = None,
        sync_mean_loss: bool = True,
        **selector_kwargs: object,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if selector is not None and selector_kwargs:
            raise ValueError(
                "pass either selector= or the selector's keyword arguments, not both "
                f"(got selector and {sorted(selector_kwargs)})"
            )
        self.selector = selector if selector is not None else HardExampleSelector(**selector_kwargs)
        # Kept out of the module tree: it shares the user's parameters and buffers.
        object.__setattr__(self, "_per_instance", per_instance_criterion(criterion))
        self.reduction = reduction
        self.grad_average = grad_average
        self.ignore_index = (
            ignore_index if ignore_index is not None else getattr(criterion, "ignore_index", None)
        )
        self.sync_mean_loss = sync_mean_loss
        self.last: SelectionResult | None = None
        self.last_mean_loss: float = math.nan
        # sync_mean_loss decides whether a collective runs: ranks must agree on it.
        self._caller_config = (
            "OHEMLoss",
            reduction,
            grad_average,
            self.ignore_index,
            sync_mean_loss,
        )

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        positive: torch.Tensor | None = None,
        *,
        score: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss to back-propagate on this rank (see class docstring)."""
        losses = None
        try:
            losses = self._per_instance(input, target)
            if score is not None:
                check_scores(score, losses, "score", "instance")
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by fail()
            message = (
                str(exc)
                if losses is not None
                else (f"the criterion raised {type(exc).__name__}: {exc}")
            )
            self.selector.fail(message, input, caller_config=self._caller_config)
        valid = None
        if self.ignore_index is not None and not target.is_floating_point():
            valid = target != self.ignore_index
        ranked = losses if score is None else score
        result = self.selector(ranked, valid, positive, caller_config=self._caller_config)
        self.last = result
        selected_sum = torch.where(result.mask, losses.detach(), 0.0).sum(dtype=torch.float64)
        self.last_mean_loss = global_mean_loss(
            selected_sum, result, self.selector.group, self.sync_mean_loss
        )
        return masked_loss(losses, result, self.reduction, self.grad_average, self.selector.group)


def global_mean_loss(
    selected_sum: torch.Tensor, result: SelectionResult, group: object = None, sync: bool = True
) -> float:
    """The mean loss over the M selected instances of all ranks, from this rank's sum.

    One all-reduce of the scalar ``selected_sum`` (skipped with one rank). The selection's
    own exchange carries counts and loss keys, not loss sums (and in two-pass mode the
    training losses only exist after it), hence the separate collective; ``sync=False``
    skips it and returns NaN. 0.0 when nothing is selected, like the loss.
    """
    if not sync:
        return math.nan
    total = comm.all_reduce_sum(selected_sum.detach().to(torch.float64), group)
    return float(total) / max(result.num_selected_global, 1)


def normalization_scale(
    result: SelectionResult,
    reduction: str = "mean",
    grad_average: bool = True,
    group: object = None,
) -> float:
    """``c / M`` of docs/DESIGN.md §4 (``c`` = world size when ``grad_average``, else 1).

    ``reduction="sum"`` drops the ``1 / M``; with M = 0 the divisor is 1 (nothing selected).
    """
    scale = float(comm.get_world_size(group) if grad_average else 1)
    if reduction == "mean":
        scale /= max(result.num_selected_global, 1)
    return scale


def masked_loss(
    losses: torch.Tensor,
    result: SelectionResult,
    reduction: str = "mean",
    grad_average: bool = True,
    group: object = None,
) -> torch.Tensor:
    """``(c / M) * sum(losses[result.mask])`` per docs/DESIGN.md §4, connected to the graph.

    With nothing selected the value is 0 but still depends on ``losses``, so the
    backward pass and DDP's gradient all-reduce run on every rank. ``torch.where`` (not
    a product) keeps unselected ``inf``/NaN out of the value.
    """
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    selected = torch.where(result.mask, losses, zero)
    return selected.sum() * normalization_scale(result, reduction, grad_average, group)
