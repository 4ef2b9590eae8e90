"""``OHEMTrainer`` (two-pass, sequence level) under a real ``transformers.Trainer`` on 2
CPU ranks, one launch per engine: ``--engine ddp | zero2 | zero3 | fsdp``.

Each configuration trains a tiny GPT-2 built from a config (no download; no dropout) for
one epoch with plain SGD, LR 1, a constant schedule, no clipping and no weight decay.
The data collator pads each micro-batch to its own longest sequence (labels -100,
attention 0), so the micro-batches of one step differ in length; some labels are -100
and one sequence has none.

The parameters after the epoch are compared with a single process that takes the
micro-batches every rank received (recorded by the collator), forms the optimizer steps
(G micro-batches per rank, the epoch's last step shorter), orders each step's sequences
rank-major (rank 0's micro-batches in order, then rank 1's), scores each by its mean
token loss (minus the reference model's with ``reference_model``), selects by an
independent stable sort, and steps on the gradient of the mean token loss over the
selected sequences' labels. Each step's logged ``loss`` is compared with that mean, the
``eval_loss`` with the Trainer's plain evaluation: the mean over the evaluation batches
of each one's mean token loss.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.state import AcceleratorState
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset
from transformers import GPT2LMHeadModel
from transformers.distributed import DistributedConfig

from dist_ohem import DistributedInputError
from dist_ohem.integrations.transformers import OHEMTrainer
from tests.framework_scripts.hf_parity import sgd_epoch_args, tiny_gpt2
from tests.framework_scripts.parity_cases import (
    LR,
    checked_world_size,
    hardest_mask,
    write_results,
)

VOCAB = 37
MAX_LEN = 9
BATCH_PER_RANK = 2
IGNORE = -100
#: zero3 last: a DeepSpeed ZeRO-3 config, once made, stays registered in transformers.
ENGINES = ("ddp", "fsdp", "zero2", "zero3")
#: Accelerate's evaluation gather fails under DeepSpeed on CPU (it sizes the output for
#: one process): the Trainer's own evaluation is checked on the other engines.
EVALUATED_ENGINES = ENGINES


@dataclass(frozen=True)
class Config:
    """One OHEMTrainer run."""

    name: str
    accumulation: int
    micro_batches: int
    rule: dict
    reference: bool = False
    #: Rows fewer than ``micro_batches`` full batches on every rank (``even_batches``
    #: off: the last micro-batch of one rank is shorter).
    missing_rows: int = 0
    engines: tuple[str, ...] = ("ddp", "zero2", "zero3", "fsdp")
    accelerator_config: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return BATCH_PER_RANK * 2 * self.micro_batches - self.missing_rows


CONFIGS = (
    # Two optimizer steps, the second of one micro-batch; then an evaluation.
    Config("ga2-last-partial", 2, 3, {"keep": 0.3}),
    # M = 1: one rank selects nothing and trains a zero-weight micro-batch.
    Config("ga2-top1", 2, 2, {"top_k": 1}, engines=("ddp", "zero3")),
    Config("ga2-excess", 2, 2, {"keep": 0.5}, reference=True, engines=("ddp",)),
    Config(
        "ga1-uneven",
        1,
        2,
        {"keep": 0.5},
        missing_rows=1,
        engines=("ddp",),
        accelerator_config={"even_batches": False},
    ),
)


class Sequences(Dataset):
    """``rows`` causal-LM sequences of lengths 4 to ``MAX_LEN``; some labels ignored,
    row 1 without any label."""

    def __init__(self, rows: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(rows):
            length = int(torch.randint(4, MAX_LEN + 1, (), generator=gen))
            input_ids = torch.randint(0, VOCAB, (length,), generator=gen)
            labels = input_ids.clone()
            labels[torch.rand(length, generator=gen) < 0.25] = IGNORE
            if index == 1:
                labels[:] = IGNORE
            self.items.append({"input_ids": input_ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class RecordingCollator:
    """Pads a micro-batch to its longest sequence and records it (in fetch order)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)

        def padded(key: str, fill: int) -> torch.Tensor:
            rows = [item[key] for item in items]
            return torch.stack(
                [nn.functional.pad(r, (0, length - len(r)), value=fill) for r in rows]
            )

        ones = [torch.ones(len(item["input_ids"]), dtype=torch.long) for item in items]
        attention = torch.stack([nn.functional.pad(o, (0, length - len(o))) for o in ones])
        batch = {"input_ids": padded("input_ids", 0), "attention_mask": attention}
        batch["labels"] = padded("labels", IGNORE)
        self.batches.append({key: value.clone() for key, value in batch.items()})
        return batch


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 without dropout or tied embeddings, identical on every rank and in
    the reference. The Trainer unties a model sharded at load time (lm_head gets its own
    copy): untied everywhere, every engine trains the same parameters."""
    return tiny_gpt2(VOCAB, seed, tie_word_embeddings=False)


def engine_arguments(engine: str) -> dict:
    """The ``TrainingArguments`` that put the Trainer on ``engine``.

    DeepSpeed on CPU: ``use_cpu=True`` would turn the run into plain DDP, and without it
    ``TrainingArguments`` starts Accelerate with no backend (one process, unsharded
    data). So the state is set up here, with gloo, and the Trainer adopts it
    (``use_configured_state``); ``DS_ACCELERATOR=cpu`` comes from the launcher. FSDP2
    comes with the model, sharded at load time (:func:`make_trained_model`), which the
    Trainer does not wrap again.
    """
    if engine not in ("zero2", "zero3"):
        os.environ["ACCELERATE_USE_CPU"] = "1"
        return {"use_cpu": True}
    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)  # one DeepSpeed config per state
    PartialState(backend="gloo")
    zero = {"stage": int(engine[-1])}
    if engine == "zero3":
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }
    return {"use_cpu": False, "deepspeed": config, "use_configured_state": True}


def make_trained_model(engine: str, shared_dir: str) -> GPT2LMHeadModel:
    """:func:`make_model`, under FSDP2 loaded with ``from_pretrained(distributed_config=...)``
    from a local save, every parameter sharded over the 2 ranks."""
    if engine != "fsdp":
        return make_model()
    path = os.path.join(shared_dir, "tiny-gpt2")
    if dist.get_rank() == 0:
        make_model().save_pretrained(path)
    dist.barrier()
    return GPT2LMHeadModel.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=2))


class RecordingTrainer(OHEMTrainer):
    """Records every rank's selected count of each optimizer step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.selected_per_rank: list[list[int]] = []

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        samples = super().get_batch_samples(epoch_iterator, num_batches, device)
        if samples[0]:
            self.selected_per_rank.append(list(self.last_selection.selected_per_rank))
        return samples


