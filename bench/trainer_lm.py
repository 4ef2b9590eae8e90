"""The language-model rows of ``bench/throughput.py``: a tiny GPT-2 under the Hugging
Face ``Trainer`` on W CPU ranks (gloo), launched by it as
``torchrun --nproc_per_node=W bench/trainer_lm.py --out FILE [--quick]``.

Methods, side by side in one launch: plain ``Trainer``; token mask mode
(``ohem_loss_func``, keep 1/4); ``OHEMTrainer`` two-pass at keep 1/4 and 1/8; two-pass at
keep 1/4 ranked by excess loss against a reference model of the same size (its forward
counted in the step). Each method trains ``warmup + steps`` optimizer steps per round,
in a fresh Trainer from the same initial weights; the rounds rotate the methods' order.
A step's time runs from one optimizer step's end to the next (``on_step_end``), so it
holds fetching the step's micro-batches, the scoring pass, training and the optimizer;
per rank, wall clock and process CPU time. Rank 0 writes every rank's step times.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from dist_ohem.integrations.transformers import OHEMTrainer, ohem_loss_func

logger = logging.getLogger("bench.trainer_lm")


@dataclass(frozen=True)
class LMConfig:
    """The model, data and timing of the language-model rows."""

    vocab: int = 256
    length: int = 64
    width: int = 128
    layers: int = 4
    batch_size: int = 16
    accumulation: int = 2
    rounds: int = 5
    steps: int = 3
    warmup: int = 1


QUICK = LMConfig(vocab=64, length=16, width=32, layers=1, batch_size=4, rounds=2, steps=1)


@dataclass(frozen=True)
class LMMethod:
    """One row: how the Trainer is built."""

    name: str
    keep: float | None = None
    reference: bool = False


METHODS = (
    LMMethod("plain"),
    LMMethod("mask", 1 / 4),
    LMMethod("two-pass", 1 / 4),
    LMMethod("two-pass", 1 / 8),
    LMMethod("two-pass+reference", 1 / 4, reference=True),
)


class RandomTokens(Dataset):
    """Random token sequences, labels = inputs: the cost is the same for any data."""

    def __init__(self, rows: int, config: LMConfig) -> None:
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, config.vocab, (rows, config.length), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class StepClock(TrainerCallback):
    """Wall and CPU seconds between consecutive optimizer steps' ends."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self) -> list[tuple[float, float]]:
        """``(wall s, CPU s)`` of each step."""
        pairs = zip(self.marks, self.marks[1:], strict=False)
        return [(b[0] - a[0], b[1] - a[1]) for a, b in pairs]


def tiny_gpt(config: LMConfig, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    gpt = GPT2Config(
        vocab_size=config.vocab,
        n_positions=config.length,
        n_embd=config.width,
        n_layer=config.layers,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(gpt)


def build(method: LMMethod, config: LMConfig, output_dir: str, clock: StepClock) -> Trainer:
    """A Trainer for ``method`` that runs ``warmup + steps`` optimizer steps."""
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.accumulation,
        max_steps=config.warmup + config.steps,
        learning_rate=1e-4,
        save_strategy="no",
        logging_steps=10_000,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    rows = config.batch_size * config.accumulation * dist.get_world_size()
    common = {
        "model": tiny_gpt(config, 0),
        "args": args,
        "train_dataset": RandomTokens(rows * (config.warmup + config.steps), config),
        "callbacks": [clock],
    }
    if method.name == "plain":
        return Trainer(**common)
    if method.name == "mask":
        loss_func = ohem_loss_func(args, keep=method.keep)
        trainer = Trainer(**common, compute_loss_func=loss_func)
        loss_func.attach(trainer)
        return trainer
    reference = {"reference_model": tiny_gpt(config, 1)} if method.reference else {}
    return OHEMTrainer(**common, keep=method.keep, **reference)


def measure(config: LMConfig, log: Callable[[str], None]) -> dict:
    """Every method's per-rank step times over the rounds (after the warm-up steps)."""
    times: dict[int, list] = {index: [] for index in range(len(METHODS))}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(config.rounds):
            order = list(range(len(METHODS)))
            order = order[round_index % len(order) :] + order[: round_index % len(order)]
            for index in order:
                clock = StepClock()
                build(METHODS[index], config, output_dir, clock).train()
                times[index] += clock.steps()[config.warmup :]
            log(f"round {round_index + 1}/{config.rounds} done")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, times)
    return {
        "methods": [
            {**asdict(method), "per_rank": [rank[index] for rank in gathered]}
            for index, method in enumerate(METHODS)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [trainer_lm] %(message)s")
    config = QUICK if options.quick else LMConfig()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def log(message: str) -> None:
        if rank == 0:
            logger.info(message)

    result = measure(config, log)
    if rank == 0:
        model = tiny_gpt(config, 0)
        result["config"] = asdict(config)
        result["world_size"] = dist.get_world_size()
        result["parameters"] = sum(p.numel() for p in model.parameters())
        with open(options.out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
