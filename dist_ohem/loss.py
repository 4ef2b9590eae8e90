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
    "check_normalizer",
    "global_mean_loss",
    "masked_loss",
    "normalization_scale",
    "per_instance_criterion",
    "target_probability",
]

REDUCTIONS = ("mean", "sum")
#: What ``reduction="mean"`` divides by, over all ranks (docs/DESIGN.md §4).
NORMALIZERS = ("selected", "valid", "instances", "positives")


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
        reduction: ``"mean"``: divide by ``normalizer``'s global count; ``"sum"``: don't.
        normalizer: what ``"mean"`` divides by, counted over all ranks: ``"selected"``
            (default: M, the mean over the selected instances), ``"valid"`` (K, the
            non-ignored instances: mmseg's ``avg_non_ignore=True``), ``"instances"``
            (every instance, ignored ones included: mmseg's default, N·H·W) or
            ``"positives"`` (the valid instances of ``positive``, at least 1: SSD's
            number of foreground anchors). Each is at least 1.
        grad_average: the engine averages gradients over ranks (DDP, Accelerate,
            DeepSpeed do), so multiply by the world size W to undo that. Set False
            when gradients are summed.
        ignore_index: targets equal to this are invalid instances (never selected,
            never counted). Default: the criterion's own ``ignore_index`` if it has one
            (``nn.CrossEntropyLoss`` ignores -100). Only applies to integer targets.
        selector: a :class:`HardExampleSelector`; or give its arguments as keywords.
        prob_thresh: select by the probability of the target class instead of the loss:
            every instance with ``p < prob_thresh`` (compared in float64), but at least
            ``min_kept`` of the least probable (mmseg's, PaddleSeg's and HRNet's OHEM
            thresholds). ``input`` must be logits with the classes on dim 1 and
            ``target`` integer class indices; the selector's rule is then this
            threshold (give no other rule), on the score ``-p``.
        sync_mean_loss: compute :attr:`last_mean_loss` with one all-reduce of a scalar
            per call (on the device; nothing is read until you read it); False skips it
            (``last_mean_loss`` is then NaN).

    ``forward(input, target, positive=None, *, score=None, groups=None)`` returns the scalar
    ``(W / M) * sum(selected local losses)`` (``mean``), whose gradient, averaged over
    ranks, equals the gradient of the mean loss over the globally selected instances.
    The value is this rank's share, not the global mean (it must be, for the gradient);
    the global mean over the selected instances is :attr:`last_mean_loss` (a float, read
    from the device when you read it), the number to log. The last
    :class:`SelectionResult` is ``.last``. A call reads nothing back from the device: the
    normalization uses the selection's device-side counts (``result.on_device``).

    ``score`` (the shape of the per-instance losses) ranks the instances for selection
    instead of the loss (higher = harder; the NaN policy applies to it); the returned
    loss is still the criterion's. E.g. ``score=-losses.detach()`` selects the easiest.

    Each call selects on its own: under gradient accumulation every micro-batch gets its
    own top-M of that micro-batch (the docs page "Sequences, padding and accumulation").

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
        normalizer: str = "selected",
        grad_average: bool = True,
        ignore_index: int | None = None,
        selector: HardExampleSelector | None = None,
        sync_mean_loss: bool = True,
        prob_thresh: float | None = None,
        **selector_kwargs: object,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_normalizer(normalizer)
        if selector is not None and selector_kwargs:
            raise ValueError(
                "pass either selector= or the selector's keyword arguments, not both "
                f"(got selector and {sorted(selector_kwargs)})"
            )
        if prob_thresh is not None:
            selector_kwargs = _probability_rule(prob_thresh, selector, selector_kwargs)
        self.selector = selector if selector is not None else HardExampleSelector(**selector_kwargs)
        self.prob_thresh = prob_thresh
        # Kept out of the module tree: it shares the user's parameters and buffers.
        object.__setattr__(self, "_per_instance", per_instance_criterion(criterion))
        self.reduction = reduction
        self.normalizer = normalizer
        self.grad_average = grad_average
        self.ignore_index = (
            ignore_index if ignore_index is not None else getattr(criterion, "ignore_index", None)
        )
        self.sync_mean_loss = sync_mean_loss
        self.last: SelectionResult | None = None
        self._last_mean_loss: torch.Tensor | None = None
        # sync_mean_loss decides whether a collective runs: ranks must agree on it.
        self._caller_config = (
            "OHEMLoss",
            reduction,
            normalizer,
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
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss to back-propagate on this rank (see class docstring); ``groups``:
        the group id of every instance, for a selector with ``per_group=True``."""
        losses = None
        try:
            losses = self._per_instance(input, target)
            if self.prob_thresh is not None and score is None:
                score = -target_probability(input, target)
            if score is not None:
                check_scores(score, losses, "score", "instance")
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by fail()
            message = (
                str(exc)
                if losses is not None
                else (f"the criterion raised {type(exc).__name__}: {exc}")
            )
            return self.fail(message, input if losses is None else losses)
        valid = None
        if self.ignore_index is not None and not target.is_floating_point():
            valid = target != self.ignore_index
        ranked = losses if score is None else score
        result = self.selector(
            ranked, valid, positive, groups=groups, caller_config=self._caller_config
        )
        self._finish(result, losses.detach())
        return masked_loss(
            losses,
            result,
            self.reduction,
            self.grad_average,
            self.selector.group,
            self.normalizer,
        )

    def fail(self, message: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """Join this step's selection with an error, for a rank that has no losses.

        With eager checks every rank raises the same error here. With deferred checks
        (the default on accelerators) this rank selects nothing and gets a zero loss
        connected to ``like`` (the model's output), so its backward and the gradient
        all-reduce run as on the other ranks; every rank raises at the next call or at
        ``selector.check()`` (see :meth:`HardExampleSelector.fail`).
        """
        result = self.selector.fail(message, like, caller_config=self._caller_config)
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            like = torch.zeros(0, device=result.mask.device)
        self._finish(result, like.detach().new_zeros(result.mask.shape))
        return torch.where(torch.zeros_like(like, dtype=torch.bool), like, 0.0).sum()

    def _finish(self, result: SelectionResult, losses: torch.Tensor) -> None:
        """Keep the result and start the global mean loss's all-reduce (not read here)."""
        self.last = result
        selected_sum = torch.where(result.mask, losses, 0.0).sum(dtype=torch.float64)
        self._last_mean_loss = global_mean_loss(
            selected_sum, result, self.selector.group, self.sync_mean_loss
        )

    @property
    def last_mean_loss(self) -> float:
        """The mean loss over the M selected instances of all ranks in the last call.

        NaN before the first call and with ``sync_mean_loss=False``; 0.0 when nothing
        was selected. Reading it waits for the device.
        """
        return math.nan if self._last_mean_loss is None else float(self._last_mean_loss)


def _probability_rule(
    prob_thresh: float, selector: HardExampleSelector | None, selector_kwargs: dict
) -> dict:
    """The selector's keywords for ``prob_thresh``: the threshold ``-p > -prob_thresh``."""
    rules = ("keep", "top_k", "loss_thresh", "neg_pos_ratio")
    given = [name for name in rules if selector_kwargs.get(name) is not None]
    if selector is not None or given:
        raise ValueError(
            f"prob_thresh is the selection rule; do not also give {given or 'selector='}"
        )
    if not (0.0 <= prob_thresh <= 1.0):
        raise ValueError(f"prob_thresh must be in [0, 1], got {prob_thresh}")
    return {**selector_kwargs, "loss_thresh": -prob_thresh}


def target_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` softmax probability of each instance's target class, detached.

    ``logits`` ``(N, C, ...)``, ``target`` ``(N, ...)`` integer classes; a target outside
    ``[0, C)`` (an ignored one) reads class 0, a value nobody selects (it is invalid).
    Computed in the logits' dtype, as the per-GPU OHEM codes do.
    """
    classes = logits.shape[1]
    index = torch.where((target >= 0) & (target < classes), target, 0).unsqueeze(1)
    return logits.detach().softmax(1).gather(1, index).squeeze(1)


def global_mean_loss(
    selected_sum: torch.Tensor, result: SelectionResult, group: object = None, sync: bool = True
) -> torch.Tensor:
    """The mean loss over the M selected instances of all ranks, from this rank's sum.

    One all-reduce of the scalar ``selected_sum`` (skipped with one rank). The selection's
    own exchange carries counts and loss keys, not loss sums (and in two-pass mode the
    training losses only exist after it), hence the separate collective; ``sync=False``
    skips it and gives NaN. 0.0 when nothing is selected, like the loss.

    Returns:
        A 0-dim float64 tensor on the device of ``selected_sum``: nothing is read back.
    """
    if not sync:
        return selected_sum.new_full((), math.nan, dtype=torch.float64)
    total = comm.all_reduce_sum(selected_sum.detach().to(torch.float64), group)
    return total / result.on_device.num_selected_global.clamp(min=1)


def check_normalizer(normalizer: str) -> None:
    """Raise ValueError unless ``normalizer`` is one of :data:`NORMALIZERS`."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


def normalization_scale(
    result: SelectionResult,
    reduction: str = "mean",
    grad_average: bool = True,
    group: object = None,
    normalizer: str = "selected",
) -> torch.Tensor:
    """``c / D`` of docs/DESIGN.md §4 (``c`` = world size when ``grad_average``, else 1).

    ``D`` is ``normalizer``'s global count (:data:`NORMALIZERS`: M selected, K valid,
    every instance, or the valid positives), at least 1; ``reduction="sum"`` drops the
    ``1 / D``. A 0-dim float64 tensor on the mask's device, from the selection's
    device-side counts: nothing is read back.
    """
    counts = result.on_device
    divisor = {
        "selected": counts.num_selected_global,
        "valid": counts.num_valid_global,
        "instances": counts.num_instances_global,
        "positives": counts.num_positive_global,
    }[normalizer]
    scale = float(comm.get_world_size(group) if grad_average else 1)
    if reduction == "mean":
        return scale / divisor.clamp(min=1).to(torch.float64)
    return divisor.new_full((), scale, dtype=torch.float64)


def masked_loss(
    losses: torch.Tensor,
    result: SelectionResult,
    reduction: str = "mean",
    grad_average: bool = True,
    group: object = None,
    normalizer: str = "selected",
) -> torch.Tensor:
    """``(c / D) * sum(losses[result.mask])`` per docs/DESIGN.md §4, connected to the graph
    (``D``: see :func:`normalization_scale`).

    With nothing selected the value is 0 but still depends on ``losses``, so the
    backward pass and DDP's gradient all-reduce run on every rank. ``torch.where`` (not
    a product) keeps unselected ``inf``/NaN out of the value.
    """
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    total = torch.where(result.mask, losses, zero).sum()
    return scaled(total, normalization_scale(result, reduction, grad_average, group, normalizer))


def scaled(total: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``total * scale`` in ``total``'s dtype, the product taken in at least float32."""
    return (total * scale.to(torch.promote_types(total.dtype, torch.float32))).to(total.dtype)
