"""ohem_step: two-pass OHEM that back-propagates only the selected examples (DESIGN.md §6).

1. *Scoring*: forward over the local batch under ``torch.no_grad()`` through the
   unwrapped module (no DDP/DeepSpeed hooks, no activations kept), one score per example.
2. *Selection*: the global top-M by ``selector`` (every rank gets the same set).
3. *Balance* (optional): one all-to-all moves the selected examples so each rank trains
   ``floor(M/W)`` or ``ceil(M/W)`` of them.
4. *Training*: forward + backward through the wrapped model on the selected examples
   only, with the loss ``(W / M) * sum(per-example losses)``: after the engine averages
   gradients over ranks this is the gradient of the mean loss over the M selected
   examples, the single-process reference on the concatenated batch.

``score_mode`` says what BatchNorm and dropout do in the scoring pass:

- ``"no_grad_train"`` (default): the model stays in train mode, so BatchNorm normalizes
  with the local batch's statistics and dropout is active, as in the training pass.
  BatchNorm running statistics (and ``num_batches_tracked``) are restored after the
  scoring pass, so they are updated exactly once per step, by the training pass on the
  selected examples. The RNG is forked, so the scoring pass does not advance the
  global RNG that the training pass's dropout draws from.
- ``"eval"``: every module is switched to eval mode for the scoring pass (BatchNorm uses
  its running statistics, no dropout) and switched back to its own previous mode after.

A rank that trains on no example still runs a forward and backward, so that the
gradient all-reduce runs everywhere: it forwards its first one or two local examples
with a finite score, at weight 0 (the gradient contribution is exactly zero), and
restores the BatchNorm running statistics afterwards, so BatchNorm does not learn from
them. With no such example it forwards an empty batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from dist_ohem import comm
from dist_ohem.loss import normalization_scale, per_instance_criterion
from dist_ohem.selector import HardExampleSelector, SelectionResult

__all__ = ["StepOutput", "map_batch", "ohem_step", "unwrap_model"]

Batch = torch.Tensor | tuple | list | dict
SCORE_MODES = ("no_grad_train", "eval")


@dataclass
class StepOutput:
    """What one :func:`ohem_step` did.

    Attributes:
        loss: the detached scalar this rank back-propagated, ``(W / M) * sum`` of its
            trained examples' losses; the global mean loss over the selected examples
            is the average of ``loss`` over ranks.
        selection: the :class:`SelectionResult` of the scoring pass.
        num_trained_local: examples this rank trained on (after balancing).
        scores: ``(N,)`` per-example losses of the local batch from the scoring pass
            (detached), e.g. for logging the mean loss over all K examples.
        timings: seconds per phase: ``scoring``, ``selection``, ``communication``
            (the balance all-to-all; 0 without balance) and ``training``
            (forward + backward), measured on the host.
    """

    loss: torch.Tensor
    selection: SelectionResult
    num_trained_local: int
    scores: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def ohem_step(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    criterion: nn.Module | Callable[[Any, Any], torch.Tensor],
    selector: HardExampleSelector,
    *,
    backward: Callable[[torch.Tensor], Any] | None = None,
    balance: bool = False,
    score_mode: str = "no_grad_train",
    example_score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_average: bool = True,
    positive: torch.Tensor | None = None,
) -> StepOutput:
    """One two-pass OHEM forward/backward (no optimizer step). Call on every rank.

    Args:
        model: the model as trained: a ``DistributedDataParallel`` module, a DeepSpeed
            engine, an Accelerate-prepared model, or a plain module.
        inputs: the local batch: a tensor (``model(inputs)``), a tuple or list
            (``model(*inputs)``) or a dict (``model(**inputs)``) of tensors with the
            examples on dim 0.
        targets: tensor or tuple/list/dict of tensors, examples on dim 0, passed to
            ``criterion`` as they are.
        criterion: a torch loss module (used with ``reduction="none"``) or a callable
            ``(outputs, targets) -> losses`` of shape ``(N, ...)``.
        selector: picks the examples; its rule counts examples.
        backward: called with the loss; default ``loss.backward()``. Pass
            ``accelerator.backward`` or ``engine.backward``. For plain DDP gradient
            accumulation over A micro-steps pass ``lambda loss: (loss / A).backward()``
            and run non-final micro-steps under ``model.no_sync()``.
        balance: move the selected examples so every rank trains floor/ceil(M/W).
        score_mode: ``"no_grad_train"`` or ``"eval"`` (module docstring).
        example_score: reduces per-instance losses ``(N, ...)`` to per-example losses
            ``(N,)``; default the mean over all non-batch dims. The same reduction
            gives the training loss of each example.
        grad_average: the engine averages gradients over ranks (DDP, Accelerate and
            DeepSpeed do); False when it sums them.
        positive: ``(N,)`` bool, the positive examples; required by ``neg_pos_ratio``.

    Returns:
        :class:`StepOutput`.
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    per_instance = per_instance_criterion(criterion)
    reduce_to_examples = example_score or mean_per_example
    module = unwrap_model(model)
    timings = {"scoring": 0.0, "selection": 0.0, "communication": 0.0, "training": 0.0}
    # A rank whose balance differed would enter the all-to-all alone and hang the others.
    caller_config = ("ohem_step", balance, score_mode, grad_average)

    started = time.perf_counter()
    try:
        with torch.no_grad(), _scoring_context(module, score_mode, inputs):
            scores = reduce_to_examples(per_instance(_call(module, inputs), targets))
        # Checked before the selection collective: a wrong shape found after it would
        # fail on this rank alone and leave the others hanging in the gradient all-reduce.
        if tuple(scores.shape) != (batch_size(inputs),):
            raise ValueError(
                f"per-example scores have shape {tuple(scores.shape)}, expected "
                f"({batch_size(inputs)},): one score per example (reduction='none')"
            )
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank by fail()
        selector.fail(
            f"the scoring pass raised {type(exc).__name__}: {exc}", caller_config=caller_config
        )
    timings["scoring"] = time.perf_counter() - started

    started = time.perf_counter()
    selection = selector(scores, positive=positive, caller_config=caller_config)
    timings["selection"] = time.perf_counter() - started

    started = time.perf_counter()
    chosen = selection.mask.nonzero().squeeze(1)
    train_inputs = map_batch(lambda t: t.index_select(0, chosen.to(t.device)), inputs)
    train_targets = map_batch(lambda t: t.index_select(0, chosen.to(t.device)), targets)
    if balance and comm.is_distributed(selector.group):
        train_inputs, train_targets = _balance(train_inputs, train_targets, selection, selector)
    timings["communication"] = time.perf_counter() - started

    started = time.perf_counter()
    num_trained = batch_size(train_inputs)
    if num_trained > 0:
        losses = reduce_to_examples(per_instance(_call(model, train_inputs), train_targets))
        loss = losses.sum() * normalization_scale(selection, "mean", grad_average, selector.group)
    else:
        loss = _zero_weight_loss(
            model, module, inputs, targets, scores, per_instance, reduce_to_examples
        )
    (backward or torch.Tensor.backward)(loss)
    timings["training"] = time.perf_counter() - started
    return StepOutput(loss.detach(), selection, num_trained, scores, timings)


