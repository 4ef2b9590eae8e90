"""Global token-level OHEM for ``transformers.Trainer`` (extra ``dist_ohem[transformers]``).

::

    from dist_ohem.integrations.transformers import ohem_loss_func

    loss_func = ohem_loss_func(args, keep=0.25)
    trainer = Trainer(model, args, train_dataset=dataset, compute_loss_func=loss_func)
    loss_func.attach(trainer)  # needed with gradient_accumulation_steps > 1

Why a dedicated function and not ``OHEMLoss`` as the ``compute_loss_func``: the Trainer
rescales what a ``compute_loss_func`` returns, assuming it is a sum over the tokens of
the step divided by ``num_items_in_batch``. In transformers 5.24
(``transformers/trainer.py``):

- ``Trainer.compute_loss`` (lines 2207-2215) multiplies the loss by
  ``accelerator.num_processes`` when ``args.average_tokens_across_devices`` (default
  True) and ``num_items_in_batch is not None``::

      if (self.args.average_tokens_across_devices
              and (self.model_accepts_loss_kwargs or self.compute_loss_func)
              and num_items_in_batch is not None):
          loss_scale = self.accelerator.num_processes // self.get_tp_size()
          loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu

  ``OHEMLoss`` already multiplies by W to undo DDP's gradient averaging, so the update
  would be W times too large.
- ``Trainer.training_step`` (lines 2111-2119) divides the loss by the number of
  accumulation steps only when ``loss_is_scaled_for_ga`` is False, and it is True for any
  ``compute_loss_func``::

      loss_is_scaled_for_ga = (
          self.model_accepts_loss_kwargs and num_items_in_batch is not None
      ) or self.compute_loss_func is not None
      if not loss_is_scaled_for_ga:
          loss = loss / self.current_gradient_accumulation_steps

  so each micro-batch would count fully: the update G times too large. (Leave
  ``Trainer.loss_is_scaled_for_ga`` at its default None: set to False, the Trainer
  would divide a second time.)

The function returned here undoes both. The number n of micro-batches an optimizer step
sums is G except for the epoch's last step when the epoch's batches per rank are not a
multiple of G. ``Trainer._run_epoch`` (lines 1870-1885) sets n before the step's first
micro-batch::

    remainder = steps_in_epoch % self.args.gradient_accumulation_steps
    if remainder == 0:
        remainder = self.args.gradient_accumulation_steps
    for update_step in range(num_update_steps_trained, num_update_steps_per_epoch):
        num_batches = (
            self.args.gradient_accumulation_steps
            if update_step != (num_update_steps_per_epoch - 1) else remainder
        )
        batch_samples, num_items_in_batch = self.get_batch_samples(...)
        self.current_gradient_accumulation_steps = len(batch_samples)

(``num_items_in_batch`` counts only those n micro-batches, which is how the Trainer's
own token-mean loss stays exact.) The function cannot see n in its arguments, so
:meth:`TrainerOHEMLoss.attach` gives it the Trainer, whose
``current_gradient_accumulation_steps`` it divides by. Without ``attach``, a training
call with G > 1 raises instead of dividing the epoch's last step by the wrong n.
Evaluation (``Trainer.prediction_step``, ``torch.no_grad()`` at line 3247) accumulates
nothing: a call with autograd disabled is not divided by any n, so the ranks' values of
an evaluation batch average to its global OHEM mean, and with equal batch sizes on every
rank ``eval_loss`` (``Trainer.evaluation_loop`` averages each rank's value repeated
batch-size times, line 3007) is the mean over the evaluation batches of those means.

What is logged: ``Trainer._maybe_log_save_evaluate`` (line 2257) logs
``nested_gather(tr_loss).mean()`` over ranks, divided by the optimizer steps since the
last log, where ``tr_loss`` sums the returned (and rescaled) values of the micro-batches.
After the Trainer's rescaling each rank's value is its share
``(W / (n M)) * sum of its selected token losses``; their mean over ranks is exactly the
OHEM mean over the selected tokens of the micro-batch divided by n, so the logged
``loss`` is the true global OHEM objective (below), averaged over the logged steps.
Nothing else is needed for correct logging.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dist_ohem.integrations.transformers needs transformers: "
        "pip install 'dist_ohem[transformers]'"
    ) from exc

from dist_ohem import HardExampleSelector, OHEMLoss, SelectionResult, comm
from dist_ohem.batches import chunks_for
from dist_ohem.integrations.lm import (
    IGNORE_INDEX,
    ReferenceModel,
    aligned,
    concat_batches,
    logits_of,
    model_inputs,
    sequence_losses,
    token_losses,
)
from dist_ohem.scoring import check_scores

__all__ = ["OHEMTrainer", "SkippedMicroBatch", "TrainerOHEMLoss", "ohem_loss_func"]


class TrainerOHEMLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``: global OHEM over tokens.

    Build it with :func:`ohem_loss_func`, pass it as the Trainer's ``compute_loss_func``
    and :meth:`attach` it to that Trainer. Called by the Trainer as
    ``loss_func(outputs, labels, num_items_in_batch=...)`` on every rank, once per
    micro-batch.

    Attributes:
        criterion: the :class:`dist_ohem.OHEMLoss` doing the selection on the per-token
            cross-entropy (computed once per call; ``ignore_index`` labels invalid).
        trainer: the Trainer given to :meth:`attach` (None before), whose
            ``current_gradient_accumulation_steps`` is the number of micro-batches of
            the optimizer step being accumulated.
        last: the :class:`dist_ohem.SelectionResult` of the last micro-batch (K = valid
            predicted tokens over all ranks, M = tokens selected, ``selected_per_rank``).
    """

    def __init__(
        self,
        training_args: TrainingArguments,
        shift_labels: bool,
        ignore_index: int,
        selector_kwargs: dict[str, Any],
        reference_model: nn.Module | None = None,
    ) -> None:
        if not isinstance(training_args, TrainingArguments):
            raise TypeError(
                "ohem_loss_func needs the transformers.TrainingArguments that the Trainer is "
                f"built with (it reads average_tokens_across_devices and "
                f"gradient_accumulation_steps), got {type(training_args).__name__}"
            )
        _check_one_process_per_device(training_args)
        self.training_args = training_args
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        # The Trainer's own logging already shows the global mean (module docstring), so
        # OHEMLoss's extra all-reduce for last_mean_loss is off unless asked for.
        selector_kwargs = {"sync_mean_loss": False, **selector_kwargs}
        # The token losses come computed (once, in _token_losses): the criterion passes
        # them through, and the labels still mark the ignored positions.
        self.criterion = OHEMLoss(_given_losses, ignore_index=ignore_index, **selector_kwargs)
        self.reference = None if reference_model is None else ReferenceModel(reference_model)
        self.trainer: Trainer | None = None
        self._model_inputs: dict[str, Any] | None = None

    def attach(self, trainer: Trainer) -> None:
        """Read the micro-batch count of each optimizer step from ``trainer``, and with a
        reference model the inputs of each forward of its model.

        Needed with ``gradient_accumulation_steps`` G > 1 (a training call raises
        otherwise): the epoch's last optimizer step can have fewer than G micro-batches,
        and only the Trainer knows how many (module docstring). Needed with
        ``reference_model`` too: a ``compute_loss_func`` gets the outputs, not the
        inputs, so a forward pre-hook on ``trainer.model`` keeps the last call's inputs
        for the reference's forward.

        Args:
            trainer: the ``transformers.Trainer`` built with this ``compute_loss_func``.

        Raises:
            ValueError: ``trainer`` was not built with ``compute_loss_func=self``.
        """
        if getattr(trainer, "compute_loss_func", None) is not self:
            raise ValueError(
                "attach needs the Trainer built with compute_loss_func=this loss function, "
                f"got a {type(trainer).__name__} whose compute_loss_func is another object"
            )
        self.trainer = trainer
        if self.reference is not None:
            trainer.model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)

    def _keep_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: the model's keyword inputs (the Trainer passes ``**inputs``,
        labels removed) for the reference model's forward."""
        self._model_inputs = dict(kwargs)

    @property
    def last(self) -> SelectionResult | None:
        """The selection of the last call (None before the first)."""
        return self.criterion.last

    def __call__(
        self,
        outputs: Any,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """This rank's loss for one micro-batch.

        Args:
            outputs: the model output: a ``ModelOutput`` / mapping with ``"logits"``
                ``(B, T, V)`` (or ``(B, V)``), or the logits tensor itself.
            labels: ``(B, T)`` integer labels, ``ignore_index`` = not a target. With
                ``shift_labels`` position t's logits predict label t + 1 (causal LM).
            num_items_in_batch: passed by the Trainer; only whether it is None matters
                (the Trainer rescales the loss only when it is set).

        Returns:
            Scalar ``(W / M) * sum(this rank's selected token losses) / (n * s)``, where
            ``n`` is the number of micro-batches of the current optimizer step (1 with
            autograd disabled: evaluation) and ``s`` the factor the Trainer then
            multiplies by (W with ``average_tokens_across_devices``, else 1).

        Raises:
            RuntimeError: autograd is enabled, G > 1 and no Trainer is attached (the
                same on every rank, before any collective).
        """
        divisor = self._micro_batches() * self._trainer_scale(num_items_in_batch)
        if self.reference is not None and self.trainer is None:
            raise RuntimeError(
                "reference_model needs the model's inputs: call loss_func.attach(trainer) "
                "after building the Trainer"
            )
        try:
            losses, targets = self._token_losses(outputs, labels)
            score = None if self.reference is None else losses.detach() - self._reference(labels)
        except (TypeError, ValueError) as exc:
            # Every rank raises this, instead of the others waiting in the selection.
            like = outputs if isinstance(outputs, torch.Tensor) else None
            if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
                like = outputs["logits"]
            return self.criterion.fail(str(exc), like) / divisor
        return self.criterion(losses, targets, score=score) / divisor

    def _reference(self, labels: torch.Tensor) -> torch.Tensor:
        """``(P,)`` the reference model's loss of each prediction, on the inputs of the
        model's last forward (its excess-loss score is the training loss minus this)."""
        options = {"shift_labels": self.shift_labels, "ignore_index": self.ignore_index}
        like = next(self.trainer.model.parameters())
        return self.reference.token_losses(self._model_inputs, labels, like, **options).reshape(-1)

    def _micro_batches(self) -> int:
        """n: the micro-batches whose gradients the current optimizer step sums.

        The attached Trainer's ``current_gradient_accumulation_steps``, set before each
        step's first micro-batch (``Trainer._run_epoch``, line 1885); 1 when autograd is
        disabled, as in ``Trainer.prediction_step`` (line 3247), where nothing is
        accumulated.
        """
        if not torch.is_grad_enabled():
            return 1
        if self.trainer is not None:
            return self.trainer.current_gradient_accumulation_steps
        if self.training_args.gradient_accumulation_steps == 1:
            return 1
        raise RuntimeError(
            f"gradient_accumulation_steps is {self.training_args.gradient_accumulation_steps}: "
            "call loss_func.attach(trainer) after building the Trainer, so that the "
            "epoch's last optimizer step, which can have fewer micro-batches, is scaled "
            "by its own count"
        )

    def _trainer_scale(self, num_items_in_batch: torch.Tensor | int | None) -> int:
        """The factor ``Trainer.compute_loss`` multiplies the returned loss by (lines 2207-2215)."""
        if self.training_args.average_tokens_across_devices and num_items_in_batch is not None:
            # accelerator.num_processes: every process of the default group (no TP here).
            return comm.get_world_size()
        return 1

    def _token_losses(
        self, outputs: Any, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P,)`` float32 cross-entropy of every prediction (0 where ignored) and ``(P,)``
        its label, one per prediction, as transformers' own ForCausalLMLoss computes it."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"labels must be a tensor, got {type(labels).__name__}: the batch needs a "
                "'labels' entry (the Trainer passes it to compute_loss_func)"
            )
        logits, labels = aligned(logits_of(outputs), labels, self.shift_labels)
        losses, _ = token_losses(logits, labels, shift_labels=False, ignore_index=self.ignore_index)
        return losses.reshape(-1), labels.reshape(-1)


