"""ohem_step: two-pass OHEM that back-propagates only the selected examples (docs/DESIGN.md §6, §9).

1. *Scoring*: forward over the local batch under ``torch.no_grad()`` through the
   unwrapped module (no DDP/DeepSpeed hooks, no activations kept), in chunks of
   ``micro_batch_size`` examples; one loss and one score per example.
2. *Selection*: ONE global top-M by ``selector`` over the valid examples of all ranks
   (every rank gets the same set).
3. *Balance* (optional): one all-to-all moves the selected examples so each rank trains
   ``floor(M/W)`` or ``ceil(M/W)`` of them.
4. *Training*: forward + backward through the wrapped model with the loss
   ``(W / M) * sum(per-example losses of the selected rows)``, by one of the plans of
   :mod:`dist_ohem.train_pass`: a fixed capacity of rows per rank with weight 0 on the
   unselected ones (no host read before the training backward, the default on
   accelerators), or the selected rows themselves in chunks of at most
   ``micro_batch_size`` (every rank runs the same number of chunks, a rank with fewer
   pads with zero-weight chunks; gradients are synchronised on the last one only: DDP
   ``no_sync`` / DeepSpeed's accumulation boundary before it). After the engine
   averages gradients over ranks the accumulated gradient is that of the mean loss over
   the M selected examples: the single-process reference on the concatenated batch.

Host reads per step on an accelerator (``check="deferred"``, the default there): with
capacity, none before the training backward and one after it (the overflow); without
(``balance``, ``micro_batch_size``), the mask and the counts are read between the passes,
and ZeRO-3 / FSDP with ``micro_batch_size`` also agree the scoring chunks before scoring.
``valid`` and ``ignore_index`` stay on the device.

``score_mode`` says what BatchNorm and dropout do in the scoring pass:

- ``"no_grad_train"`` (default): the model stays in train mode, so BatchNorm normalizes
  with each scoring chunk's statistics and dropout is active, as in the training pass.
  BatchNorm running statistics (and ``num_batches_tracked``) are not updated by the
  scoring pass (``track_running_stats`` is off during it), so only the training pass
  updates them; with capacity, the weight-0 rows of the training pass are part of its
  batch statistics. The RNG is forked, so the
  scoring pass does not advance the global RNG that the training pass's dropout draws
  from.
- ``"eval"``: every module is switched to eval mode for the scoring pass (BatchNorm uses
  its running statistics, no dropout) and switched back to its own previous mode after.

A zero-weight chunk forwards the rank's first one or two local examples with a finite
loss at weight 0 (the gradient contribution is exactly zero) with the BatchNorm running
statistics frozen, so BatchNorm does not learn from them; with no such
example it forwards an empty batch. It keeps the forward count (DDP broadcasts buffers
in every forward) and the backward count equal on every rank, so that no collective of
the engine waits for a rank that skipped it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_ohem import comm
from dist_ohem.batches import Batch, batch_leaves, batch_size, call_model, chunk_bounds, select_rows
from dist_ohem.loss import global_mean_loss, per_instance_criterion
from dist_ohem.result import SelectionResult
from dist_ohem.scoring import (
    ExampleLosses,
    ScoreFn,
    check_no_nan_scores,
    checked_micro_batch_size,
    checked_valid,
    score_chunk,
)
from dist_ohem.selector import HardExampleSelector
from dist_ohem.train_pass import TrainingInputs, capacity_of, train_selected, train_with_capacity
from dist_ohem.wrappers import (
    forward_communicates,
    is_deepspeed_engine,
    scoring_context,
    unwrap_model,
)

__all__ = ["AUTO_CAPACITY_FACTOR", "StepOutput", "ohem_step"]

SCORE_MODES = ("no_grad_train", "eval")
#: ``capacity_factor="auto"`` on an accelerator: 25% more rows than the expected share,
#: the padding that cost 1.50x vs 1.55x on an H200 against a read between the passes.
AUTO_CAPACITY_FACTOR = 1.25


@dataclass
class StepOutput:
    """What one :func:`ohem_step` did.

    Attributes:
        loss: the detached scalar this rank back-propagated (summed over its chunks),
            ``(W / M) * sum`` of its trained examples' losses: its share, not the mean.
        selection: the :class:`SelectionResult` of the scoring pass.
        scores: ``(N,)`` what the selection ranked (detached): ``score_fn``'s scores, or
            the per-example losses of the scoring pass without it.
        mean_loss_on_device: the global mean of the selected examples' training losses
            (the training pass's values, over all ranks), a 0-dim float64 tensor: the
            number for a progress bar, as a float in :attr:`mean_loss`. 0.0 when nothing
            is selected; NaN with ``sync_mean_loss=False``.
        example_losses: ``(N,)`` per-example losses of the local batch from the scoring
            pass (detached), e.g. for logging the mean over all K valid examples.
        valid: ``(N,)`` bool, the examples that counted (``valid=`` and at least one
            position not equal to ``ignore_index``); NaN scores under ``nan="ignore"``
            are dropped by the selector on top of this.
        num_chunks: training chunks every rank ran (zero-weight padding included).
        timings: seconds per phase: ``scoring``, ``selection``, ``communication``
            (the balance all-to-all; 0 without balance) and ``training``
            (forward + backward of every chunk), measured on the host (on a GPU they
            time the launches, not the work).
        trained_rows: the selected examples this rank trained when it is known without a
            read (after balancing); None otherwise (see :attr:`num_trained_local`).
    """

    loss: torch.Tensor
    selection: SelectionResult
    scores: torch.Tensor
    mean_loss_on_device: torch.Tensor
    example_losses: torch.Tensor
    valid: torch.Tensor
    num_chunks: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    trained_rows: int | None = None

    @property
    def mean_loss(self) -> float:
        """:attr:`mean_loss_on_device` as a float (reading it waits for the device)."""
        return float(self.mean_loss_on_device)

    @property
    def num_trained_local(self) -> int:
        """Selected examples this rank trained (after balancing; read from the device
        when needed)."""
        if self.trained_rows is not None:
            return self.trained_rows
        return self.selection.num_selected_local


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
    valid: torch.Tensor | None = None,
    ignore_index: int | None = None,
    micro_batch_size: int | None = None,
    score_fn: ScoreFn | None = None,
    sync_mean_loss: bool = True,
    capacity_factor: float | str | None = "auto",
) -> StepOutput:
    """One two-pass OHEM forward/backward over this rank's share of one optimizer step
    (no optimizer step). Call on every rank.

    Args:
        model: the model as trained: a ``DistributedDataParallel`` module, a DeepSpeed
            engine, an Accelerate-prepared model, or a plain module.
        inputs: the local batch: a tensor (``model(inputs)``), a tuple or list
            (``model(*inputs)``) or a dict (``model(**inputs)``) of tensors with the
            examples on dim 0. With ``micro_batch_size`` this is the rank's whole share
            of the optimizer step.
        targets: tensor or tuple/list/dict of tensors, examples on dim 0, passed to
            ``criterion`` as they are.
        criterion: a torch loss module (used with ``reduction="none"``) or a callable
            ``(outputs, targets) -> losses`` of shape ``(N, ...)``.
        selector: picks the examples; its rule counts valid examples.
        backward: called with each chunk's loss; default ``loss.backward()``. Pass
            ``accelerator.backward`` or ``engine.backward``. To accumulate several
            ``ohem_step`` calls (one selection each) instead of ``micro_batch_size``, pass
            ``lambda loss: (loss / A).backward()`` and run all but the last call under
            ``model.no_sync()``.
        balance: move the selected examples so every rank trains floor/ceil(M/W).
        score_mode: ``"no_grad_train"`` or ``"eval"`` (module docstring).
        example_score: reduces per-instance losses ``(N, ...)`` to per-example losses
            ``(N,)``; default the mean over the valid positions (all non-batch dims
            without ``ignore_index``). The same reduction gives each example's training
            loss. A custom one gets the losses as the criterion returns them, ignored
            positions included (``CrossEntropyLoss`` puts 0 there).
        grad_average: the engine averages gradients over ranks (DDP, Accelerate and
            DeepSpeed do); False when it sums them.
        positive: ``(N,)`` bool, the positive examples; required by ``neg_pos_ratio``.
        valid: ``(N,)`` bool; False = the example never counts: not in K, never
            selected, never trained.
        ignore_index: with ``targets`` one integer tensor of shape ``(N, ...)``,
            positions equal to it are ignored, and an example with no other position is
            invalid. Default: the criterion's own ``ignore_index`` (``CrossEntropyLoss``
            and ``NLLLoss`` have -100); None for criteria without one (then every
            position counts).
        micro_batch_size: score and train in chunks of at most this many examples
            (default: one chunk); the selection is still one over the whole batch.
        score_fn: ``score_fn(example_losses, inputs, targets) -> (N,)`` floating scores
            ranking the examples for selection (higher = harder), called under
            ``no_grad`` once per scoring chunk; training still uses the loss.
        sync_mean_loss: compute :attr:`StepOutput.mean_loss` with one all-reduce of a
            scalar after the training pass (nothing is read back in the step); False
            skips it (``mean_loss`` is NaN).
        capacity_factor: ``c``: each rank trains a fixed number of rows C_r (see
            :func:`dist_ohem.train_pass.capacity_of`; for ``keep``,
            ``ceil(c * keep * N_r)``), its selected rows first and the hardest others
            at weight 0, so that nothing is read between the scoring and the training
            pass; a rank owning more selected rows than C_r makes every rank train one
            more padded chunk (decided by one read after the training backward). The
            gradient is the reference's either way. None: train exactly the selected
            rows (one host read between the passes). ``"auto"`` (default): 1.25 for
            inputs on an accelerator, without ``balance``, ``micro_batch_size`` or a
            DeepSpeed engine; None otherwise (on CPU a read costs nothing).

    Returns:
        :class:`StepOutput`.

    Raises:
        DistributedInputError: on every rank when any rank's input is bad (wrong shape
            of ``valid`` or of the scores, ``micro_batch_size <= 0``, a NaN score under
            ``nan="raise"``, ``criterion`` or ``score_fn`` raising, ...).
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    if ignore_index is None:
        ignore_index = getattr(criterion, "ignore_index", None)
    reduce_losses = ExampleLosses(per_instance_criterion(criterion), example_score, ignore_index)
    capacity_factor = _resolved_capacity(capacity_factor, model, inputs, balance, micro_batch_size)
    # Ranks that disagree on these would run different collectives (the balance
    # all-to-all, the number of chunks, the mean-loss all-reduce) and hang.
    caller_config = (
        "ohem_step",
        balance,
        score_mode,
        grad_average,
        ignore_index,
        micro_batch_size,
        sync_mean_loss,
        capacity_factor,
    )
    timings = {"scoring": 0.0, "selection": 0.0, "communication": 0.0, "training": 0.0}

    capacity = None
    if capacity_factor is not None:
        world_size = comm.get_world_size(selector.group)
        capacity = capacity_of(selector, capacity_factor, batch_size(inputs), world_size)
    started = time.perf_counter()
    scored = _score(
        model,
        inputs,
        targets,
        reduce_losses,
        selector,
        score_mode,
        valid,
        micro_batch_size,
        score_fn,
        caller_config,
        None if capacity is None or micro_batch_size is None else -(-capacity // micro_batch_size),
    )
    timings["scoring"] = time.perf_counter() - started

    started = time.perf_counter()
    if scored.error is None:
        selection = selector(scored.scores, scored.valid, positive, caller_config=caller_config)
    else:  # deferred checks: this rank selects nothing and trains at weight 0
        selection = scored.failed_selection
    timings["selection"] = time.perf_counter() - started

    started = time.perf_counter()
    batch = TrainingInputs(
        model,
        unwrap_model(model),
        inputs,
        targets,
        reduce_losses,
        selection,
        scored.scores,
        scored.example_losses,
        scored.valid,
        backward or torch.Tensor.backward,
        grad_average,
        selector.group,
    )
    if capacity is None:
        trained, timings["communication"] = train_selected(batch, balance, micro_batch_size)
    elif micro_batch_size is None:
        trained = train_with_capacity(batch, selector, capacity, max(capacity, 1))
    else:  # every rank runs the most capacity chunks of any rank
        capacity = scored.capacity_chunks * micro_batch_size
        trained = train_with_capacity(batch, selector, capacity, micro_batch_size)
    mean_loss = global_mean_loss(trained.selected_sum, selection, selector.group, sync_mean_loss)
    timings["training"] = time.perf_counter() - started - timings["communication"]
    return StepOutput(
        loss=trained.loss,
        selection=selection,
        scores=scored.scores,
        mean_loss_on_device=mean_loss,
        example_losses=scored.example_losses,
        valid=scored.valid,
        num_chunks=trained.num_chunks,
        timings=timings,
        trained_rows=trained.num_trained_local,
    )


def _resolved_capacity(
    capacity_factor: float | str | None,
    model: nn.Module,
    inputs: Batch,
    balance: bool,
    micro_batch_size: int | None,
) -> float | None:
    """The capacity factor to use, or None to train exactly the selected rows."""
    if capacity_factor == "auto":
        leaves = batch_leaves(inputs)
        on_accelerator = bool(leaves) and leaves[0].device.type != "cpu"
        simple = not balance and micro_batch_size is None and not is_deepspeed_engine(model)
        return AUTO_CAPACITY_FACTOR if on_accelerator and simple else None
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(
            f"capacity_factor must be a number, 'auto' or None, got {capacity_factor!r}"
        )
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if balance:
        raise ValueError(
            "balance=True and capacity_factor are alternatives: with capacity every rank "
            "already trains the same number of rows (for equal batches); pass "
            "capacity_factor=None to balance the selected rows instead"
        )
    return float(capacity_factor)


@dataclass
class _Scored:
    """The scoring pass's outcome: ``(N,)`` losses, scores and validity; with deferred
    checks a rank whose scoring failed gets NaN losses, no valid example, its error and
    the selection it joined with it."""

    example_losses: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    error: str | None = None
    failed_selection: SelectionResult | None = None
    capacity_chunks: int = 0


def _score(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    reduce_losses: ExampleLosses,
    selector: HardExampleSelector,
    score_mode: str,
    valid: torch.Tensor | None,
    micro_batch_size: int | None,
    score_fn: ScoreFn | None,
    caller_config: tuple,
    capacity_chunks: int | None,
) -> _Scored:
    """The no-grad scoring pass over this rank's batch, failing together on any error.

    With ``capacity_chunks`` (capacity and ``micro_batch_size``) the ranks agree before
    scoring on the most capacity chunks of any rank, in the same exchange that ZeRO-3 /
    FSDP need to agree on the scoring chunks: one read, before the scoring pass.
    """
    module = unwrap_model(model)
    num_examples = batch_size(inputs)
    input_error, chunk_size, requested = None, max(num_examples, 1), None
    try:
        chunk_size = checked_micro_batch_size(micro_batch_size, num_examples)
        requested = checked_valid(valid, num_examples)
    except (TypeError, ValueError) as exc:
        input_error = str(exc)
    # At least one chunk, so that an empty batch still yields dtypes and devices.
    num_scoring_chunks = max(1, -(-num_examples // chunk_size))
    num_padding_chunks = 0
    forwards_in_step = micro_batch_size is not None and forward_communicates(model)
    if forwards_in_step or capacity_chunks is not None:
        # ZeRO-3 / FSDP gather parameters in every forward, so every rank must run as many
        # scoring forwards, and a rank with bad input must not start them alone.
        device = next(iter(batch_leaves(inputs)), torch.empty(0)).device
        most_chunks, input_error, capacity_chunks = _agree_before_scoring(
            [num_scoring_chunks, capacity_chunks or 0], input_error, device, selector.group
        )
        if forwards_in_step:
            num_padding_chunks = most_chunks - num_scoring_chunks
    if input_error is not None:
        return _failed(input_error, inputs, selector, caller_config, capacity_chunks or 0)
    scoring_error: Exception | None = None
    try:
        with torch.no_grad(), scoring_context(module, score_mode, inputs):
            scored = []
            for rows in chunk_bounds(num_examples, chunk_size, num_scoring_chunks):
                chunk_inputs = select_rows(inputs, rows)
                outputs = call_model(module, chunk_inputs)
                if scoring_error is not None:  # forwards only: in step with the others
                    continue
                try:
                    scored.append(
                        score_chunk(
                            outputs,
                            chunk_inputs,
                            select_rows(targets, rows),
                            reduce_losses,
                            score_fn,
                        )
                    )
                except Exception as exc:
                    if not forwards_in_step:
                        raise
                    # ZeRO-3 / FSDP: the other ranks still run their scoring forwards,
                    # which gather parameters; join those before failing together.
                    scoring_error = exc
            for _ in range(num_padding_chunks):
                call_model(module, select_rows(inputs, slice(0, 2)))
        if scoring_error is not None:
            raise scoring_error
        example_losses, scores, has_position = (
            torch.cat(part) for part in zip(*scored, strict=True)
        )
        example_valid = has_position if valid is None else has_position & requested
        if score_fn is not None and selector.nan == "raise" and scores.device.type == "cpu":
            check_no_nan_scores(scores, example_valid)  # on a device: the selector's NaN flag
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank by fail()
        message = f"the scoring pass raised {type(exc).__name__}: {exc}"
        return _failed(message, inputs, selector, caller_config, capacity_chunks or 0)
    return _Scored(example_losses, scores, example_valid, capacity_chunks=capacity_chunks or 0)


def _failed(
    message: str,
    inputs: Batch,
    selector: HardExampleSelector,
    caller_config: tuple,
    capacity_chunks: int,
) -> _Scored:
    """Join the selection with ``message``: raises on every rank with eager checks; with
    deferred ones this rank goes on with nothing to train (in as many capacity chunks as
    the ranks agreed), and all raise at the next call."""
    leaves = batch_leaves(inputs)
    device = leaves[0].device if leaves else None
    like = torch.full((batch_size(inputs),), math.nan, device=device)
    selection = selector.fail(message, like, caller_config=caller_config)
    no_example = torch.zeros_like(like, dtype=torch.bool)
    return _Scored(like, like, no_example, message, selection, capacity_chunks)


def _agree_before_scoring(
    counts: list[int], input_error: str | None, device: torch.device, group: object
) -> tuple[int, str | None, int]:
    """One all-gather of ``(error flag, scoring chunks, capacity chunks)`` per rank.

    Returns the most scoring chunks of any rank, the error to fail with (this rank's
    own, or, when only other ranks failed, a note that they did: every rank then joins
    the selector's fail-together exchange, which names the ranks and their messages)
    and the most capacity chunks of any rank.
    """
    row = torch.tensor([[int(input_error is not None), *counts]], device=device)
    rows = torch.cat(comm.all_gather_uneven(row, group, [1] * comm.get_world_size(group)))
    listed = rows.tolist()  # one read, before the scoring pass
    flags = [row[0] for row in listed]
    most_scoring, most_capacity = (max(row[i] for row in listed) for i in (1, 2))
    if input_error is None and any(flags):
        failed = [rank for rank, flag in enumerate(flags) if flag]
        input_error = f"stopped before scoring because rank(s) {failed} rejected their input"
    return most_scoring, input_error, most_capacity
