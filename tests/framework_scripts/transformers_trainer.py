"""``ohem_loss_func`` under a real ``transformers.Trainer`` on 2 CPU ranks, one launch.

Launched by tests/test_integration_frameworks.py as
``torchrun --nproc_per_node=2 ... transformers_trainer.py --out result.json``.

Each configuration (``average_tokens_across_devices`` on/off x gradient accumulation 1/2,
plus an M = 1 run where one rank selects nothing) trains a tiny GPT-2 built from a config
(no download) for one epoch of one optimizer step: plain SGD, LR 1, constant schedule,
no clipping, no weight decay. ``avg-tokens-ga2-last-partial`` has 3 micro-batches per
rank with G = 2: two optimizer steps, the second of one micro-batch, then an evaluation.
The parameters after the epoch are compared with a single process that forwards the
concatenation of the micro-batches every rank actually received (recorded in
``compute_loss``), splits them into optimizer steps of G (the last one shorter), selects
by an independent sort, and steps on the gradient of ``mean_b(mean of the selected token
losses of micro-batch b)`` over each step's micro-batches. The Trainer's logged ``loss``
of each step is compared with that objective's value, its ``eval_loss`` with the global
OHEM mean of the evaluation batch under the reference's trained parameters.

The ``naive-*`` configurations pass a bare ``OHEMLoss`` as ``compute_loss_func``: their
update, relative to the reference update, shows the Trainer's rescaling that
``ohem_loss_func`` corrects (W x with ``average_tokens_across_devices``, G x more with
accumulation).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from transformers import GPT2LMHeadModel, Trainer

from dist_ohem.integrations.transformers import TrainerOHEMLoss, ohem_loss_func
from tests.framework_scripts.hf_parity import sgd_epoch_args, tiny_gpt2
from tests.framework_scripts.parity_cases import (
    LR,
    checked_world_size,
    hardest_mask,
    max_abs_diff,
    output_path,
    write_results,
)

VOCAB = 37
SEQ_LEN = 9
BATCH_PER_RANK = 2
IGNORE = -100


@dataclass(frozen=True)
class Config:
    """One Trainer run: its settings and the selection rule."""

    name: str
    average_tokens: bool
    accumulation: int
    rule: dict
    naive: bool = False
    #: Micro-batches per rank in the epoch (None: ``accumulation``, one optimizer step).
    micro_batches: int | None = None
    #: Evaluate once after training (one batch per rank).
    evaluate: bool = False
    #: Rank the tokens by excess loss against a reference model (make_model(seed=1)).
    reference: bool = False

    @property
    def rows(self) -> int:
        """Rows of the training set: ``micro_batches`` batches per rank."""
        micro_batches = self.accumulation if self.micro_batches is None else self.micro_batches
        return BATCH_PER_RANK * dist.get_world_size() * micro_batches


CONFIGS = (
    Config("avg-tokens-ga1", True, 1, {"keep": 0.3}),
    Config("avg-tokens-ga2", True, 2, {"keep": 0.3}),
    Config("no-avg-tokens-ga1", False, 1, {"keep": 0.3}),
    Config("no-avg-tokens-ga2", False, 2, {"keep": 0.3}),
    Config("avg-tokens-ga2-top1", True, 2, {"top_k": 1}),
    Config("avg-tokens-ga2-last-partial", True, 2, {"keep": 0.3}, micro_batches=3, evaluate=True),
    Config("avg-tokens-ga2-excess", True, 2, {"keep": 0.3}, reference=True),
    Config("naive-avg-tokens-ga1", True, 1, {"keep": 0.3}, naive=True),
    Config("naive-avg-tokens-ga2", True, 2, {"keep": 0.3}, naive=True),
)


class TokenDataset(Dataset):
    """``rows`` causal-LM examples; row r's labels ignore a different share of positions.

    The rows of the 2nd micro-batch of rank 1 (rows 6 and 7 under the sequential
    sampler) have every label ignored: that rank has K = 0 there and selects nothing.
    """

    def __init__(self, rows: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=gen)
        self.labels = self.input_ids.clone()
        drop = torch.rand(rows, SEQ_LEN, generator=gen) < torch.linspace(0.0, 0.6, rows)[:, None]
        self.labels[drop] = IGNORE
        self.labels[6:8] = IGNORE

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 without dropout, identical on every rank and in the reference."""
    return tiny_gpt2(VOCAB, seed)


