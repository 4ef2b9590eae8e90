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

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_ohem import comm
from dist_ohem.batches import Batch, batch_leaves, batch_size
from dist_ohem.loss import check_normalizer, global_mean_loss, per_instance_criterion
from dist_ohem.result import SelectionResult
from dist_ohem.scoring import ExampleLosses, Scored, ScoreFn, ScoringPass
from dist_ohem.selector import HardExampleSelector
from dist_ohem.train_pass import (
    BalancedPlan,
    CapacityPlan,
    SelectedRowsPlan,
    Trained,
    TrainingInputs,
    TrainingPlan,
    capacity_of,
)
from dist_ohem.wrappers import forward_communicates, is_deepspeed_engine, unwrap_model

__all__ = ["AUTO_CAPACITY_FACTOR", "StepConfig", "StepOutput", "ohem_step"]

SCORE_MODES = ("no_grad_train", "eval")
#: ``capacity_factor="auto"`` on an accelerator: 25% more rows than the expected share,
#: the padding that cost 1.50x vs 1.55x on an H200 against a read between the passes.
AUTO_CAPACITY_FACTOR = 1.25
#: The phases of :attr:`StepOutput.timings`.
PHASES = ("scoring", "selection", "communication", "training")


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


@dataclass(frozen=True)
class StepConfig:
    """The settings of one :func:`ohem_step` that every rank must agree on.

    Ranks that disagree on these would run different collectives (the balance
    all-to-all, the number of chunks, the mean-loss all-reduce) and hang, so
    :func:`ohem_step` passes this object to the selector as ``caller_config``, whose
    ``repr`` the selector hashes and compares across ranks. Only plain values belong
    here: a repr must read the same on every rank.

    Attributes:
        balance, score_mode, grad_average, normalizer, micro_batch_size, sync_mean_loss:
            as passed
            to :func:`ohem_step` (``micro_batch_size`` is checked by the scoring pass,
            which fails on every rank together).
        ignore_index: resolved: the argument, else the criterion's own, else None.
        capacity_factor: resolved: a float, or None to train exactly the selected rows.
    """

    balance: bool
    score_mode: str
    grad_average: bool
    normalizer: str
    ignore_index: int | None
    micro_batch_size: int | None
    sync_mean_loss: bool
    capacity_factor: float | None

    @classmethod
    def from_arguments(
        cls,
        model: nn.Module,
        inputs: Batch,
        criterion: object,
        *,
        balance: bool,
        score_mode: str,
        grad_average: bool,
        normalizer: str,
        ignore_index: int | None,
        micro_batch_size: int | None,
        sync_mean_loss: bool,
        capacity_factor: float | str | None,
    ) -> StepConfig:
        """Check and resolve :func:`ohem_step`'s keyword arguments (see its docstring).

        Raises:
            ValueError, TypeError: a bad ``score_mode`` or ``capacity_factor``, or
                ``capacity_factor`` with ``balance`` (locally: the same on every rank).
        """
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        check_normalizer(normalizer)
        if ignore_index is None:
            ignore_index = getattr(criterion, "ignore_index", None)
        if capacity_factor == "auto":
            leaves = batch_leaves(inputs)
            on_accelerator = bool(leaves) and leaves[0].device.type != "cpu"
            simple = not balance and micro_batch_size is None and not is_deepspeed_engine(model)
            resolved = AUTO_CAPACITY_FACTOR if on_accelerator and simple else None
        else:
            resolved = _checked_capacity_factor(capacity_factor, balance)
        return cls(
            balance=balance,
            score_mode=score_mode,
            grad_average=grad_average,
            normalizer=normalizer,
            ignore_index=ignore_index,
            micro_batch_size=micro_batch_size,
            sync_mean_loss=sync_mean_loss,
            capacity_factor=resolved,
        )


def _checked_capacity_factor(capacity_factor: float | None, balance: bool) -> float | None:
    """An explicit ``capacity_factor`` (not ``"auto"``) as a float, or None."""
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
    normalizer: str = "selected",
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
        normalizer: what the mean divides by, over all ranks: ``"selected"`` (default:
            the M selected examples), ``"valid"`` (every valid example), ``"instances"``
            (every example) or ``"positives"`` (the valid ``positive`` examples); at
            least 1 (:data:`dist_ohem.loss.NORMALIZERS`).
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
    config = StepConfig.from_arguments(
        model,
        inputs,
        criterion,
        balance=balance,
        score_mode=score_mode,
        grad_average=grad_average,
        normalizer=normalizer,
        ignore_index=ignore_index,
        micro_batch_size=micro_batch_size,
        sync_mean_loss=sync_mean_loss,
        capacity_factor=capacity_factor,
    )
    reduce_losses = ExampleLosses(
        per_instance_criterion(criterion), example_score, config.ignore_index
    )
    module = unwrap_model(model)
    plan = _plan(config, model, selector, batch_size(inputs))
    scoring = ScoringPass(module, inputs, targets, reduce_losses, score_fn, config.score_mode)
    timings = dict.fromkeys(PHASES, 0.0)
    with _timed(timings, "scoring"):
        plan, chunks = plan.agree(scoring.check(config.micro_batch_size, valid))
        scored = scoring.score(chunks, selector.nan)
    with _timed(timings, "selection"):
        selection = _select(selector, scored, positive, config)
    with _timed(timings, "training"):
        backward = backward or torch.Tensor.backward
        batch = TrainingInputs(
            model, module, inputs, targets, reduce_losses, selection, scored, backward
        )
        trained = plan.train(batch)
        mean_loss = global_mean_loss(
            trained.selected_sum, selection, selector.group, config.sync_mean_loss
        )
    return _result(trained, selection, scored, mean_loss, timings)


def _plan(
    config: StepConfig, model: nn.Module, selector: HardExampleSelector, num_examples: int
) -> TrainingPlan:
    """The training plan, chosen once, before scoring: a fixed capacity of rows
    (``capacity_factor``), the balanced selected rows (``balance`` on several ranks), or
    the selected rows themselves."""
    group = selector.group
    common = {
        "group": group,
        "grad_average": config.grad_average,
        "normalizer": config.normalizer,
        "micro_batch_size": config.micro_batch_size,
        "lockstep_scoring": config.micro_batch_size is not None and forward_communicates(model),
    }
    if config.capacity_factor is not None:
        world_size = comm.get_world_size(group)
        capacity = capacity_of(selector, config.capacity_factor, num_examples, world_size)
        return CapacityPlan(**common, selector=selector, capacity=capacity)
    if config.balance and comm.is_distributed(group):
        return BalancedPlan(**common)
    return SelectedRowsPlan(**common)


def _select(
    selector: HardExampleSelector,
    scored: Scored,
    positive: torch.Tensor | None,
    config: StepConfig,
) -> SelectionResult:
    """ONE global selection over the ``(N,)`` scores of all ranks. A rank whose scoring
    failed joins it with its error: with eager checks every rank raises; with deferred
    ones this rank selects nothing (and trains at weight 0) and all raise at the next
    call."""
    if scored.error is None:
        return selector(scored.scores, scored.valid, positive, caller_config=config)
    return selector.fail(scored.error, scored.scores, caller_config=config)


def _result(
    trained: Trained,
    selection: SelectionResult,
    scored: Scored,
    mean_loss: torch.Tensor,
    timings: dict[str, float],
) -> StepOutput:
    """The :class:`StepOutput`; the balance all-to-all's seconds move from ``training``
    to ``communication``."""
    timings["communication"] = trained.moving_seconds
    timings["training"] -= trained.moving_seconds
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


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Record the host seconds spent inside as ``timings[phase]``."""
    started = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - started
