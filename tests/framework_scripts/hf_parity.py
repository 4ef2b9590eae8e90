"""What the Hugging Face Trainer tests share: a tiny GPT-2 built from a config, and the
arguments of an epoch of plain SGD whose update is exactly ``p - LR * grad``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from tests.framework_scripts.parity_cases import LR


def tiny_gpt2(vocab: int, seed: int = 0, **config: Any) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 (width 16, 2 heads, 16 positions; ``config`` overrides) without
    dropout, the same for the same seed on every rank and in a reference. Its bos/eos
    ids are 0, inside the vocabulary."""
    torch.manual_seed(seed)
    defaults = {
        "vocab_size": vocab,
        "n_positions": 16,
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    return GPT2LMHeadModel(GPT2Config(**(defaults | config)))


def sgd_epoch_args(
    output_dir: str, batch_size: int, accumulation: int, **overrides: Any
) -> TrainingArguments:
    """One epoch in order, plain SGD at :data:`LR` with a constant schedule, no clipping,
    no weight decay, a log line per optimizer step, nothing saved or reported."""
    arguments = {
        "output_dir": output_dir,
        "ddp_backend": "gloo",
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "num_train_epochs": 1,
        "optim": "sgd",
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "train_sampling_strategy": "sequential",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**(arguments | overrides))