class BareOHEMLoss(TrainerOHEMLoss):
    """``OHEMLoss`` on the shifted tokens as it is, without the Trainer correction."""

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        return self.criterion(*self._token_losses(outputs, labels))


class RecordingTrainer(Trainer):
    """Records, per micro-batch, the inputs this rank received and the selection made
    (training), and the evaluation batches apart."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen_batches: list[dict[str, torch.Tensor]] = []
        self.seen_eval_batches: list[dict[str, torch.Tensor]] = []
        self.selected_per_rank: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen = self.seen_batches if model.training else self.seen_eval_batches
        seen.append({key: value.clone() for key, value in inputs.items()})
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.selected_per_rank.append(list(self.compute_loss_func.last.selected_per_rank))
        return loss


def train(config: Config, output_dir: str) -> tuple[RecordingTrainer, TrainerOHEMLoss]:
    """One epoch of the Trainer over ``config.rows`` rows (then one evaluation if asked)."""
    args = sgd_epoch_args(
        output_dir,
        BATCH_PER_RANK,
        config.accumulation,
        use_cpu=True,
        average_tokens_across_devices=config.average_tokens,
    )
    loss_func = (
        BareOHEMLoss(args, True, IGNORE, dict(config.rule))
        if config.naive
        else ohem_loss_func(args, **config.rule, **reference_model(config))
    )
    trainer = RecordingTrainer(
        model=make_model(),
        args=args,
        train_dataset=TokenDataset(config.rows, seed=len(config.name)),
        eval_dataset=TokenDataset(BATCH_PER_RANK * dist.get_world_size(), seed=1),
        compute_loss_func=loss_func,
    )
    if not config.naive:
        loss_func.attach(trainer)
    trainer.train()
    if config.evaluate:
        trainer.evaluate()
    return trainer, loss_func


def reference_model(config: Config) -> dict:
    """``reference_model=`` for a configuration that ranks by excess loss, else nothing."""
    return {"reference_model": make_model(seed=1)} if config.reference else {}


def token_losses(model: GPT2LMHeadModel, input_ids: torch.Tensor, targets: torch.Tensor):
    """``(P,)`` next-token losses of the rows, flattened in order (0 where ignored)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none", ignore_index=IGNORE
    )