def mean_per_example(losses: torch.Tensor) -> torch.Tensor:
    """``(N, ...) -> (N,)``: mean over every non-batch dim (identity for ``(N,)``)."""
    # flatten, not reshape(N, -1): the latter is ambiguous for an empty batch (N = 0).
    return losses.flatten(1).mean(dim=1) if losses.dim() > 1 else losses


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / a DeepSpeed engine (both keep it as ``.module``), else ``model``.

    Forwarding the inner module skips the wrapper's gradient-sync bookkeeping and
    DDP's buffer broadcast, which the no-grad scoring pass must not trigger.
    """
    is_wrapper = isinstance(model, DistributedDataParallel) or any(
        cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__
    )
    return model.module if is_wrapper else model


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor of a tensor / tuple / list / dict batch, same structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((key, map_batch(fn, value)) for key, value in batch.items())
    if isinstance(batch, (tuple, list)):
        mapped = [map_batch(fn, value) for value in batch]
        return type(batch)(*mapped) if hasattr(batch, "_fields") else type(batch)(mapped)
    raise TypeError(
        f"a batch must be a tensor or a tuple/list/dict of tensors, got {type(batch).__name__}"
    )


def batch_leaves(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch, in :func:`map_batch` order."""
    leaves: list[torch.Tensor] = []
    map_batch(lambda t: leaves.append(t) or t, batch)
    return leaves


