"""docs/DESIGN.md §4 invariant for ohem_step and OHEMLoss under real Accelerate and DeepSpeed.

Each framework is launched once, as a real launcher subprocess on 2 CPU ranks (gloo),
and runs the cases of ``tests/framework_scripts/parity_cases.py`` (balance off and on,
an idle rank, gradient accumulation over 2 uneven micro-batches, ``micro_batch_size``
chunks) in two-pass and mask mode: Accelerate (DDP); DeepSpeed two-pass at ZeRO 0, 2
and 3 (partitioned parameters) and mask mode at ZeRO 1 and 3, then Accelerate's
DeepSpeed plugin at ZeRO-2 in the same launch. A case takes one plain SGD step with
LR = 1, so the parameters after the step differ from the single-process reference
``p - LR * g`` by exactly the gradient difference; the script records that difference
per case in a JSON file.

Tolerance 1e-6 in fp32: the gradients here are O(0.1-1) and the two sides differ only
in summation order (per-rank partial sums averaged by the engine vs. one backward over
the concatenated batch), a few ulps (observed <= 1e-7).
"""

from __future__ import annotations

import pytest

from tests.framework_scripts.launch_checks import check_run, launch_script, require
from tests.framework_scripts.parity_cases import (
    ACCELERATE_DEEPSPEED_RUNS,
    ACCELERATE_RUNS,
    DEEPSPEED_RUNS,
)


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory) -> dict:
    """One ``accelerate launch --multi_gpu`` of 2 CPU ranks running every Accelerate case."""
    require("accelerate")
    return launch_script(tmp_path_factory, "accelerate", "accelerate_step.py")


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory) -> dict:
    """One ``torchrun`` of 2 CPU ranks: every DeepSpeed run, then every run under
    Accelerate's DeepSpeed plugin (ZeRO-2)."""
    require("deepspeed")
    require("accelerate")
    return launch_script(tmp_path_factory, "torchrun", "deepspeed_step.py")


@pytest.mark.parametrize("run", ACCELERATE_RUNS, ids=lambda run: run.name)
def test_accelerate_ohem_step_matches_single_process(accelerate_results, run):
    check_run(accelerate_results, run, "DistributedDataParallel")


@pytest.mark.parametrize("run", DEEPSPEED_RUNS, ids=lambda run: run.name)
def test_deepspeed_ohem_step_matches_single_process(deepspeed_results, run):
    check_run(deepspeed_results, run, "DeepSpeedEngine")
    # ZeRO-3 really partitioned the parameters: the module holds none of them locally.
    if run.zero_stage == 3:
        assert deepspeed_results[run.name]["local_param_numel"] == 0


@pytest.mark.parametrize("run", ACCELERATE_DEEPSPEED_RUNS, ids=lambda run: run.name)
def test_accelerate_deepspeed_plugin_ohem_step_matches_single_process(deepspeed_results, run):
    check_run(deepspeed_results, run, "DeepSpeedEngine")
    result = deepspeed_results[run.name]
    assert result["distributed_type"] == "DistributedType.DEEPSPEED"
    assert result["accumulation_steps"] == run.case.accumulation_steps
