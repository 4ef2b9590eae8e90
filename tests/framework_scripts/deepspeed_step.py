"""ohem_step under DeepSpeed ZeRO stages 0 and 2 on 2 CPU ranks (gloo), one launch.

Launched by tests/test_step_frameworks.py as
``DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 ... deepspeed_step.py --out result.json``.
"""

from __future__ import annotations

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from dist_ohem import HardExampleSelector, StepOutput
from tests.framework_scripts.parity_cases import (
    DEEPSPEED_RUNS,
    LR,
    Run,
    leave_process_group,
    local_micro_batches,
    make_model,
    run_cases,
    step,
)


def ds_config(stage: int, accumulation_steps: int) -> dict:
    """Plain fp32 SGD: no clipping, so the update is exactly ``p - LR * averaged grad``."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }


def train(run: Run) -> tuple[list[torch.Tensor], list[StepOutput], dict]:
    """One engine step over the case's micro-batches (DeepSpeed accumulates them)."""
    case = run.case
    model = make_model()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        config=ds_config(run.zero_stage, case.accumulation_steps),
    )
    selector = HardExampleSelector(**case.rule)
    outputs = []
    for batch in local_micro_batches(case, dist.get_rank()):
        outputs.append(step(engine, batch, case, selector, engine.backward))
        engine.step()
    facts = {"wrapper": type(engine).__name__, "zero_stage": engine.zero_optimization_stage()}
    return list(engine.module.parameters()), outputs, facts


def main() -> None:
    """Run every case under ZeRO stages 0 and 2, then leave the process group."""
    # The shared-memory all-reduce kernel only serves DeepSpeed's inference all-reduce,
    # never training; marking it unavailable skips its JIT compile (about a minute on a
    # fresh 2-core machine) that init_distributed would otherwise start.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    run_cases(DEEPSPEED_RUNS, train)
    leave_process_group()


if __name__ == "__main__":
    main()