@dataclass
class Trained:
    """What one configuration's run left: the trainer and the batches it fetched."""

    trainer: RecordingTrainer
    train_batches: list[dict[str, torch.Tensor]]
    eval_batches: list[dict[str, torch.Tensor]]


def train(config: Config, engine: str, output_dir: str, shared_dir: str) -> Trained:
    """One epoch of OHEMTrainer over ``config.rows`` rows, then one evaluation
    (``output_dir`` this rank's, ``shared_dir`` one every rank sees)."""
    engine_options = engine_arguments(engine)
    accelerator_config = dict(config.accelerator_config)
    if engine_options.pop("use_configured_state", False):
        accelerator_config["use_configured_state"] = True
    engine_options["accelerator_config"] = accelerator_config or None
    args = sgd_epoch_args(
        output_dir,
        BATCH_PER_RANK,
        config.accumulation,
        ddp_find_unused_parameters=False,
        **engine_options,
    )
    collator = RecordingCollator()
    extra = {"reference_model": make_model(seed=1)} if config.reference else {}
    trainer = RecordingTrainer(
        model=make_trained_model(engine, shared_dir),
        args=args,
        train_dataset=Sequences(config.rows, seed=len(config.name)),
        eval_dataset=Sequences(BATCH_PER_RANK * 2, seed=1),
        data_collator=collator,
        **config.rule,
        **extra,
    )
    trainer.train()
    train_batches = list(collator.batches)
    collator.batches.clear()
    if engine in EVALUATED_ENGINES:
        trainer.evaluate()
    return Trained(trainer, train_batches, collator.batches)


def failing_score_fn(output_dir: str) -> dict:
    """DDP, rank 1's ``score_fn`` raises: every rank must raise the same error, naming
    rank 1, instead of rank 0 waiting in the selection."""

    def score_fn(losses: torch.Tensor, batch: dict) -> torch.Tensor:
        if dist.get_rank() == 1:
            raise ValueError("this score_fn fails on rank 1")
        return losses

    args = sgd_epoch_args(
        output_dir,
        BATCH_PER_RANK,
        1,
        max_steps=1,
        ddp_find_unused_parameters=False,
        **engine_arguments("ddp"),
    )
    trainer = OHEMTrainer(
        model=make_model(),
        args=args,
        train_dataset=Sequences(BATCH_PER_RANK * 2, seed=0),
        data_collator=RecordingCollator(),
        score_fn=score_fn,
        keep=0.5,
    )
    try:
        trainer.train()
        message = "no error"
    except DistributedInputError as exc:
        message = str(exc)
    return {"world_size": dist.get_world_size(), "messages": gathered([message])}


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T-1)`` next-token losses of ``batch``, 0 where the label is ignored."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).float(),
        targets.reshape(-1),
        reduction="none",
        ignore_index=IGNORE,
    ).view(targets.shape)