def batch_size(batch: Batch) -> int:
    """Examples in a batch (dim 0 of its first tensor)."""
    leaves = batch_leaves(batch)
    return int(leaves[0].shape[0]) if leaves else 0


def _call(model: nn.Module, inputs: Batch) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm/InstanceNorm running statistic of ``module`` on exit."""
    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = [
        [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
        for m in norms
    ]
    try:
        yield
    finally:
        for norm, tensors in zip(norms, saved, strict=True):
            live = [
                t
                for t in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
                if t is not None
            ]
            for target, value in zip(live, tensors, strict=True):
                # Through .data: the restore must not bump the version counter of a
                # buffer that a pending backward (the zero-weight forward) saved.
                target.data.copy_(value)


@contextmanager
def _scoring_context(module: nn.Module, score_mode: str, inputs: Batch) -> Iterator[None]:
    if score_mode == "eval":
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            yield
        finally:
            for m, was_training in modes:
                m.training = was_training
        return
    devices = sorted({t.device.index for t in batch_leaves(inputs) if t.is_cuda})
    with frozen_norm_statistics(module), torch.random.fork_rng(devices=devices):
        yield


def _zero_weight_loss(model, module, inputs, targets, scores, per_instance, reduce_to_examples):
    """A zero loss through the wrapped model, for a rank that trains on no example.

    Only examples with a finite score go through: the backward of a NaN or inf example
    (NaN inputs, say) is NaN even at weight 0 and would poison every rank's gradient.
    """
    # Two, so BatchNorm1d accepts the batch in train mode.
    rows = torch.isfinite(scores).nonzero().squeeze(1)[:2]
    head = map_batch(lambda t: t.index_select(0, rows.to(t.device)), inputs)
    head_targets = map_batch(lambda t: t.index_select(0, rows.to(t.device)), targets)
    with frozen_norm_statistics(module):
        losses = reduce_to_examples(per_instance(_call(model, head), head_targets))
    return torch.where(torch.zeros_like(losses, dtype=torch.bool), losses, 0.0).sum()


def _balance(
    inputs: Batch, targets: Batch, selection: SelectionResult, selector: HardExampleSelector
) -> tuple[Batch, Batch]:
    """One all-to-all: rank q ends with the q-th contiguous floor/ceil(M/W) share of the
    selected examples in global (rank-major) order."""
    world_size = len(selection.selected_per_rank)
    rank = comm.get_rank(selector.group)
    total = selection.num_selected_global
    share = [total // world_size + (1 if q < total % world_size else 0) for q in range(world_size)]
    if list(selection.selected_per_rank) == share:
        return inputs, targets  # already balanced; every rank knows it and skips together
    owned_start = _prefix_sums(list(selection.selected_per_rank))
    share_start = _prefix_sums(share)

    def overlap(src: int, dst: int) -> int:
        low = max(owned_start[src], share_start[dst])
        high = min(
            owned_start[src] + selection.selected_per_rank[src], share_start[dst] + share[dst]
        )
        return max(0, high - low)

    send_counts = [overlap(rank, q) for q in range(world_size)]
    recv_counts = [overlap(r, rank) for r in range(world_size)]
    packed, unpack = _pack_rows(batch_leaves((inputs, targets)))
    received = comm.all_to_all_uneven(packed, send_counts, recv_counts, selector.group)
    leaves = iter(unpack(received))
    return map_batch(lambda _: next(leaves), (inputs, targets))


def _prefix_sums(values: list[int]) -> list[int]:
    starts, running = [], 0
    for value in values:
        starts.append(running)
        running += value
    return starts


def _pack_rows(leaves: list[torch.Tensor]):
    """Pack tensors with a common dim 0 into one uint8 ``(N, bytes)`` matrix (row-aligned),
    so that one collective moves all of them; returns it and the inverse."""
    rows = leaves[0].shape[0]
    columns = [
        leaf.contiguous().reshape(rows, math.prod(leaf.shape[1:])).view(torch.uint8)
        for leaf in leaves
    ]
    widths = [c.shape[1] for c in columns]
    device = leaves[0].device
    packed = torch.cat([c.to(device) for c in columns], dim=1)

    def unpack(matrix: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for leaf, width in zip(leaves, widths, strict=True):
            part = matrix[:, start : start + width].contiguous().view(leaf.dtype)
            out.append(part.reshape(matrix.shape[0], *leaf.shape[1:]).to(leaf.device))
            start += width
        return out

    return packed, unpack