def ohem_loss_func(
    training_args: TrainingArguments,
    *,
    keep: float | None = None,
    shift_labels: bool = True,
    ignore_index: int = -100,
    reference_model: nn.Module | None = None,
    **selector_kwargs: Any,
) -> TrainerOHEMLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``: token-level global OHEM.

    Every rank's valid next-token predictions (labels != ``ignore_index``) form one
    distributed batch of K instances per micro-batch; the hardest M (by per-token
    cross-entropy, docs/DESIGN.md §2 order) over all ranks are kept, each rank
    back-propagates the ones it owns.

    Exact meaning of one optimizer step of n micro-batches (each rank's b-th batch of
    the step forms micro-batch b; n = ``gradient_accumulation_steps`` G, or fewer for
    the epoch's last step when the epoch's batches per rank are not a multiple of G):
    each micro-batch is selected globally on its own, and the update is that of the
    loss ``(1 / n) * sum_b mean(selected token losses of micro-batch b)``, the mean over
    the step's micro-batches of each one's OHEM mean, as a single process computes it on
    the concatenated micro-batches. This holds with ``average_tokens_across_devices`` on
    (the default) or off, for any G, once :meth:`TrainerOHEMLoss.attach` has given it
    the Trainer (required for G > 1; a training call raises otherwise). Tokens are not
    re-weighted across micro-batches: one with fewer valid tokens counts as much as one
    with more.

    Args:
        training_args: the ``TrainingArguments`` the Trainer is built with.
        keep: keep ``ceil(keep * K)`` tokens; or give another rule in ``selector_kwargs``
            (``top_k``, ``loss_thresh`` + ``min_kept``, ...).
        shift_labels: causal LM (position t predicts label t + 1, as the Trainer's
            own causal-LM loss); False for token classification.
        ignore_index: label of positions that are not targets.
        reference_model: rank the tokens by excess loss, the training loss minus this
            model's loss on the same token (Rho-1), instead of the loss; the update still
            uses the training loss. Needs :meth:`TrainerOHEMLoss.attach`.
        **selector_kwargs: the other :class:`dist_ohem.HardExampleSelector` arguments.

    Returns:
        :class:`TrainerOHEMLoss`; ``.attach(trainer)`` it once the Trainer is built;
        ``.last`` holds the last selection.

    Raises:
        TypeError: ``training_args`` is not a ``TrainingArguments``. When a call gets a
            model output without logits or mismatched labels, every rank raises
            :class:`dist_ohem.DistributedInputError` naming it.
    """
    if keep is not None:
        selector_kwargs["keep"] = keep
    return TrainerOHEMLoss(
        training_args, shift_labels, ignore_index, selector_kwargs, reference_model
    )


#: The keyword arguments of :class:`dist_ohem.HardExampleSelector`, which
#: :class:`OHEMTrainer` takes beside the Trainer's own.
SELECTOR_KEYWORDS = frozenset(inspect.signature(HardExampleSelector).parameters)
#: The batch entry carrying a training chunk's loss weight from ``get_batch_samples`` to
#: ``compute_loss``; the model never sees it.
WEIGHT_KEY = "dist_ohem_weight"


class SkippedMicroBatch(dict):
    """A micro-batch slot of the optimizer step that trains nothing on any rank.

    Two-pass training runs fewer micro-batches than the step fetched. The Trainer counts
    micro-batches to decide when to synchronise and step, so the unused slots stay, first
    in the step, and :meth:`OHEMTrainer.training_step` returns 0 for them without a
    forward or backward (the same slots on every rank: no collective is skipped by one
    rank only). It holds an empty ``input_ids`` so that the Trainer's token and FLOP
    counts add nothing.
    """


class OHEMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains each optimizer step on the globally hardest
    sequences only (two-pass, sequence level).

    Built like a ``Trainer``, plus the selection's keywords::

        trainer = OHEMTrainer(model=model, args=args, train_dataset=ds, keep=0.25)
        trainer.train()

    For each optimizer step, every rank:

    1. *scores* the step's micro-batches (all ``gradient_accumulation_steps`` of them, or
       the epoch's shorter last step) without gradients, in eval mode: each sequence's
       mean token loss over its non-ignored labels, minus the reference model's with
       ``reference_model=``, or ``score_fn``'s score. A sequence without a label is
       never selected;
    2. *selects* the global top M of the step's valid sequences over all ranks with one
       :class:`dist_ohem.HardExampleSelector` call;
    3. *trains* its own selected sequences in micro-batches of at most
       ``per_device_train_batch_size``, as many on every rank (a rank with fewer runs
       zero-weight ones), in the last slots of the step; the Trainer synchronises on the
       last, clips, steps the optimizer and the scheduler, logs and checkpoints as usual.

    The update equals a single process training on the selected sequences of the
    concatenated global batch of the step with the Trainer's own causal-LM loss on them:
    the mean over their non-ignored label tokens (each training micro-batch's loss is
    ``W * sum(its token losses) / T``, T the selected sequences' label tokens over all
    ranks, and the engine averages over the W ranks). The logged ``loss`` is that mean.
    Evaluation is the Trainer's own, on every token.

    Host reads: one per step between the passes (the selected rows and every rank's
    count decide the training micro-batches).

    Args:
        *args: the ``Trainer``'s positional arguments.
        reference_model: score by excess loss: the training loss minus this model's
            loss on the same tokens (:class:`dist_ohem.integrations.lm.ReferenceModel`).
        score_fn: ``score_fn(sequence_losses, batch) -> (B,)`` scores ranking the
            sequences of one micro-batch (higher = harder), called under ``no_grad``;
            ``sequence_losses`` are the training model's mean token losses ``(B,)``,
            ``batch`` the micro-batch as the Trainer prepared it.
        shift_labels: causal LM (position t predicts label t + 1); False for token
            classification.
        ignore_index: label of positions that are not targets.
        **kwargs: the ``Trainer``'s keyword arguments, and those of
            :class:`dist_ohem.HardExampleSelector` (``keep``, ``top_k``,
            ``loss_thresh``, ``min_kept``, ``scope``, ...).

    Attributes:
        selector: the :class:`dist_ohem.HardExampleSelector`.
        last_selection: the :class:`dist_ohem.SelectionResult` of the last step (None
            before the first): K valid sequences, M selected, ``selected_per_rank``.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        reference_model: nn.Module | None = None,
        score_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None = None,
        shift_labels: bool = True,
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        selector_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in SELECTOR_KEYWORDS}
        if reference_model is not None and score_fn is not None:
            raise ValueError("pass reference_model= or score_fn=, not both")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "OHEMTrainer computes its own loss; for token-level OHEM with a "
                "compute_loss_func use ohem_loss_func and the plain Trainer"
            )
        self.selector = HardExampleSelector(**selector_kwargs)
        super().__init__(*args, **kwargs)
        _check_one_process_per_device(self.args)
        if self.args.label_smoothing_factor:
            raise ValueError(
                f"label_smoothing_factor is {self.args.label_smoothing_factor}: OHEMTrainer "
                "trains on the plain token cross-entropy of the selected sequences; set "
                "label_smoothing_factor=0"
            )
        # Training computes its own loss: the Trainer need not count the step's tokens.
        self.model_accepts_loss_kwargs = False
        self.reference = None if reference_model is None else ReferenceModel(reference_model)
        self.score_fn = score_fn
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        self.last_selection: SelectionResult | None = None

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, Any]], None]:
        """The step's micro-batches, replaced by its training micro-batches: skipped
        slots first, then this rank's selected sequences in chunks."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        micro_batches = [self._prepare_inputs(batch) for batch in batch_samples]
        rows = concat_batches(micro_batches)
        self.last_selection, targets = self._select(micro_batches)
        return self._training_micro_batches(rows, targets, len(batch_samples)), None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The Trainer's step, except a skipped slot, which returns 0 and runs nothing."""
        if isinstance(inputs, SkippedMicroBatch):
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """A training micro-batch's ``weight * sum(token losses)``; anything else (the
        evaluation) the Trainer's own loss."""
        if WEIGHT_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        weight = inputs[WEIGHT_KEY]
        batch = {key: value for key, value in inputs.items() if key != WEIGHT_KEY}
        outputs = model(**model_inputs(batch))
        losses, _ = self._token_losses(logits_of(outputs), batch["labels"])
        loss = losses.sum() * weight
        return (loss, outputs) if return_outputs else loss

    def _score(
        self, micro_batches: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, valid, targets)``, each ``(N,)`` over the step's sequences: the
        ranking score, whether it has a label, its label count. Eval mode, no gradients,
        every micro-batch through the model the Trainer trains (ZeRO-3 and FSDP gather
        their parameters in its forward: every rank runs as many)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                parts = [self._score_micro_batch(batch) for batch in micro_batches]
        finally:
            self.model.train(was_training)
        scores, valid, targets = (torch.cat(part) for part in zip(*parts, strict=True))
        return scores, valid, targets

    def _score_micro_batch(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch's ``(scores, valid, targets)`` (see :meth:`_score`)."""
        inputs = model_inputs(batch)
        logits = logits_of(self.model(**inputs))
        losses, kept = self._token_losses(logits, batch["labels"])
        if self.reference is not None:
            like = next(self.model.parameters())
            losses = losses - self.reference.token_losses(
                inputs, batch["labels"], like, **self._label_options()
            )
        scores, targets = sequence_losses(losses, kept)
        if self.score_fn is not None:
            scores = self.score_fn(scores, batch)
            check_scores(scores, targets, "score_fn's return value", "sequence")
        self.current_flos += float(self.floating_point_ops(batch)) / 3  # a forward of 3
        return scores, targets > 0, targets

    def _select(self, micro_batches: list[dict[str, Any]]) -> tuple[SelectionResult, torch.Tensor]:
        """The global top M of the step's sequences (one selector call on every rank) and
        ``(N,)`` each sequence's label count. A rank whose scoring raised joins the
        selection with its error, so that every rank raises it (docs/DESIGN.md §7)."""
        try:
            scores, valid, targets = self._score(micro_batches)
        except (RuntimeError, TypeError, ValueError) as exc:
            like = next(self.model.parameters())
            failed = self.selector.fail(f"scoring raised {type(exc).__name__}: {exc}", like)
            return failed, torch.zeros(0, dtype=torch.long, device=like.device)
        return self.selector(scores, valid), targets

    def _training_micro_batches(
        self, rows: dict[str, torch.Tensor], targets: torch.Tensor, slots: int
    ) -> list[dict[str, Any]]:
        """``slots`` micro-batches: skipped ones, then C chunks of this rank's selected
        rows (zero-weight chunks of one row for a rank with fewer), C the same on every
        rank. Reads the mask and the per-rank counts."""
        selection = self.last_selection
        chosen = selection.mask.nonzero().squeeze(1)
        chunk_size = self._train_batch_size  # the Trainer's, after auto_find_batch_size
        num_chunks = chunks_for(list(selection.selected_per_rank), chunk_size)
        selected_targets = comm.all_reduce_sum(targets[chosen].sum(), self.selector.group)
        world_size = comm.get_world_size(self.selector.group)
        weight = world_size / selected_targets.clamp(min=1).to(torch.float32)
        chunks = [
            {key: value[part] for key, value in rows.items()} | {WEIGHT_KEY: weight}
            for part in (chosen.split(chunk_size) if chosen.numel() else ())
        ]
        padding = {key: value[:1] for key, value in rows.items()} | {WEIGHT_KEY: weight * 0}
        chunks += [padding] * (num_chunks - len(chunks))
        main_input = getattr(self.model, "main_input_name", "input_ids")
        empty = SkippedMicroBatch({main_input: rows[main_input][:0]})
        return [empty] * (slots - num_chunks) + chunks

    def _token_losses(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`dist_ohem.integrations.lm.token_losses` with this trainer's options."""
        return token_losses(logits, labels, **self._label_options())

    def _label_options(self) -> dict[str, Any]:
        return {"shift_labels": self.shift_labels, "ignore_index": self.ignore_index}


def _given_losses(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The criterion of :attr:`TrainerOHEMLoss.criterion`: the per-token losses as given."""
    return losses


def _check_one_process_per_device(training_args: TrainingArguments) -> None:
    """Raise ValueError for ``n_gpu > 1``: DataParallel in one process, no ranks to
    select across."""
    if training_args.n_gpu > 1:
        raise ValueError(
            f"training_args.n_gpu is {training_args.n_gpu}: the Trainer would run "
            "torch.nn.DataParallel in one process, where a selection across replicas "
            "is not defined; launch one process per device (torchrun) instead"
        )
