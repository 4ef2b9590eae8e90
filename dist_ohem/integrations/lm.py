"""Language-model pieces the Hugging Face integration builds on, in plain torch.

- :func:`token_losses` and :func:`sequence_losses`: per-token cross-entropy of a
  causal (or token-classification) model and its mean over each sequence's targets;
- :func:`concat_batches`: the micro-batches of one optimizer step as one batch, the
  shorter ones right-padded;
- :class:`ReferenceModel`: a frozen model whose losses are subtracted from the training
  model's, for excess-loss scores (RHO-LOSS, Rho-1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "ReferenceModel",
    "aligned",
    "concat_batches",
    "logits_of",
    "model_inputs",
    "sequence_losses",
    "token_losses",
]

IGNORE_INDEX = -100
#: The value right-padding gives each key of a batch: ignored labels, masked-out
#: attention; any other key (input ids, token types) gets 0, which the mask hides.
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a ``ModelOutput`` / mapping with ``"logits"``, or
    the logits tensor itself.

    Raises:
        TypeError: the output has no logits.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
    raise TypeError(
        f"the model output has no logits (got {keys}); dist_ohem needs a model that "
        "returns a ModelOutput with 'logits' (return_dict=True)"
    )


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without its ``labels``: what the model is called with when the loss is
    computed outside it."""
    return {key: value for key, value in batch.items() if key != "labels"}


def aligned(
    logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` with position t's logits against label t + 1 when
    ``shift_labels`` (causal LM), the labels on the logits' device.

    Raises:
        ValueError: they do not line up.
    """
    if shift_labels:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match labels of shape "
            f"{tuple(labels.shape)}{' after the causal shift' if shift_labels else ''}; "
            "pass shift_labels=False for token classification"
        )
    return logits, labels.to(logits.device)


def token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift_labels: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy in float32, as transformers' own causal-LM loss.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` integer targets, ``ignore_index`` = not a target.
        shift_labels: position t's logits predict label t + 1 (causal LM); False for
            token classification.
        ignore_index: label of positions that are not targets.

    Returns:
        ``(losses, kept)``, both ``(B, T')`` with ``T' = T - 1`` when shifting: the
        losses (0 at ignored positions) and whether each position is a target.

    Raises:
        ValueError: logits and labels do not line up.
    """
    logits, labels = aligned(logits, labels, shift_labels)
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
    )
    return losses.view(labels.shape), labels != ignore_index


def sequence_losses(losses: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's mean token loss over its targets.

    Args:
        losses, kept: ``(B, T)`` from :func:`token_losses`.

    Returns:
        ``(means, targets)``: ``(B,)`` the mean over each row's kept positions (0 for a
        row without any) and ``(B,)`` int64 the number of kept positions.
    """
    targets = kept.sum(1)
    return losses.sum(1) / targets.clamp(min=1), targets


def concat_batches(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The rows of ``batches``, in order, as one batch.

    Tensors with a sequence dimension (dim 1) of different lengths are right-padded to
    the longest with :data:`PAD_VALUES` (labels ignored, attention masked): a causal
    model's outputs at the real positions do not change, so neither do the losses.

    Args:
        batches: micro-batches with the same keys, each a tensor with the rows on dim 0.

    Raises:
        TypeError, ValueError: a value is not a tensor, or the keys differ.
    """
    keys = list(batches[0])
    for batch in batches:
        if list(batch) != keys:
            raise ValueError(
                f"the micro-batches of one optimizer step have different keys: {keys} "
                f"and {list(batch)}"
            )
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"batch entry {key!r} is a {type(value).__name__}; selecting sequences "
                    "needs every entry of the batch to be a tensor with the rows on dim 0"
                )
    return {key: _concat_padded([batch[key] for batch in batches], key) for key in keys}


def _concat_padded(parts: list[torch.Tensor], key: str) -> torch.Tensor:
    """``parts`` concatenated on dim 0, each right-padded on dim 1 to the longest."""
    if parts[0].dim() < 2:
        return torch.cat(parts)
    length = max(part.shape[1] for part in parts)
    fill = PAD_VALUES.get(key, 0)
    padded = [
        nn.functional.pad(part, (0, 0) * (part.dim() - 2) + (0, length - part.shape[1]), value=fill)
        for part in parts
    ]
    return torch.cat(padded)


class ReferenceModel:
    """A frozen model for excess-loss scores: training loss minus this model's loss.

    RHO-LOSS (Mindermann et al., 2022) and Rho-1 (Lin et al., 2024) select what a model
    trained on clean held-out data finds easy but the training model does not: noise
    that no model can learn has a high loss under both and a small excess.

    The module is put in eval mode with gradients off, and moved once (at the first
    call) to the device and floating dtype of the training model's parameters. Each
    rank keeps a full copy: it is not sharded by ZeRO-3 or FSDP.

    Args:
        module: a model called like the training model (``module(**inputs)`` returning
            logits), with the same vocabulary.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"reference_model must be a torch.nn.Module, got {type(module).__name__}"
            )
        self.module = module
        self._placed_like: tuple[torch.device, torch.dtype] | None = None

    def token_losses(
        self,
        inputs: Mapping[str, Any],
        labels: torch.Tensor,
        like: torch.Tensor,
        *,
        shift_labels: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> torch.Tensor:
        """The reference's ``(B, T')`` per-token losses (see :func:`token_losses`).

        Args:
            inputs: the model inputs, without labels.
            labels: ``(B, T)`` the targets.
            like: a parameter of the training model: the reference runs on its
                device and in its dtype.
        """
        self._place_like(like)
        with torch.no_grad():
            logits = logits_of(self.module(**inputs))
        options = {"shift_labels": shift_labels, "ignore_index": ignore_index}
        return token_losses(logits, labels, **options)[0]

    def _place_like(self, like: torch.Tensor) -> None:
        """Eval mode, no gradients, on ``like``'s device and dtype (once per placement)."""
        placement = (like.device, like.dtype)
        if self._placed_like == placement:
            return
        self.module.eval()
        self.module.requires_grad_(False)
        self.module.to(device=like.device, dtype=like.dtype)
        self._placed_like = placement
