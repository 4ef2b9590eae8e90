"""ohem_step and OHEMLoss under DeepSpeed ZeRO stages 0-3, then under Accelerate with its
DeepSpeed plugin (ZeRO-2), on 2 CPU ranks (gloo), one launch.

Under ZeRO-3 the parameters are partitioned (each rank holds a flat shard, the module's
parameters are empty until gathered): the scoring pass forwards ``engine.module``, whose
hooks gather them, and the comparison gathers the full parameters after the step.

Accelerate's runs come last: its DeepSpeed plugin takes the DeepSpeed config of each case
(``train_micro_batch_size_per_gpu`` and the accumulation steps, set on the plugin's
config before ``prepare``) and ``accelerator.backward`` runs ``engine.backward`` and
``engine.step``.

Launched by tests/test_step_frameworks.py as
``DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 ... deepspeed_step.py --out result.json``.
"""

from __future__ import annotations

import os

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from dist_ohem import HardExampleSelector, StepOutput
from tests.framework_scripts.parity_cases import (
    ACCELERATE_DEEPSPEED_RUNS,
    DEEPSPEED_RUNS,
    LR,
    Run,
    leave_process_group,
    local_micro_batches,
    make_model,
    run_cases,
    train_micro_batch,
)


def ds_config(stage: int, accumulation_steps: int) -> dict:
    """Plain fp32 SGD: no clipping, so the update is exactly ``p - LR * averaged grad``.

    ZeRO-3 keeps parameters below ``stage3_param_persistence_threshold`` (1e5 elements
    by default, all of this MLP) unpartitioned; 0 partitions every one of them.
    """
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
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
        outputs.append(train_micro_batch(engine, batch, run, selector, engine.backward))
        engine.step()
    module_params = list(engine.module.parameters())
    facts = {
        "wrapper": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "local_param_numel": sum(p.numel() for p in module_params),
    }
    with deepspeed.zero.GatheredParameters(module_params):
        params = [p.detach().clone() for p in module_params]
    return params, outputs, facts


class AccelerateDeepSpeed:
    """One ``Accelerator`` with the DeepSpeed plugin for every Accelerate run (its state
    is process-wide); made after the plain DeepSpeed runs."""

    def __init__(self) -> None:
        # The test launch sets ACCELERATE_USE_CPU=1 for the CPU ranks, which would make
        # Accelerate ignore the plugin (MULTI_CPU); DS_ACCELERATOR=cpu keeps DeepSpeed on CPU.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.utils import InitProcessGroupKwargs

        self.plugin = DeepSpeedPlugin(hf_ds_config=ds_config(2, 1))
        self.accelerator = Accelerator(
            deepspeed_plugin=self.plugin,
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        )

    def train(self, run: Run) -> tuple[list[torch.Tensor], list[StepOutput], dict]:
        """One optimizer step over the case's micro-batches with ``accelerator.accumulate``."""
        case, accelerator = run.case, self.accelerator
        self.plugin.deepspeed_config["gradient_accumulation_steps"] = case.accumulation_steps
        model = make_model()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        selector = HardExampleSelector(**case.rule)
        # accelerator.backward steps the engine after every call; with micro_batch_size
        # ohem_step calls backward once per chunk, so it needs the engine's own backward
        # and one engine step (the prepared optimizer's step is a no-op under DeepSpeed).
        chunked = case.micro_batch_size is not None and run.mode == "two_pass"
        backward = model.backward if chunked else accelerator.backward
        outputs = []
        for batch in local_micro_batches(case, accelerator.process_index):
            with accelerator.accumulate(model):
                outputs.append(train_micro_batch(model, batch, run, selector, backward))
                if chunked:
                    model.step()
                optimizer.step()
                optimizer.zero_grad()
        facts = {
            "wrapper": type(model).__name__,
            "zero_stage": model.zero_optimization_stage(),
            "distributed_type": str(accelerator.distributed_type),
            "accumulation_steps": accelerator.gradient_accumulation_steps,
        }
        params = [p.detach().clone() for p in model.module.parameters()]
        accelerator.free_memory()
        return params, outputs, facts


def main() -> None:
    """Run every DeepSpeed run (ZeRO stages 0-3) and every Accelerate-plugin run, then
    leave the process group."""
    # The shared-memory all-reduce kernel only serves DeepSpeed's inference all-reduce,
    # never training; marking it unavailable skips its JIT compile (about a minute on a
    # fresh 2-core machine) that init_distributed would otherwise start.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    accelerate = []

    def train_any(run: Run) -> tuple[list[torch.Tensor], list[StepOutput], dict]:
        if run.engine != "accelerate":
            return train(run)
        if not accelerate:
            accelerate.append(AccelerateDeepSpeed())
        return accelerate[0].train(run)

    run_cases((*DEEPSPEED_RUNS, *ACCELERATE_DEEPSPEED_RUNS), train_any)
    leave_process_group()


if __name__ == "__main__":
    main()