def ohem_mean(
    model: GPT2LMHeadModel,
    per_rank: list[dict[str, torch.Tensor]],
    rule: dict,
    reference: GPT2LMHeadModel | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The mean of the selected token losses of the concatenated ``per_rank`` batches and
    the selected tokens that fall in each rank's part of the concatenation (rank-major).
    With ``reference`` the tokens are ranked by the loss minus the reference's loss."""
    input_ids = torch.cat([batch["input_ids"] for batch in per_rank])
    labels = torch.cat([batch["labels"] for batch in per_rank])
    targets = labels[:, 1:]
    # Rank r's tokens are the rows it received, flattened in order: rank-major.
    losses = token_losses(model, input_ids, targets)
    ranked = losses.detach()
    if reference is not None:
        with torch.no_grad():
            ranked = ranked - token_losses(reference, input_ids, targets)
    mask = hardest_mask(ranked, targets.reshape(-1) != IGNORE, rule)
    tokens_per_rank = [batch["labels"][:, 1:].numel() for batch in per_rank]
    return losses[mask].mean(), [int(part.sum()) for part in mask.split(tokens_per_rank)]


def reference(
    batches: list[list[dict[str, torch.Tensor]]],
    accumulation: int,
    rule: dict,
    eval_batches: list[list[dict[str, torch.Tensor]]],
    ref: GPT2LMHeadModel | None = None,
) -> tuple[list[torch.Tensor], list[float], list[list[int]], list[float]]:
    """Single process on the concatenated micro-batches ``batches[b][rank]``.

    The epoch's micro-batches form optimizer steps of ``accumulation`` (the last one
    with the rest). Returns the parameters after one ``p - LR * grad`` per step, the
    gradient that of ``mean_b(mean of the selected token losses of micro-batch b)`` over
    the step's micro-batches; each step's objective value; per micro-batch, the selected
    tokens of each rank's part; per evaluation batch, its OHEM mean after the steps.
    """
    model = make_model()
    objectives = []
    selected_per_rank = []
    for start in range(0, len(batches), accumulation):
        step = batches[start : start + accumulation]
        model.zero_grad()
        objective = 0.0
        for per_rank in step:
            mean, selected = ohem_mean(model, per_rank, rule, ref)
            (mean / len(step)).backward()
            objective += mean.item() / len(step)
            selected_per_rank.append(selected)
        objectives.append(objective)
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    with torch.no_grad():
        eval_losses = [ohem_mean(model, per_rank, rule, ref)[0].item() for per_rank in eval_batches]
    return [p.detach() for p in model.parameters()], objectives, selected_per_rank, eval_losses


def update_ratio(
    trained: list[torch.Tensor], expected: list[torch.Tensor], initial: list[torch.Tensor]
) -> float:
    """The trained update projected on the reference update, in units of the latter:
    1.0 when they agree, 2.0 for an update twice as large."""

    def flat_update(params: list[torch.Tensor]) -> torch.Tensor:
        pairs = zip(params, initial, strict=True)
        return torch.cat([(p.detach() - i.detach()).flatten() for p, i in pairs])

    got, want = flat_update(trained), flat_update(expected)
    return float(got @ want / (want @ want))


def gather_micro_batches(
    seen: list[dict[str, torch.Tensor]], world_size: int
) -> list[list[dict[str, torch.Tensor]]]:
    """Every rank's recorded batches, as ``[micro-batch][rank]``."""
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, seen)
    return [list(per_rank) for per_rank in zip(*gathered, strict=True)]


def main() -> None:
    """Run every configuration; rank 0 writes one JSON record per configuration."""
    out_path = output_path()
    # The Trainer's Accelerate state adopts a process group that is already up.
    dist.init_process_group("gloo")
    world_size = checked_world_size()
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for config in CONFIGS:
            trainer, loss_func = train(config, output_dir)
            batches, eval_batches = (
                gather_micro_batches(seen, world_size)
                for seen in (trainer.seen_batches, trainer.seen_eval_batches)
            )
            params, objectives, reference_selected, eval_losses = reference(
                batches,
                config.accumulation,
                config.rule,
                eval_batches,
                reference_model(config).get("reference_model"),
            )
            history = trainer.state.log_history
            trained = list(trainer.model.parameters())
            results[config.name] = {
                "world_size": world_size,
                "micro_batches": len(trainer.seen_batches),
                "optimizer_steps": trainer.state.global_step,
                "accumulation": config.accumulation,
                "max_abs_diff": max_abs_diff(trained, params),
                "update_ratio": update_ratio(trained, params, list(make_model().parameters())),
                "selected_per_rank": trainer.selected_per_rank,
                "reference_selected_per_rank": reference_selected,
                "logged_loss": [entry["loss"] for entry in history if "loss" in entry],
                "reference_loss": objectives,
                "eval_loss": [entry["eval_loss"] for entry in history if "eval_loss" in entry],
                "reference_eval_loss": eval_losses,
                "loss_func": type(loss_func).__name__,
            }
    write_results(out_path, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
