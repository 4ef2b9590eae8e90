"""ohem_step and OHEMLoss under Accelerate (DDP on 2 CPU ranks): every case of parity_cases
in one launch.

Launched by tests/test_step_frameworks.py as
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... accelerate_step.py
--out result.json``.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from dist_ohem import HardExampleSelector, StepOutput
from tests.framework_scripts.parity_cases import (
    ACCELERATE_RUNS,
    LR,
    Run,
    local_micro_batches,
    make_model,
    run_cases,
    train_micro_batch,
)

#: The accumulation cases use 2 micro-batches; single-batch cases set it to 1 per case.
accelerator = Accelerator(gradient_accumulation_steps=2)


def train(run: Run) -> tuple[list[torch.Tensor], list[StepOutput], dict]:
    """One optimizer step over the case's micro-batches with ``accelerator.accumulate``."""
    case = run.case
    accelerator.gradient_accumulation_steps = case.accumulation_steps
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    selector = HardExampleSelector(**case.rule)
    outputs = []
    for batch in local_micro_batches(case, accelerator.process_index):
        with accelerator.accumulate(model):
            outputs.append(train_micro_batch(model, batch, run, selector, accelerator.backward))
            optimizer.step()
            optimizer.zero_grad()
    params = list(accelerator.unwrap_model(model).parameters())
    return params, outputs, {"wrapper": type(model).__name__}


def main() -> None:
    """Run every case, then leave the process group.

    ``free_memory`` drops the prepared DDP models (and their process-group references)
    first: left to interpreter exit they make gloo abort now and then.
    """
    run_cases(ACCELERATE_RUNS, train)
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