def reference(
    steps: list[list[list[dict[str, torch.Tensor]]]],
    rule: dict,
    with_reference: bool,
    eval_batches: list[dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], list[float], list[list[int]], float | None]:
    """Single process over ``steps[s][rank][b]``: parameters after one SGD step per
    optimizer step, each step's mean selected token loss, the selected sequences of each
    rank per step, and the plain mean token loss of the evaluation batches after."""
    model, ref = make_model(), make_model(seed=1)
    objectives, selected_per_rank = [], []
    for step in steps:
        model.zero_grad()
        per_rank = [[token_losses(model, batch) for batch in rank_batches] for rank_batches in step]
        rows = [row for rank in per_rank for losses in rank for row in losses]
        labels = [
            row[1:] for rank_batches in step for batch in rank_batches for row in batch["labels"]
        ]
        counts = torch.stack([(row != IGNORE).sum() for row in labels])
        means = torch.stack([row.detach().sum() for row in rows]) / counts.clamp(min=1)
        if with_reference:
            with torch.no_grad():
                ref_rows = [row for rb in step for b in rb for row in token_losses(ref, b)]
            means = means - torch.stack([row.sum() for row in ref_rows]) / counts.clamp(min=1)
        mask = hardest_mask(means, counts > 0, rule)
        selected = [row.sum() for row, chosen in zip(rows, mask, strict=True) if chosen]
        objective = torch.stack(selected).sum() / counts[mask].sum()
        objective.backward()
        objectives.append(objective.item())
        sizes = [sum(len(b["labels"]) for b in rank_batches) for rank_batches in step]
        selected_per_rank.append([int(part.sum()) for part in mask.split(sizes)])
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    with torch.no_grad():
        # The Trainer's eval_loss: the mean over the (equal-sized) evaluation batches of
        # each one's mean token loss.
        batch_means = [
            token_losses(model, batch).sum() / (batch["labels"][:, 1:] != IGNORE).sum()
            for batch in eval_batches
        ]
        eval_loss = torch.stack(batch_means).mean().item() if batch_means else None
    params = {name: p.detach() for name, p in model.named_parameters()}
    return params, objectives, selected_per_rank, eval_loss


def full_parameters(trainer: OHEMTrainer, engine: str) -> dict[str, torch.Tensor]:
    """Every parameter of the trained model by name, gathered under ZeRO-3 and FSDP."""
    named = dict(trainer.model.named_parameters())
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(named.values())):
            return {name: p.detach().clone() for name, p in named.items()}
    return {
        name: p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone()
        for name, p in named.items()
    }


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank holds: every one unless they are sharded (ZeRO-3
    keeps an empty tensor per parameter, FSDP2 a DTensor shard once resharded: a forward
    outside training, the evaluation's, leaves the full parameters in place)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def steps_of(
    per_rank: list[list[dict[str, torch.Tensor]]], accumulation: int
) -> list[list[list[dict[str, torch.Tensor]]]]:
    """``per_rank[rank][b]`` as ``[step][rank][b]``, G micro-batches per step."""
    num_batches = len(per_rank[0])
    return [
        [batches[start : start + accumulation] for batches in per_rank]
        for start in range(0, num_batches, accumulation)
    ]


def gathered(batches: list[dict[str, torch.Tensor]]) -> list[list[dict[str, torch.Tensor]]]:
    """Every rank's ``batches``, as ``[rank][b]``."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, batches)
    return out


def main() -> None:
    """Run the configurations of ``--engine``; rank 0 writes one JSON record each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", nargs="+", choices=ENGINES, default=ENGINES)
    options, _ = parser.parse_known_args()
    dist.init_process_group("gloo")
    world_size = checked_world_size()
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for engine, config in product(options.engine, CONFIGS):
            if engine not in config.engines:
                continue
            run = train(config, engine, output_dir, os.path.dirname(options.out))
            trainer = run.trainer
            train_batches = gathered(run.train_batches)
            eval_batches = [b for rank in gathered(run.eval_batches) for b in rank]
            params, objectives, reference_selected, eval_loss = reference(
                steps_of(train_batches, config.accumulation),
                config.rule,
                config.reference,
                eval_batches,
            )
            history = trainer.state.log_history
            trained = full_parameters(trainer, engine)
            if sorted(trained) != sorted(params):
                raise SystemExit(f"parameters differ: {sorted(trained)} vs {sorted(params)}")
            diff = max((trained[name] - params[name]).abs().max().item() for name in params)
            results[f"{engine}/{config.name}"] = {
                "world_size": world_size,
                "engine": engine,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "wrapper": type(trainer.model_wrapped).__name__,
                "local_numel": local_numel(trainer.model),
                "numel": sum(p.numel() for p in params.values()),
                "micro_batches": len(train_batches[0]),
                "rows_per_rank": [sum(len(b["labels"]) for b in rank) for rank in train_batches],
                "optimizer_steps": trainer.state.global_step,
                "max_abs_diff": diff,
                "selected_per_rank": trainer.selected_per_rank,
                "reference_selected_per_rank": reference_selected,
                "logged_loss": [entry["loss"] for entry in history if "loss" in entry],
                "reference_loss": objectives,
                "eval_loss": [entry["eval_loss"] for entry in history if "eval_loss" in entry],
                "reference_eval_loss": [] if eval_loss is None else [eval_loss],
            }
        if "ddp" in options.engine:
            results["ddp/failing-score-fn"] = failing_score_fn(output_dir)
    write_results(options.out, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
