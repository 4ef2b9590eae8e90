# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/language_model.py
"""Selective training of a language model in the Hugging Face Trainer, across ranks.

``OHEMTrainer`` is a ``transformers.Trainer`` that, for each optimizer step, scores
every sequence of the step on every rank without gradients, keeps the global top 25%
and trains only those (two-pass: about 0.58 of plain training's compute at keep 1/4).

The corpus is generated (no download): *learnable* sequences, arithmetic progressions
modulo the vocabulary (``x_t = a + s * t``, a and s drawn per sequence), and a share of
*noise*, uniformly random tokens that no model can learn. Ranking by the loss alone
keeps picking the noise; ranking by the *excess* loss, the training loss minus the loss
of a reference model trained on a small clean held-out set (RHO-LOSS, Rho-1), does not.
``--score excess`` (the default) first trains that reference with the plain Trainer,
then passes it as ``reference_model=``; ``--score loss`` ranks by the loss.

The model is a tiny GPT-2 built from a config. The Trainer logs the mean token loss of
the selected sequences (``loss``) and, at the end, ``eval_loss`` on held-out learnable
sequences. ``--out FILE`` writes rank 0's summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from dist_ohem.integrations.transformers import OHEMTrainer

VOCAB = 32
LENGTH = 16

log = logging.getLogger("language_model")


class Corpus(Dataset):
    """``size`` sequences of ``LENGTH`` tokens; a share ``noise`` of them random."""

    def __init__(self, size: int, noise: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=gen)
        stride = torch.randint(1, 5, (size, 1), generator=gen)
        self.tokens = (start + stride * torch.arange(LENGTH)) % VOCAB
        self.is_noise = torch.rand(size, generator=gen) < noise
        random_tokens = torch.randint(0, VOCAB, (size, LENGTH), generator=gen)
        self.tokens[self.is_noise] = random_tokens[self.is_noise]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def tiny_gpt(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def arguments(output_dir: str, steps: int, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=learning_rate,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--keep", type=float, default=0.25, help="share of sequences trained")
    parser.add_argument("--noise", type=float, default=0.3, help="share of random sequences")
    parser.add_argument("--score", choices=("excess", "loss"), default="excess")
    parser.add_argument("--out", help="JSON file for rank 0's summary")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    train_set = Corpus(4096, options.noise, seed=1)
    clean_held_out = Corpus(512, noise=0.0, seed=2)  # the reference's training data
    eval_set = Corpus(256, noise=0.0, seed=3)

    with tempfile.TemporaryDirectory() as output_dir:
        extra = {}
        if options.score == "excess":
            reference = tiny_gpt(seed=1)
            reference_args = arguments(output_dir, max(1, options.steps // 2), 3e-3)
            Trainer(model=reference, args=reference_args, train_dataset=clean_held_out).train()
            extra["reference_model"] = reference

        args = arguments(output_dir, options.steps, 3e-3)
        trainer = OHEMTrainer(
            model=tiny_gpt(seed=0),
            args=args,
            train_dataset=train_set,
            keep=options.keep,
            **extra,
        )
        trainer.train()
        metrics = trainer.evaluate(eval_dataset=eval_set)

    selection = trainer.last_selection
    summary = {
        "world_size": args.world_size,
        "score": options.score,
        "steps": trainer.state.global_step,
        "eval_loss": metrics["eval_loss"],
        "last_step_sequences": selection.num_valid_global,
        "last_step_selected": selection.num_selected_global,
        "last_step_selected_per_rank": list(selection.selected_per_rank),
        "logged_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    if trainer.is_world_process_zero():
        log.info("held-out loss on learnable sequences: %.3f", summary["eval_loss"])
        if options.out:
            with open(options.out, "w") as handle:
                json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
